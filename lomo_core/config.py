"""The one configuration of a training run, shared by the CLI, the library and (later) the job API.

Validation fails fast and reports every problem at once, each naming its field, so a job that
cannot work is refused before it starts rather than at step 500.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Optimizer = Literal["lomo", "adalomo", "sgd", "adamw"]
FUSED_OPTIMIZERS = ("lomo", "adalomo")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # names in torch


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: Path = Field(description="folder of a Hugging Face causal LM (config.json + weights + tokenizer)")
    data: Path = Field(description="training data: .jsonl / .json (instruct or text) or .txt")
    output_dir: Path = Field(description="where the model, checkpoints, metrics and memory report go")
    validation_data: Path | None = None
    validation_split: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this fraction of data")
    data_format: Literal["auto", "instruct", "text"] = "auto"

    optimizer: Optimizer = "lomo"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    clip_grad_value: float | None = Field(None, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr / lr for linear and cosine")

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (overrides epochs)")
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=2)
    packing: bool = False
    shuffle: bool = True
    seed: int = 42

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = Field(
        None, ge=1, description="compute the loss in chunks of this many tokens, never holding the full logits"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: int = Field(1, ge=1, description="ranks (GPUs, or CPU processes) training one model with ZeRO-3")

    eval_every: int | None = Field(None, ge=1, description="validation loss every N steps (and at the end)")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps")
    save_every_minutes: float | None = Field(
        None, gt=0, description="without save_every: also a checkpoint when this many minutes of training have "
                                "passed since the last one (what a crash can cost at most)")
    save_every_epoch: bool = Field(False, description="without save_every: a checkpoint at the end of each epoch "
                                                      "but the last (whose weights are the final model)")
    keep_checkpoints: int = Field(2, ge=1)
    memory_interval: int = Field(50, ge=1, description="on CPU, track memory at step 1 and every N steps")
    resume_from: Path | None = Field(None, description="a checkpoint folder to continue from")
    save_final_model: bool = True

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        problems = []
        if self.gradient_accumulation_steps > 1 and self.optimizer in FUSED_OPTIMIZERS:
            problems.append(
                f"gradient_accumulation_steps: {self.gradient_accumulation_steps} cannot work with "
                f"{self.optimizer}: it updates each parameter inside the backward pass, so gradients are "
                "never kept between micro-batches; use a larger batch_size instead (with "
                "gradient_checkpointing to fit it)"
            )
        if self.dtype == "fp16" and self.optimizer not in FUSED_OPTIMIZERS:
            problems.append(
                f"dtype: fp16 needs loss scaling, which only lomo/adalomo provide here; use bf16 or fp32 "
                f"with {self.optimizer}"
            )
        if self.nproc > 1 and self.optimizer not in FUSED_OPTIMIZERS:
            problems.append(
                f"nproc: {self.nproc} ranks train with lomo or adalomo (ZeRO-3 partitions updated in the backward "
                f"pass); the {self.optimizer} baseline runs in one process"
            )
        if self.validation_data is not None and self.validation_split > 0:
            problems.append("validation_split: give either validation_data or validation_split, not both")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("model")
    @classmethod
    def _model_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"folder {str(value)!r} does not exist")
        if not (value / "config.json").is_file():
            raise ValueError(f"{str(value)!r} has no config.json (not a Hugging Face model folder)")
        return value

    @field_validator("data", "validation_data")
    @classmethod
    def _data_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("resume_from")
    @classmethod
    def _checkpoint(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "trainer_state.pt").is_file():
            raise ValueError(f"{str(value)!r} is not a checkpoint (no trainer_state.pt)")
        return value

    @property
    def torch_dtype(self) -> Any:
        import torch  # imported here: the job API validates configs without loading torch

        return getattr(torch, DTYPES[self.dtype])


def describe_errors(error: ValidationError) -> list[str]:
    """One readable line per problem, each starting with the field it concerns."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if field:
            lines.append(f"{field}: {message}")
        else:
            lines.extend(message.splitlines())
    return lines


def load_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig; on failure raise ValueError listing every problem, field first."""
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise ConfigError(describe_errors(e)) from None


class ConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid training configuration:\n  " + "\n  ".join(problems))
