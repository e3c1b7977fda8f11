"""Response shapes of the REST API (OpenAI's fine-tuning objects where they fit, plus the lab's own)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.models import Checkpoint, EvalResult, File, Job, JobEvent, MetricPoint


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


class ErrorDetail(BaseModel):
    param: str | None = None
    message: str
    line: int | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    object: Literal["file"] = "file"
    id: str
    filename: str
    purpose: str
    bytes: int
    records: int
    format: str | None
    created_at: int

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(id=row.id, filename=row.filename, purpose=row.purpose, bytes=row.bytes, records=row.records,
                   format=row.data_format, created_at=unix(row.created_at))


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class FileDeleted(BaseModel):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int
    total_steps: int | None
    fraction: float | None


class JobObject(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    status: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    training_file: str
    validation_file: str | None
    method: str
    hyperparameters: dict[str, Any]
    suffix: str | None
    trained_tokens: int
    progress: Progress
    estimated_finish: int | None
    error: JobError | None
    result_files: list[str]
    metadata: dict[str, str]
    cancel_requested: bool
    attempt: int
    predicted_memory: dict[str, Any] | None
    gpus: int
    priority: int
    evals: list[dict[str, Any]]

    @classmethod
    def of(cls, job: Job) -> JobObject:
        total = job.total_steps
        error = None
        if job.error_code:
            error = JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
        return cls(
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


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: int
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> EventObject:
        return cls(id=row.id, created_at=unix(row.created_at), level=row.level, message=row.message, data=row.data)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class CheckpointObject(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: int
    step: int
    path: str
    created_at: int

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointObject:
        return cls(id=row.id, step=row.step, path=row.path, created_at=unix(row.created_at))


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]


class MetricObject(BaseModel):
    step: int
    kind: str
    loss: float
    lr: float | None
    tokens_per_s: float | None
    grad_norm: float | None

    @classmethod
    def of(cls, row: MetricPoint) -> MetricObject:
        return cls(step=row.step, kind=row.kind, loss=row.loss, lr=row.lr, tokens_per_s=row.tokens_per_s,
                   grad_norm=row.grad_norm)


class MetricList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricObject]
    has_more: bool


class MemoryObject(BaseModel):
    object: Literal["fine_tuning.job.memory"] = "fine_tuning.job.memory"
    job_id: str
    predicted: dict[str, Any] | None
    measured: list[dict[str, Any]]
    samples: int


class EvalObject(BaseModel):
    task: str
    split: str
    metric: str
    value: float
    examples: int
    truncated: int
    model: str
    created_at: int

    @classmethod
    def of(cls, row: EvalResult) -> EvalObject:
        return cls(task=row.task, split=row.split, metric=row.metric, value=row.value, examples=row.examples,
                   truncated=row.truncated or 0, model=row.model_ref, created_at=unix(row.created_at))


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalObject]
