"""One settings class, read from LOMO_* environment variables."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.db import DEFAULT_POOL


class Settings(BaseSettings):
    # an empty variable is an unset one: compose passes ``${LOMO_X:-}`` through as ""
    model_config = SettingsConfigDict(env_prefix="LOMO_", extra="ignore", env_ignore_empty=True)

    #: where uploaded files, checkpoints and exported models live; every worker must see the same folder
    data_dir: Path = Path("var")
    #: SQLite under data_dir when unset (the zero-configuration default); Postgres in production
    database_url: str | None = None
    #: a broker in a SQLite file under data_dir when unset (no server needed); redis://... in production
    broker_url: str | None = None
    #: the Celery queue jobs are sent to
    queue: str = "lomo"
    #: folders whose sub-folders are models that jobs may name (``"model": "stories260K"``)
    model_dirs: list[Path] = Field(default_factory=list)
    #: connections each process keeps open to Postgres, and how many more it may open under load
    #: (``jobs.db.DEFAULT_POOL``)
    db_pool_size: int = Field(DEFAULT_POOL[0], ge=1)
    db_max_overflow: int = Field(DEFAULT_POOL[1], ge=0)
    #: apply database migrations when the API or a worker starts
    auto_migrate: bool = True

    #: uploads larger than this are refused
    max_upload_bytes: int = Field(1 << 30, gt=0)
    #: a training example longer than this (in characters) is refused at upload
    max_example_chars: int = Field(1_000_000, gt=0)

    #: memory of each GPU of a node, in GiB (declared; e.g. [24, 24, 24, 24, 24, 24, 24, 24]); empty: a CPU
    #: node, where a job gets the host's memory
    gpu_memory_gib: list[PositiveFloat] = Field(default_factory=list)
    #: a CPU node (no GPUs): how many training ranks its jobs may run at once, leased like GPUs (a job of
    #: ``gpus`` N takes N of them, and a job larger than a node is spread over several such nodes); unset:
    #: not counted (each worker slot runs a job, with all its ranks)
    cpu_ranks: int | None = Field(None, ge=1)
    #: the address the other nodes reach this node on, for jobs spread over several nodes that this node
    #: launches (their rendezvous: node 0's address and a free port)
    node_address: str = Field(default_factory=lambda: socket.gethostname(), min_length=1)
    #: how long the nodes of a job spread over several nodes wait for each other at its start (seconds)
    rendezvous_timeout_s: int = Field(300, ge=1)
    #: the device training runs on (the GPU scheduler will pick devices per job)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: the worker writes metrics to the database at most this often (seconds)
    flush_interval_s: float = Field(1.0, gt=0)
    #: a cancelled training process gets this long to stop at a step boundary before it is killed
    cancel_grace_s: float = Field(30.0, ge=0)
    #: while jobs wait for free GPUs, a worker looks at the queue again this often (seconds); a job that
    #: ends also wakes the workers at once
    requeue_delay_s: float = Field(15.0, ge=0)
    #: backfill: while the first job of the queue waits for more GPUs than are free, at most this many
    #: jobs behind it may start on the free ones; then the node's GPUs are held for it as they free up
    #: (0: strict queue order)
    backfill_limit: int = Field(4, ge=0)
    #: a running job whose worker has not been heard of for this long is recovered by another worker: it
    #: goes back to the queue and resumes from its latest complete checkpoint
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    #: how many times a job is recovered after losing its worker before it fails (infrastructure losses;
    #: a failure of the job itself is never retried)
    max_recoveries: int = Field(3, ge=0)
    #: jobs without save_every checkpoint this often (minutes of training), so a lost worker costs at most
    #: that much (0: only at the end of each epoch)
    recovery_checkpoint_minutes: float = Field(30.0, ge=0)
    #: while the database cannot be reached (a restart, a network cut), a worker keeps a running job's
    #: records and writes them when it is back, for up to this long (seconds); past it the job is stopped
    #: and left to recovery (its heartbeat is old by then: any worker resumes it from its checkpoint)
    db_outage_s: float = Field(300.0, gt=0)
    #: preemption by priority: a queued job that waits for GPUs held by running jobs of lower priority
    #: pauses as many of them as it needs (each checkpoints, frees its GPUs and goes back to the queue to
    #: resume when GPUs free up)
    preempt: bool = False
    #: a job runs at least this long after each start before it can be preempted (seconds), so that no
    #: job is preempted over and over without progress
    preempt_min_run_s: float = Field(600.0, ge=0)
    #: quotas of each user (an admin overrides them per user, ``PATCH /v1/admin/users/{user}``); unset: no
    #: limit. Running jobs: a user's jobs that run at once (more wait in the queue, their place kept, until
    #: one ends); queued jobs: a submission past it is refused (429)
    quota_running_jobs: int | None = Field(None, ge=1)
    quota_queued_jobs: int | None = Field(100, ge=1)
    #: GPU-hours a user's jobs may hold (from the GPU leases) in the last ``quota_window_hours``; a
    #: submission once they are used up is refused (429)
    quota_gpu_hours: float | None = Field(None, gt=0)
    quota_window_hours: float = Field(168.0, gt=0)
    #: bytes of files a user may keep uploaded (deleting files frees them); an upload past it is refused
    #: (429) while it streams
    quota_upload_bytes: int | None = Field(None, gt=0)
    #: webhooks: a delivery that fails (no answer, or not a 2xx) is tried again after this long, doubled
    #: each time up to ``webhook_retry_max_s``, until ``webhook_retry_for_s`` after the event; then failed
    webhook_retry_base_s: float = Field(5.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_retry_for_s: float = Field(3 * 24 * 3600.0, gt=0)
    #: seconds a receiver has to answer one delivery
    webhook_timeout_s: float = Field(10.0, gt=0)
    #: let endpoints be on loopback, link-local and private addresses (the node itself, its network,
    #: cloud metadata services); off, such URLs are refused when registered and when delivered to
    webhook_allow_private: bool = False
    #: the name this worker claims jobs under (and the node its GPU leases belong to)
    worker_name: str = Field(default_factory=lambda: socket.gethostname())
    #: a bearer token for Prometheus to scrape ``/metrics`` with (checked without the database, so the
    #: scrape answers while it is down); unset: scraping needs an admin's API key
    metrics_token: str | None = Field(None, min_length=16)
    #: ``json``: one JSON object per log line (time, level, logger, message, job_id, user, request_id) from
    #: the API, the workers and the training processes; ``text``: the usual lines
    log_format: Literal["text", "json"] = "text"
    #: the owner of requests while the service has no authentication
    default_user: str = "local"
    #: a sign-in to the web portal lasts this long (hours); signing out, revoking its API key or
    #: disabling its user ends it sooner
    portal_session_hours: float = Field(12.0, gt=0, le=24 * 90)
    #: the address browsers reach the service at (``https://lomo.lab.example``) when a proxy in front of it
    #: passes another Host: the portal takes changes sent from there, and its cookie is Secure with https
    public_url: str | None = Field(None, pattern=r"^https?://[^/\s]+/?$")
    #: the portal's cookie is sent over HTTPS only (``Secure``); unset: when the request came over HTTPS
    #: or to this host's loopback address (browsers keep Secure cookies of http://localhost); set it to
    #: true behind a TLS proxy that forwards plain HTTP
    portal_secure_cookie: bool | None = None

    @property
    def admin_key_file(self) -> Path:
        """Where the first start writes the local admin's API key (readable by its owner only)."""
        return self.data_dir / "admin-key"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lomo.db').resolve()}"

    def api_database(self):  # -> jobs.db.Database
        """The database as the API (and the CLI's own reads) use it."""
        from jobs.db import database

        return database(self.resolved_database_url(), pool=self.db_pool)

    def worker_database(self):  # -> jobs.db.Database
        """The database as a worker uses it: a transaction left waiting for longer than half the heartbeat
        timeout (at least 5 s) by a worker that froze or was cut off mid-write is ended by the server, so
        its lock on a job's row cannot keep the job from being recovered."""
        from jobs.db import database

        return database(self.resolved_database_url(), max(self.heartbeat_timeout_s / 2, 5.0), self.db_pool)

    @property
    def db_pool(self) -> tuple[int, int]:
        """The connection pool of each process's engine: (kept open, more under load); see ``jobs.db``."""
        return self.db_pool_size, self.db_max_overflow

    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    def device_inventory(self) -> tuple[str, int, int]:
        """(device kind, devices per node, bytes of the smallest device) that jobs are placed on."""
        if self.gpu_memory_gib:
            return "cuda", len(self.gpu_memory_gib), int(min(self.gpu_memory_gib) * 1024**3)
        import os

        return "cpu", 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def rank_slots(self) -> int | None:
        """How many GPUs (or CPU ranks, with ``cpu_ranks``) of this node jobs lease; None: not counted."""
        return len(self.gpu_memory_gib) if self.gpu_memory_gib else self.cpu_ranks

    @property
    def embedded(self) -> bool:
        """True when the broker is the zero-configuration one (``lomo serve`` then starts a worker too)."""
        return not self.broker_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
