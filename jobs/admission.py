"""Whether a job may be queued: its files, model, evaluations and hyperparameters checked (with
``lomo_core``'s own TrainConfig, so the CLI, the library and the service accept the same values), and
its memory predicted on this deployment's devices. Every problem names the job field it concerns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs import catalog
from jobs.errors import InvalidRequest, NotFound, Problem
from jobs.evalspecs import checked_evals
from jobs.files import file_path, get_file
from jobs.models import File
from jobs.nodes import bf16_warning, deployment_inventory, node_sizes
from jobs.placement import can_spread
from jobs.schemas import AUTO_BATCH_SIZES, HYPERPARAMETERS, JobCreate
from jobs.settings import Settings
from jobs.users import ensure_user
from lomo_core.config import ConfigError, TrainConfig, load_config

_PARAM_OF_FIELD = {"model": "model", "data": "training_file", "validation_data": "validation_file",
                   "nproc": "gpus", "seed": "seed"}
_OPENAI_NAME = {"epochs": "n_epochs"}
#: where a job's hyperparameters are: OpenAI's ``method`` object, or the deprecated top-level field
METHOD_HYPERPARAMETERS = "method.supervised.hyperparameters"


def param_for_field(field_name: str, prefix: str = METHOD_HYPERPARAMETERS) -> str:
    """The job field a TrainConfig field comes from (``lr`` -> ``method.supervised.hyperparameters.lr``,
    ``epochs`` -> ``...n_epochs``, ``data`` -> ``training_file``); ``prefix`` is where the request put its
    hyperparameters."""
    if field_name in _PARAM_OF_FIELD:
        return _PARAM_OF_FIELD[field_name]
    if field_name in HYPERPARAMETERS or field_name == "optimizer":
        return f"{prefix}.{_OPENAI_NAME.get(field_name, field_name)}"
    return field_name


def hyperparameters_prefix(request: JobCreate) -> str:
    return "hyperparameters" if request.hyperparameters is not None else METHOD_HYPERPARAMETERS


def job_output_dir(settings: Settings, job_id: str) -> Path:
    return (settings.data_dir / "jobs" / job_id).resolve()


def train_config_values(
    settings: Settings, job_id: str, model: Path, method: str, hyperparameters: dict[str, Any],
    training_path: Path, validation_path: Path | None, gpus: int = 1,
) -> dict[str, Any]:
    values: dict[str, Any] = dict(hyperparameters)
    values.update(model=model, data=training_path, output_dir=job_output_dir(settings, job_id),
                  optimizer=method, device=settings.device, nproc=gpus)
    # OpenAI lists a checkpoint at each epoch's end when a job sets none of its own; so do we, and a job
    # without save_every also checkpoints every recovery_checkpoint_minutes, for a lost worker to resume
    values.setdefault("save_every_epoch", values.get("save_every") is None)
    if values.get("save_every") is None and settings.recovery_checkpoint_minutes:
        values.setdefault("save_every_minutes", settings.recovery_checkpoint_minutes)
    if validation_path is not None:
        values["validation_data"] = validation_path
    return values


def check_train_config(values: dict[str, Any], prefix: str = METHOD_HYPERPARAMETERS) -> dict[str, Any]:
    """Validate with lomo_core's TrainConfig; problems are named by the job field they come from."""
    try:
        config = load_config(values)
    except ConfigError as e:
        problems = []
        for line in e.problems:
            name, sep, message = line.partition(": ")
            problems.append(Problem(param_for_field(name, prefix), message) if sep and " " not in name
                            else Problem(None, line))
        raise InvalidRequest(problems, code="invalid_hyperparameters") from None
    return config.model_dump(mode="json")


def predict_memory(session: Session, settings: Settings, model: Path, resolved: dict[str, Any],
                   pinned: int | None) -> dict[str, Any]:
    """The memory model's answer for a job on this deployment's devices (``lomo_core.memory_model``)."""
    from lomo_core.memory_model import GiB, place

    device, count, device_bytes = deployment_inventory(session, settings)
    try:
        shape = catalog.model_shape(model)  # cached by the content of config.json
    except Exception as e:  # a config the model cannot be built from on the meta device: no prediction
        why = str(e).replace(str(model), "the model's folder")  # never a path of the server
        return {"available": False, "reason": f"cannot read the model's shape: {type(e).__name__}: {why}"}
    placement = place(
        shape, device_bytes, count, pinned=pinned, optimizer=resolved["optimizer"], dtype=resolved["dtype"],
        batch_size=resolved["batch_size"], seq_len=resolved["max_seq_len"],
        gradient_checkpointing=resolved["gradient_checkpointing"], loss_chunk_size=resolved["loss_chunk_size"],
        device=device,
    )
    slow_bf16 = bf16_warning(session, settings, resolved["dtype"]) if device == "cpu" else None
    return {
        "available": True, "fits": placement.fits, "gpus": placement.gpus if device == "cuda" else None,
        "device": device, "devices": count, "device_bytes": device_bytes, "reason": placement.reason,
        "parameters": shape.parameters, "per_device": placement.estimate.as_dict(),
        "per_device_gib": round(placement.estimate.peak_bytes / GiB, 2),
        "warnings": [slow_bf16] if slow_bf16 else [],
    }


