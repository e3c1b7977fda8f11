"""Whether a job may be queued: its files, model, evaluations and hyperparameters checked (with
``lomo_core``'s own TrainConfig, so the CLI, the library and the service accept the same values), and
its memory predicted on this deployment's devices. Every problem names the job field it concerns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs.catalog import registered_models, resolve_model
from jobs.errors import InvalidRequest, NotFound, Problem
from jobs.evalspecs import checked_evals
from jobs.files import file_path, get_file
from jobs.models import File
from jobs.nodes import deployment_inventory
from jobs.schemas import HYPERPARAMETERS, JobCreate
from jobs.settings import Settings
from jobs.users import ensure_user
from lomo_core.config import ConfigError, load_config

_PARAM_OF_FIELD = {"model": "model", "data": "training_file", "validation_data": "validation_file",
                   "optimizer": "method", "nproc": "gpus"}


def param_for_field(field_name: str) -> str:
    """The job field a TrainConfig field comes from (``lr`` -> ``hyperparameters.lr``, ``data`` ->
    ``training_file``)."""
    if field_name in HYPERPARAMETERS:
        return f"hyperparameters.{field_name}"
    return _PARAM_OF_FIELD.get(field_name, field_name)


def job_output_dir(settings: Settings, job_id: str) -> Path:
    return (settings.data_dir / "jobs" / job_id).resolve()


def train_config_values(
    settings: Settings, job_id: str, model: Path, method: str, hyperparameters: dict[str, Any],
    training_path: Path, validation_path: Path | None, gpus: int = 1,
) -> dict[str, Any]:
    values: dict[str, Any] = dict(hyperparameters)
    values.update(model=model, data=training_path, output_dir=job_output_dir(settings, job_id),
                  optimizer=method, device=settings.device, nproc=gpus)
    if validation_path is not None:
        values["validation_data"] = validation_path
    return values


def check_train_config(values: dict[str, Any]) -> dict[str, Any]:
    """Validate with lomo_core's TrainConfig; problems are named by the job field they come from."""
    try:
        config = load_config(values)
    except ConfigError as e:
        problems = []
        for line in e.problems:
            name, sep, message = line.partition(": ")
            problems.append(Problem(param_for_field(name), message) if sep and " " not in name else Problem(None, line))
        raise InvalidRequest(problems, code="invalid_hyperparameters") from None
    return config.model_dump(mode="json")


def predict_memory(session: Session, settings: Settings, model: Path, resolved: dict[str, Any],
                   pinned: int | None) -> dict[str, Any]:
    """The memory model's answer for a job on this deployment's devices (``lomo_core.memory_model``)."""
    from lomo_core.memory_model import GiB, model_shape, place

    device, count, device_bytes = deployment_inventory(session, settings)
    try:
        shape = model_shape(model)
    except Exception as e:  # a config the model cannot be built from on the meta device: no prediction
        return {"available": False, "reason": f"cannot read the model's shape: {type(e).__name__}: {e}"}
    placement = place(
        shape, device_bytes, count, pinned=pinned, optimizer=resolved["optimizer"], dtype=resolved["dtype"],
        batch_size=resolved["batch_size"], seq_len=resolved["max_seq_len"],
        gradient_checkpointing=resolved["gradient_checkpointing"], loss_chunk_size=resolved["loss_chunk_size"],
        device=device,
    )
    return {
        "available": True, "fits": placement.fits, "gpus": placement.gpus if device == "cuda" else None,
        "device": device, "devices": count, "device_bytes": device_bytes, "reason": placement.reason,
        "parameters": shape.parameters, "per_device": placement.estimate.as_dict(),
        "per_device_gib": round(placement.estimate.peak_bytes / GiB, 2),
    }


def checked_request(session: Session, settings: Settings, owner: str, request: JobCreate, job_id: str):
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
    model = resolve_model(settings, request.model)
    if model is None:
        known = registered_models(settings)
        problems.append(Problem("model", f"{request.model!r} is neither a model folder (with config.json) nor "
                                         f"a registered model" + (f" ({', '.join(known)})" if known else "")))
    evals = checked_evals(session, settings, owner, request, problems)
    _device, count, _bytes = deployment_inventory(session, settings)
    if request.gpus is not None and _device == "cuda" and request.gpus > count:
        problems.append(Problem("gpus", f"{request.gpus} GPUs asked for; a node of this deployment has {count}"))
    if problems:
        raise InvalidRequest(problems)
    train, val = files["training_file"], files["validation_file"]
    values = train_config_values(settings, job_id, model, request.method, request.hyperparameter_values(),
                                 file_path(settings, train), file_path(settings, val) if val else None,
                                 gpus=request.gpus or 1)
    return model, train, val, check_train_config(values), evals


def estimate_job(session: Session, settings: Settings, owner: str, request: JobCreate) -> dict[str, Any]:
    """``POST /v1/estimates``: what a job would need, without creating it."""
    model, _train, _val, resolved, _evals = checked_request(session, settings, owner, request, "estimate")
    return predict_memory(session, settings, model, resolved, request.gpus)
