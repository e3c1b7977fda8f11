"""Request bodies shared by the REST API, the typed client and the service.

The hyperparameters are the training settings of ``lomo_core.config.TrainConfig`` that a job may set,
under the same names; their ranges and combinations are checked by TrainConfig itself when the job is
created, so the CLI, the library and the service accept exactly the same values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from lomo_core.config import TrainConfig

#: TrainConfig fields a job may set (paths, devices and output folders belong to the service)
HYPERPARAMETERS = (
    "epochs", "max_steps", "batch_size", "max_seq_len", "packing", "shuffle", "lr", "lr_schedule",
    "warmup_steps", "min_lr_ratio", "clip_grad_norm", "clip_grad_value", "weight_decay", "dtype",
    "gradient_checkpointing", "loss_chunk_size", "seed", "validation_split", "eval_every", "save_every",
    "keep_checkpoints", "data_format",
)


def _optional(name: str) -> tuple[Any, Any]:
    field = TrainConfig.model_fields[name]
    description = field.description or ""
    if field.default is not None:
        description = (description + f" (default {field.default})").strip()
    return field.annotation | None, Field(None, description=description)


Hyperparameters = create_model(  # type: ignore[call-overload]
    "Hyperparameters",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Training settings; any left out take the default shown.",
    **{name: _optional(name) for name in HYPERPARAMETERS},
)

Method = Literal["lomo", "adalomo", "sgd", "adamw"]


class EvalSpec(BaseModel):
    """One evaluation of a job: the base model before training and the fine-tuned one after."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=64, description="boolq | cb | copa | rte | wic | wsc | multirc | "
                                                               "perplexity | lambada")
    file: str = Field(min_length=1, max_length=64, description="id of an uploaded file (purpose 'eval')")
    limit: int | None = Field(None, ge=1, description="score the first N examples only")
    num_fewshot: int = Field(0, ge=0, le=64, description="labelled examples before each prompt")
    fewshot_file: str | None = Field(None, max_length=64, description="id of the file few-shot examples come from")
    at_checkpoints: bool = Field(False, description="also score the model at each checkpoint (one-GPU jobs), "
                                                    "on the weights in memory")


class JobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1000,
                       description="a model folder the worker can read, or the name of a registered model")
    training_file: str = Field(min_length=1, max_length=64, description="id of an uploaded file")
    validation_file: str | None = Field(None, max_length=64)
    method: Method = Field("lomo", description="lomo | adalomo, or the sgd / adamw baselines")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)  # type: ignore[valid-type]
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="added to the name of the fine-tuned model")
    metadata: dict[str, str] = Field(default_factory=dict, description="up to 16 key/value pairs, for filtering")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first; first come, first served within "
                                                           "a priority")
    gpus: int | None = Field(None, ge=1, le=64, description="pin the number of GPUs (default: the fewest that "
                                                             "hold the job, from the memory model)")
    evals: list[EvalSpec] = Field(default_factory=list, max_length=16,
                                  description="evaluations run on the base model before training and on the "
                                              "fine-tuned model after")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16:
            raise ValueError(f"at most 16 keys, got {len(value)}")
        for key, item in value.items():
            if not key or len(key) > 64:
                raise ValueError(f"key {key[:80]!r} must have 1 to 64 characters")
            if len(item) > 512:
                raise ValueError(f"the value of {key!r} is longer than 512 characters")
        return value

    def hyperparameter_values(self) -> dict[str, Any]:
        return self.hyperparameters.model_dump(exclude_none=True)  # type: ignore[attr-defined]


FilePurpose = Literal["fine-tune", "eval"]
