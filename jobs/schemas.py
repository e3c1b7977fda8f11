"""Request bodies shared by the REST API, the typed client and the job domain.

A job is created with OpenAI's body (``model``, ``training_file``, ``validation_file``, ``seed``,
``suffix``, ``metadata``, ``integrations``, and ``method = {"type": "supervised", "supervised":
{"hyperparameters": {...}}}``, or the deprecated top-level ``hyperparameters``). OpenAI's
hyperparameters mean what they mean there: ``n_epochs``, ``batch_size`` and
``learning_rate_multiplier`` (a multiple of :data:`BASE_LEARNING_RATE` of the optimizer), each a number
or ``"auto"``. This service's own settings sit beside them in the same object: ``optimizer`` and the
training settings of ``lomo_core.config.TrainConfig`` under their own names, whose ranges and
combinations TrainConfig itself checks when the job is created, so the CLI, the library and the
service accept exactly the same values. ``evals``, ``gpus`` and ``priority`` are top-level fields of
ours. Unknown fields are refused with their name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from lomo_core.config import TrainConfig

#: TrainConfig fields a job may set (paths, devices and output folders belong to the service); the
#: epochs are OpenAI's ``n_epochs`` and the seed is the job's top-level ``seed``
HYPERPARAMETERS = (
    "epochs", "max_steps", "batch_size", "max_seq_len", "packing", "shuffle", "lr", "lr_schedule",
    "warmup_steps", "min_lr_ratio", "clip_grad_norm", "clip_grad_value", "weight_decay", "dtype",
    "gradient_checkpointing", "loss_chunk_size", "seed", "validation_split", "eval_every", "save_every",
    "keep_checkpoints", "data_format",
)
_OPENAI_NAMED = ("epochs", "batch_size", "seed")  # set through n_epochs, batch_size and the top-level seed

Optimizer = Literal["lomo", "adalomo", "sgd", "adamw"]
Auto = Literal["auto"]

#: the learning rate that ``learning_rate_multiplier`` multiplies, per optimizer (``"auto"`` is 1.0):
#: LOMO and plain SGD take SGD-sized steps; AdaLomo and AdamW normalise theirs
BASE_LEARNING_RATE: dict[str, float] = {"lomo": 1e-2, "adalomo": 5e-4, "sgd": 1e-2, "adamw": 2e-5}
#: ``n_epochs: "auto"``
AUTO_EPOCHS = 1
#: ``batch_size: "auto"`` chooses the largest of these that the memory model says fits (and no more
#: than the training file has records)
AUTO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
def _printable(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters (NUL, newlines, tabs...)")
    return value


#: a free-text label (a name, a note): no control characters, which the database or logs would choke on
Label = Annotated[str, AfterValidator(_printable)]

#: the largest whole number a job's settings may hold (what the database's integer columns take)
MAX_COUNT = 2**31 - 1
#: the largest number (floats: learning rates, ratios, minutes, norms)
MAX_NUMBER = 1e9


def _count_or_auto(value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'must be a whole number or "auto", got {value!r}')
    if value < 1:
        raise ValueError('must be at least 1, or "auto"')
    if value > MAX_COUNT:
        raise ValueError(f"must be at most {MAX_COUNT}")
    return value


def _positive_or_auto(value: Any) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f'must be a number or "auto", got {value!r}')
    if not 0 < value <= MAX_NUMBER:
        raise ValueError(f'must be greater than 0 and at most {MAX_NUMBER:g}, or "auto"')
    return float(value)


#: a whole number of at least 1, or "auto" (one error message for both, naming the field)
CountOrAuto = Annotated[int | Auto, PlainValidator(_count_or_auto),
                        WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]})]
#: a number greater than 0, or "auto"
PositiveOrAuto = Annotated[float | Auto, PlainValidator(_positive_or_auto),
                           WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "auto"}]})]


def _optional(name: str) -> tuple[Any, Any]:
    """A training setting as a job takes it: optional, and bounded above (TrainConfig checks the rest),
    so that no number too large for the database or for a run gets in."""
    field = TrainConfig.model_fields[name]
    description = field.description or ""
    if field.default is not None:
        description = (description + f" (default {field.default})").strip()
    kinds = set(getattr(field.annotation, "__args__", ())) or {field.annotation}
    bound: dict[str, Any] = {}
    if int in kinds:
        bound = {"le": MAX_COUNT}
    elif float in kinds:
        bound = {"le": MAX_NUMBER, "allow_inf_nan": False}
    return field.annotation | None, Field(None, description=description, **bound)


_Ours = create_model(  # type: ignore[call-overload]
    "_TrainingSettings",
    __config__=ConfigDict(extra="forbid"),
    **{name: _optional(name) for name in HYPERPARAMETERS if name not in _OPENAI_NAMED},
)


class Hyperparameters(_Ours):  # type: ignore[valid-type, misc]
    """OpenAI's three hyperparameters, then this service's training settings; any left out take the
    default shown."""

    n_epochs: CountOrAuto | None = Field(None, description=f"passes over the training file (auto: {AUTO_EPOCHS})")
    batch_size: CountOrAuto | None = Field(
        None, description="examples per step; auto: the largest of 1, 2, 4 ... 64 that the memory model says "
                          "fits the job's devices")
    learning_rate_multiplier: PositiveOrAuto | None = Field(
        None, description="a multiple of the optimizer's base learning rate: " + ", ".join(
            f"{k} {v:g}" for k, v in BASE_LEARNING_RATE.items()) + " (auto: 1)")
    optimizer: Optimizer | None = Field(None, description="lomo (default) | adalomo, or the sgd / adamw baselines")

    @model_validator(mode="after")
    def _one_learning_rate(self) -> Hyperparameters:
        if self.lr is not None and self.learning_rate_multiplier is not None:
            raise ValueError("give learning_rate_multiplier or lr (an absolute learning rate), not both")
        return self


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    """OpenAI's ``method``. Only ``supervised`` is trained here (next-token loss, fused LOMO update)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = Field(description="supervised (dpo and reinforcement are not available)")
    supervised: SupervisedMethod | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"method is an object, {{\"type\": \"supervised\", \"supervised\": {{\"hyperparameters\""
                             f": {{...}}}}}}; the optimizer ({value!r}) is hyperparameters.optimizer")
        if isinstance(value, dict) and value.get("type") in ("dpo", "reinforcement"):
            raise ValueError(f"method.type {value['type']!r} is not available: this service trains supervised "
                             "fine-tuning (type 'supervised')")
        return value


