"""Response shapes of the REST API (OpenAI's fine-tuning objects where they fit, plus the lab's own).

Rows become these in one place, ``api.views``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


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



class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalObject]