def checked_request(session: Session, settings: Settings, owner: str, request: JobCreate, job_id: str) -> Admitted:
    """Files, model and hyperparameters of a job request, all validated; or InvalidRequest."""
    ensure_user(session, owner)
    problems = []
    files: dict[str, File | None] = {"training_file": None, "validation_file": None}
    for param in files:
        ident = getattr(request, param)
        if ident is None:
            continue
        try:
            files[param] = get_file(session, owner, ident)
        except NotFound:
            problems.append(Problem(param, f"no uploaded file with id {ident!r}"))
            continue
        if files[param].purpose == "eval":
            problems.append(Problem(param, f"file {ident} was uploaded for evaluation (purpose 'eval'), not "
                                           "checked as training data; upload it with purpose 'fine-tune'"))
        elif files[param].purpose != "fine-tune":
            problems.append(Problem(param, f"file {ident} is not training data (purpose {files[param].purpose!r}); "
                                           "upload a file with purpose 'fine-tune'"))
    try:
        model = catalog.resolve_reference(session, settings, owner, request.model)
    except catalog.UnusableModel as e:
        model = None
        problems.append(Problem("model", str(e)))
    else:
        if model is None:
            known = catalog.registered_models(settings, session)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            problems.append(Problem("model", f"{request.model[:200]!r} is neither a registered model"
                                             + (f" ({shown})" if known else "")
                                             + " nor one of your fine-tuned models (GET /v1/models lists them)"))
        elif (vocabulary := catalog.vocabulary_problem(model, repr(request.model))) is not None:
            problems.append(Problem("model", vocabulary))
    evals = checked_evals(session, settings, owner, request, problems)
    sizes = node_sizes(session, settings)
    if request.gpus is not None and sizes and not can_spread(request.gpus, sizes):
        what = "GPUs" if deployment_inventory(session, settings)[0] == "cuda" else "CPU ranks (LOMO_CPU_RANKS)"
        problems.append(Problem("gpus", f"{request.gpus} GPUs asked for; the nodes of this deployment have "
                                        f"{', '.join(map(str, sorted(sizes, reverse=True)))} {what}, and a job "
                                        "larger than a node needs nodes that each take the same share of it"))
    if problems:
        raise InvalidRequest(problems)
    train, val = files["training_file"], files["validation_file"]
    values = train_config_values(settings, job_id, model, request.optimizer, request.train_values(),
                                 file_path(settings, train), file_path(settings, val) if val else None,
                                 gpus=request.gpus or 1)
    resolved = check_train_config(values, hyperparameters_prefix(request))
    choice = None
    if request.auto_batch_size:
        choice = choose_batch_size(session, settings, model, resolved, request.gpus, train.records)
        resolved["batch_size"] = choice.batch_size
    return Admitted(model, train, val, resolved, evals, choice)


@dataclass
class BatchChoice:
    batch_size: int
    reason: str


@dataclass
class Admitted:
    """A job request that passed every check, with its settings resolved."""

    model: Path
    train: File
    val: File | None
    resolved: dict[str, Any]  # TrainConfig's values
    evals: list[dict[str, Any]]
    batch_choice: BatchChoice | None  # what batch_size "auto" chose, and why


def choose_batch_size(session: Session, settings: Settings, model: Path, resolved: dict[str, Any],
                      pinned: int | None, records: int) -> BatchChoice:
    """``batch_size: "auto"``: the largest of ``AUTO_BATCH_SIZES`` (and no more than the file's records)
    that the memory model says fits on the devices a batch of 1 needs (or the pinned GPU count), so a
    larger batch never costs more GPUs."""
    first = predict_memory(session, settings, model, {**resolved, "batch_size": 1}, pinned)
    if not first.get("available"):
        default = TrainConfig.model_fields["batch_size"].default
        return BatchChoice(default, f"the default, {default}: the memory model has no prediction for this model")
    devices = pinned or first.get("gpus")
    for size in sorted((b for b in AUTO_BATCH_SIZES if b <= max(records, 1)), reverse=True):
        prediction = predict_memory(session, settings, model, {**resolved, "batch_size": size}, devices)
        if prediction["fits"]:
            where = f"{devices} GPU(s)" if prediction["device"] == "cuda" else f"this {prediction['device']} node"
            return BatchChoice(size, f"{size}, the largest micro-batch that fits on {where}: "
                                     f"{prediction['per_device_gib']} GiB per device predicted")
    return BatchChoice(1, "1: no larger micro-batch fits")


def estimate_job(session: Session, settings: Settings, owner: str, request: JobCreate) -> dict[str, Any]:
    """``POST /v1/estimates``: what a job would need, without creating it."""
    admitted = checked_request(session, settings, owner, request, "estimate")
    estimate = predict_memory(session, settings, admitted.model, admitted.resolved, request.gpus)
    estimate["batch_size"] = admitted.resolved["batch_size"]
    if admitted.batch_choice:
        estimate["batch_size_reason"] = admitted.batch_choice.reason
    return estimate
