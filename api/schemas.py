"""Response shapes of the REST API (OpenAI's fine-tuning objects where they fit, plus the lab's own).

Rows become these in one place, ``api.views``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    param: str | None = None
    message: str
    line: int | None = None
    limit: float | None = None  # a quota's value (429)
    used: float | None = None  # the caller's use of it (429)


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    """OpenAI's file object, plus what the upload check found (``records``, ``format``)."""

    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    #: "processed": a stored file was checked when it was stored (a refused upload is not kept)
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    #: files do not expire
    expires_at: int | None = None
    records: int
    format: str | None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


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


class SupervisedHyperparametersOut(BaseModel):
    model_config = {"extra": "allow"}  # OpenAI's three, then this service's settings under their names

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    optimizer: str


class SupervisedOut(BaseModel):
    hyperparameters: SupervisedHyperparametersOut


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class JobObject(BaseModel):
    """OpenAI's ``fine_tuning.job`` (every field of it), then this service's own fields."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None = Field(description="ft:<base>:<suffix>:<job id> once the job succeeded")
    finished_at: int | None
    hyperparameters: SupervisedHyperparametersOut
    model: str
    organization_id: str
    result_files: list[str] = Field(description="ids of files (GET /v1/files/{id}/content): the metrics CSV")
    seed: int
    status: str
    trained_tokens: int
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str]
    method: MethodOut
    suffix: str | None
    # this service's own
    started_at: int | None
    optimizer: str
    progress: Progress
    cancel_requested: bool
    attempt: int
    recoveries: int  # times it was queued again after losing its worker (LOMO_MAX_RECOVERIES)
    preemptions: int  # times it paused for a job of higher priority and was queued again (LOMO_PREEMPT)
    preempted_by: str | None  # while it pauses for a job of higher priority: that job
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
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class CheckpointMetrics(BaseModel):
    model_config = {"extra": "allow"}

    step: int
    train_loss: float | None = None
    valid_loss: float | None = None


class CheckpointObject(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="a name usable as the model of a new job, or to download")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


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
    id: str
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
    has_more: bool


class ModelObject(BaseModel):
    """OpenAI's model object: a registered base model (``owned_by`` "system") or a fine-tuned model or
    checkpoint (``owned_by`` its owner's user id); ``id`` is a name, never a path."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
    has_more: bool = False


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# ---------------------------------------------------------------------------------------------- users (admins)
class ApiKeyObject(BaseModel):
    """An API key as lists show it: its public id, never its secret."""

    object: Literal["api_key"] = "api_key"
    id: str
    user: str
    name: str | None = None
    created_at: int
    last_used_at: int | None = None
    revoked_at: int | None = None


class NewApiKey(ApiKeyObject):
    """A key just made: ``key`` is the whole key, shown this once (only its hash is kept)."""

    key: str


class UserObject(BaseModel):
    object: Literal["user"] = "user"
    id: str
    name: str
    is_admin: bool
    disabled: bool
    created_at: int
    api_keys: int = Field(description="keys not revoked")
    quotas: dict[str, float | None] = Field(description="the user's limits (the deployment's defaults with the "
                                                        "admin's overrides); null: no limit")
    overrides: dict[str, float | None] = Field(default_factory=dict, description="the admin's overrides")
    usage: dict[str, float] = Field(description="what the user uses of each quota now")


class NewUser(UserObject):
    api_key: NewApiKey


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserObject]
    has_more: bool = False


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]
    has_more: bool = False


class RegisteredModelObject(BaseModel):
    """A base model an admin registered by name (the folder's path is never shown)."""

    object: Literal["registered_model"] = "registered_model"
    id: str
    created_at: int
    registered_by: str


class RegisteredModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RegisteredModelObject]
    has_more: bool = False


# ---------------------------------------------------------------------------------------------- webhooks
class WebhookEndpointObject(BaseModel):
    """OpenAI's ``webhook_endpoint``."""

    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    name: str
    url: str
    event_types: list[str]
    created_at: int
    updated_at: int | None = None
    signing_secret_hint: str | None = None


class WebhookEndpointWithSecret(WebhookEndpointObject):
    """Returned at creation and rotation only: the ``whsec_...`` secret that signs the deliveries."""

    signing_secret: str


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class WebhookEndpointDeleted(BaseModel):
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    id: str
    deleted: bool = True


class WebhookTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    webhook_endpoint_id: str
    event_type: str
    status_code: int = Field(description="the receiver's answer (0: none: it could not be reached)")
    success: Literal[True] = True
    error: str | None = None


class WebhookDeliveryObject(BaseModel):
    """One event sent (or to be sent) to an endpoint: its attempts and the receiver's last answer."""

    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    id: str = Field(description="the webhook-id header of every attempt")
    event_id: str
    event_type: str
    job_id: str | None = None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: int
    next_attempt_at: int | None = None
    delivered_at: int | None = None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryObject]
    has_more: bool = False
