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
from jobs.models import Checkpoint, EvalResult, File, Job, JobEvent, MetricPoint


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def file_object(row: File) -> FileObject:
    return FileObject(id=row.id, filename=row.filename, purpose=row.purpose, bytes=row.bytes, records=row.records,
                      format=row.data_format, created_at=unix(row.created_at))


def job_object(job: Job) -> JobObject:
    total = job.total_steps
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
    return JobObject(
        id=job.id, status=job.status, created_at=unix(job.created_at), started_at=unix(job.started_at),
        finished_at=unix(job.finished_at), model=job.model, fine_tuned_model=job.fine_tuned_model,
        training_file=job.training_file_id, validation_file=job.validation_file_id, method=job.method,
        hyperparameters=job.hyperparameters or {}, suffix=job.suffix, trained_tokens=job.trained_tokens or 0,
        progress=Progress(step=job.step or 0, total_steps=total,
                          fraction=round((job.step or 0) / total, 4) if total else None),
        estimated_finish=unix(job.estimated_finish), error=error, result_files=job.result_files or [],
        metadata=job.metadata_ or {}, cancel_requested=bool(job.cancel_requested), attempt=job.attempt or 0,
        predicted_memory=job.predicted_memory, gpus=job.gpus or 1, priority=job.priority or 0,
        evals=job.evals or [],
    )


def event_object(row: JobEvent) -> EventObject:
    return EventObject(id=row.id, created_at=unix(row.created_at), level=row.level, message=row.message,
                       data=row.data)


def checkpoint_object(row: Checkpoint) -> CheckpointObject:
    return CheckpointObject(id=row.id, step=row.step, path=row.path, created_at=unix(row.created_at))


def metric_object(row: MetricPoint) -> MetricObject:
    return MetricObject(step=row.step, kind=row.kind, loss=row.loss, lr=row.lr, tokens_per_s=row.tokens_per_s,
                        grad_norm=row.grad_norm)


def eval_object(row: EvalResult) -> EvalObject:
    return EvalObject(task=row.task, split=row.split, metric=row.metric, value=row.value, examples=row.examples,
                      truncated=row.truncated or 0, model=row.model_ref, created_at=unix(row.created_at))
