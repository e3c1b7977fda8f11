"""SQLAlchemy 2.x tables. Every schema change is an Alembic migration (tests check they agree)."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from jobs.states import JobStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """``moment`` with its time zone (SQLite gives back naive UTC datetimes)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def owned(owner_id: str, owner: str | None) -> bool:
    """Whether a row of ``owner_id`` is visible to ``owner``: a user sees their own rows, an admin (``owner``
    None, as every read of the jobs layer takes it) everyone's."""
    return owner is None or owner_id == owner


def new_id(prefix: str) -> str:
    """A row id that names its kind (``ftjob-...``, ``file-...``) and cannot be guessed."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"

    __table_args__ = (Index("uq_users_name", "name", unique=True),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: an admin's overrides of the deployment's quotas for this user (``jobs.quotas``): a quota named here
    #: with a number is this user's limit, with null no limit; one not named is the settings' default
    quotas: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RegisteredModel(Base):
    """A base model folder an admin registered by name (``POST /v1/admin/models``), besides the sub-folders
    of ``LOMO_MODEL_DIRS``; jobs name it, never its path."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    registered_by: Mapped[str] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A user's API key: its public id (``key_...``, shown in lists and logs) and the SHA-256 of its
    secret; the key itself is shown once, when it is made, and never stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: where the content lives, relative to the data folder every worker can read
    storage_path: Mapped[str] = mapped_column(String(1000))
    records: Mapped[int] = mapped_column(Integer, default=0)
    data_format: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_owner_created", "owner_id", "created_at"),
                      Index("ix_jobs_queue_order", "status", "priority", "created_at"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.QUEUED.value, index=True)
    model: Mapped[str] = mapped_column(String(1000))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"), index=True)
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    #: integrations the client asked for (stored and echoed; none is acted on)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: the fine-tuned model's name (``ft:<base>:<suffix>:<job id>``), never a path
    fine_tuned_model: Mapped[str | None] = mapped_column(String(1000))
    #: when the fine-tuned model was deleted (``DELETE /v1/models/{name}``); its files are gone
    model_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(200))
    result_files: Mapped[list[Any]] = mapped_column(default=list)
    predicted_memory: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: devices the job trains on: GPUs (ZeRO-3 over several), or CPU ranks on a CPU node
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: higher runs first; first come, first served within a priority
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: jobs behind this one in the queue that started while it waited for GPUs (backfill); at
    #: ``LOMO_BACKFILL_LIMIT`` nothing behind it starts any more on the node it is held on
    bypassed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: the node whose GPUs are held for this job once it reached the limit (the first whose worker held
    #: them); other live nodes go on backfilling (``jobs.scheduler``)
    held_on: Mapped[str | None] = mapped_column(String(200))
    #: a job spread over several nodes (``jobs.placement``): its nodes and ranks per node, then its
    #: rendezvous and run config (written by the launcher), and a joining node's failure
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: evaluations asked for: [{task, file (an uploaded file id), limit, num_fewshot, fewshot_file}]
    evals: Mapped[list[Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Claim and liveness: which worker runs the job, since when it was last heard of, which attempt.
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: how many times the job was recovered after losing its worker (``LOMO_MAX_RECOVERIES``)
    recoveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: while it pauses to make room for a waiting job of higher priority (``jobs.scheduler``): that job's
    #: id; the pause then ends back in the queue instead of ``paused``
    preempted_by: Mapped[str | None] = mapped_column(String(64))
    #: how many times the job was preempted
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_job_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # train | val
    loss: Mapped[float] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MemorySample(Base):
    __tablename__ = "memory_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer, default=0)
    peak_bytes: Mapped[int] = mapped_column(BigInteger)
    parameters_bytes: Mapped[int] = mapped_column(BigInteger)
    gradients_bytes: Mapped[int] = mapped_column(BigInteger)
    optimizer_state_bytes: Mapped[int] = mapped_column(BigInteger)
    activations_bytes: Mapped[int] = mapped_column(BigInteger)
    other_bytes: Mapped[int] = mapped_column(BigInteger)
    device: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: the training figures at this step (``step``, ``train_loss``, ``valid_loss``, ...)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: when its folder went: removed by ``keep_checkpoints``, or with its deleted model (the row stays, marked)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EvalResult(Base):
    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    examples: Mapped[int] = mapped_column(Integer)
    model_ref: Mapped[str] = mapped_column(String(200))  # base | fine_tuned | checkpoint step-N
    truncated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # inputs cut to fit
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GpuLease(Base):
    __tablename__ = "gpu_leases"
    # A device is leased to at most one job at a time: enforced by the database, not only by the code.
    __table_args__ = (
        Index("uq_gpu_leases_active", "node", "device_index", unique=True,
              postgresql_where=text("released_at IS NULL"), sqlite_where=text("released_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(200))
    device_index: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    #: the job's attempt the lease was taken for: only that attempt's worker releases it
    attempt: Mapped[int | None] = mapped_column(Integer)
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: a job spread over several nodes (``jobs.placement``): this node's rank in it (0: the launcher; None
    #: or 0 for a job on one node), and the worker process of this node that joined it
    node_rank: Mapped[int | None] = mapped_column(Integer)
    joined_by: Mapped[str | None] = mapped_column(String(200))


class Node(Base):
    """A worker node and its GPUs (GiB each; empty for a CPU node), written by its workers at start."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    gpu_memory_gib: Mapped[list[Any]] = mapped_column(JSON, default=list)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: a CPU node's bf16 matmul time over fp32's, from the probe at its workers' start (``lomo_core.cpu_probe``;
    #: above 3: no native bf16, bf16 jobs crawl there); None for GPU nodes and nodes not probed
    cpu_bf16_slowdown: Mapped[float | None] = mapped_column(Float)
    #: a CPU node's training ranks, leased like GPUs (``LOMO_CPU_RANKS``); None: not counted
    cpu_ranks: Mapped[int | None] = mapped_column(Integer)


class IdempotencyKey(Base):
    """The object a create request made, by its ``Idempotency-Key``: a retried create returns it."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_id", "route", "key", name="uq_idempotency_keys_owner_route_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    route: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    object_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookEndpoint(Base):
    """A user's receiver of job events (OpenAI's ``webhook_endpoint``): deliveries to ``url`` for the
    ``event_types``, signed with ``secret`` (``whsec_`` + base64 of 32 random bytes; Standard Webhooks).
    After a rotation that keeps the old secret active, deliveries carry a signature by each until
    ``previous_secret_until``."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one endpoint, kept until it is delivered or given up on (the outbox: written in the
    transaction that ended the job, so no event is lost to a crash or a receiver that is down). Its id is
    the ``webhook-id`` of every attempt; ``body`` is the exact JSON that is signed and sent."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PortalSession(Base):
    """A sign-in to the web portal with an API key: the browser holds a random token in an http-only
    cookie, the table only its SHA-256. It lasts until it expires or its user signs out, and it is only as
    good as its key: a revoked key or a disabled user ends it at the next request."""

    __tablename__ = "portal_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie's token
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