class WandbIntegration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=200)
    entity: str | None = Field(None, max_length=200)
    name: str | None = Field(None, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=50)


class Integration(BaseModel):
    """Stored and echoed back; the service sends nothing to Weights & Biases (the job's events say so)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbIntegration


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
    """``POST /v1/fine_tuning/jobs`` (and ``POST /v1/estimates``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300,
                       description="a registered model's name, or the name of one of your fine-tuned models or "
                                   "checkpoints (GET /v1/models lists them); never a path")
    training_file: str = Field(min_length=1, max_length=64, description="id of an uploaded file")
    validation_file: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="random seed (default 42): same seed, same run")
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$",
                               description="part of the fine-tuned model's name, ft:<base>:<suffix>:<job id>")
    metadata: dict[str, str] | None = Field(None, description="up to 16 key/value pairs, for filtering")
    integrations: list[Integration] | None = Field(None, max_length=8,
                                                   description="stored and echoed; nothing is sent to them")
    method: Method | None = Field(None, description='{"type": "supervised", "supervised": {"hyperparameters": '
                                                    '{...}}}')
    hyperparameters: Hyperparameters | None = Field(
        None, description="deprecated (OpenAI's): the same object as method.supervised.hyperparameters")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first; first come, first served within "
                                                           "a priority")
    gpus: int | None = Field(None, ge=1, le=64, description="pin the number of GPUs (default: the fewest that "
                                                             "hold the job, from the memory model)")
    evals: list[EvalSpec] = Field(default_factory=list, max_length=16,
                                  description="evaluations run on the base model before training and on the "
                                              "fine-tuned model after")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError(f"at most 16 keys, got {len(value)}")
        for key, item in value.items():
            if not key or len(key) > 64:
                raise ValueError(f"key {key[:80]!r} must have 1 to 64 characters")
            if len(item) > 512:
                raise ValueError(f"the value of {key!r} is longer than 512 characters")
        return value

    @model_validator(mode="after")
    def _hyperparameters_once(self) -> JobCreate:
        inner = self.method.supervised if self.method and self.method.supervised else None
        if inner is not None and inner.model_fields_set and self.hyperparameters is not None:
            raise ValueError("give the hyperparameters in method.supervised.hyperparameters or at the top level "
                             "(deprecated), not both")
        return self

    @property
    def settings(self) -> Hyperparameters:
        """The hyperparameters, wherever they were given."""
        if self.method is not None and self.method.supervised is not None and self.hyperparameters is None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()

    @property
    def optimizer(self) -> str:
        return self.settings.optimizer or "lomo"

    def train_values(self) -> dict[str, Any]:
        """TrainConfig's values for this job, except ``batch_size: "auto"`` (left out; admission chooses it
        with the memory model)."""
        given = self.settings
        values = given.model_dump(exclude_none=True,
                                  exclude={"n_epochs", "batch_size", "learning_rate_multiplier", "optimizer"})
        values["epochs"] = AUTO_EPOCHS if given.n_epochs in (None, "auto") else given.n_epochs
        if isinstance(given.batch_size, int):
            values["batch_size"] = given.batch_size
        if given.lr is None:
            multiplier = 1.0 if given.learning_rate_multiplier in (None, "auto") else given.learning_rate_multiplier
            values["lr"] = BASE_LEARNING_RATE[self.optimizer] * multiplier
        if self.seed is not None:
            values["seed"] = self.seed
        return values

    @property
    def auto_batch_size(self) -> bool:
        return self.settings.batch_size == "auto"


def openai_hyperparameters(optimizer: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """A job's resolved settings under OpenAI's names first (``n_epochs``, ``batch_size``,
    ``learning_rate_multiplier``), then ours."""
    ours = {name: resolved[name] for name in HYPERPARAMETERS if name not in _OPENAI_NAMED and name in resolved}
    return {"n_epochs": resolved["epochs"], "batch_size": resolved["batch_size"],
            "learning_rate_multiplier": resolved["lr"] / BASE_LEARNING_RATE[optimizer],
            "optimizer": optimizer, **ours}


FilePurpose = Literal["fine-tune", "eval"]
