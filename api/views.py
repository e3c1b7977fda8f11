"""Database rows -> response objects: the one place that says what a client sees of a row."""

from __future__ import annotations

from datetime import datetime, timezone

from api.schemas import (
    CheckpointObject,
    EvalObject,
    EventObject,
    FileObject,
    JobError,
    JobObject,
    MetricObject,
    Progress,
)
from jobs.catalog import checkpoint_name
from jobs.errors import InvalidRequest, Problem
from jobs.models import Checkpoint, EvalResult, File, Job, JobEvent, MetricPoint
from jobs.schemas import openai_hyperparameters


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def file_object(row: File) -> FileObject:
    # a row exists only for a file that passed its check when stored: always "processed"
    return FileObject(id=row.id, bytes=row.bytes, created_at=unix(row.created_at), filename=row.filename,
                      purpose=row.purpose, status="processed", records=row.records, format=row.data_format)


def job_object(job: Job) -> JobObject:
    total = job.total_steps
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
    hyperparameters = openai_hyperparameters(job.method, job.hyperparameters)
    return JobObject(
        id=job.id, created_at=unix(job.created_at), error=error, fine_tuned_model=job.fine_tuned_model,
        finished_at=unix(job.finished_at), hyperparameters=hyperparameters, model=job.model,
        organization_id=job.owner_id, result_files=job.result_files or [], seed=job.hyperparameters["seed"],
        status=job.status, trained_tokens=job.trained_tokens or 0, training_file=job.training_file_id,
        validation_file=job.validation_file_id, estimated_finish=unix(job.estimated_finish),
        integrations=job.integrations or [], metadata=job.metadata_ or {},
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}, suffix=job.suffix,
        started_at=unix(job.started_at), optimizer=job.method,
        progress=Progress(step=job.step or 0, total_steps=total,
                          fraction=round((job.step or 0) / total, 4) if total else None),
        cancel_requested=bool(job.cancel_requested), attempt=job.attempt or 0, recoveries=job.recoveries or 0,
        preemptions=job.preemptions or 0, preempted_by=job.preempted_by,
        predicted_memory=job.predicted_memory, gpus=job.gpus or 1, priority=job.priority or 0,
        evals=job.evals or [],
    )


#: events' ids are strings, as OpenAI's (``ftevent-<n>``); checkpoints' and scores' likewise
EVENT_PREFIX, CHECKPOINT_PREFIX, EVAL_PREFIX = "ftevent-", "ftckpt-", "fteval-"
_LEVELS = {"info": "info", "warning": "warn", "warn": "warn", "error": "error"}


def event_object(row: JobEvent) -> EventObject:
    # a validation point (step, train_loss, valid_loss) is a metrics event; a checkpoint's carries its name
    kind = "metrics" if row.data and "valid_loss" in row.data and "checkpoint" not in row.data else "message"
    return EventObject(id=f"{EVENT_PREFIX}{row.id}", created_at=unix(row.created_at),
                       level=_LEVELS.get(row.level, "info"), message=row.message, type=kind, data=row.data)


def checkpoint_object(row: Checkpoint, job: Job) -> CheckpointObject:
    metrics = {"step": row.step, **(row.metrics or {})}
    return CheckpointObject(
        id=f"{CHECKPOINT_PREFIX}{row.id}", created_at=unix(row.created_at),
        fine_tuned_model_checkpoint=checkpoint_name(job.model, job.suffix, job.id, row.step),
        fine_tuning_job_id=job.id, metrics=metrics, step_number=row.step)


MAX_ROW_ID = 2**63 - 1  # the largest id a database row has


def row_id(value: str | None, prefix: str, param: str = "after") -> int | None:
    """The row id in an object id such as ``ftevent-12`` (a bare number is accepted too)."""
    if value is None:
        return None
    number = value.removeprefix(prefix)
    if not number.isdigit() or int(number) > MAX_ROW_ID:
        raise InvalidRequest([Problem(param, f"{value[:80]!r} is not an id of this list ({prefix}<number>)")])
    return int(number)


def metric_object(row: MetricPoint) -> MetricObject:
    return MetricObject(step=row.step, kind=row.kind, loss=row.loss, lr=row.lr, tokens_per_s=row.tokens_per_s,
                        grad_norm=row.grad_norm)


def eval_object(row: EvalResult) -> EvalObject:
    return EvalObject(id=f"{EVAL_PREFIX}{row.id}", task=row.task, split=row.split, metric=row.metric,
                      value=row.value, examples=row.examples, truncated=row.truncated or 0, model=row.model_ref,
                      created_at=unix(row.created_at))
