"""Create, list, cancel, claim and finish jobs; store files. The only writer of job rows.

Every function takes an open ``Session`` and leaves committing to the caller's ``session_scope``,
except where a conditional update must be atomic on its own (the claim, the end of a run). Status
changes go through ``jobs.states``. Every query is scoped to an owner, so per-user visibility needs
no change here when authentication arrives.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session

from jobs.models import Checkpoint, EvalResult, File, Job, JobEvent, MemorySample, MetricPoint, Node, User
from jobs.schemas import HYPERPARAMETERS, JobCreate
from jobs.settings import Settings
from jobs.states import TERMINAL, JobStatus, transition_values
from lomo_core.config import ConfigError, load_config
from lomo_core.data import DataError, check_file

ACTIVE = [s.value for s in JobStatus if s not in TERMINAL]


# ---------------------------------------------------------------------------------------------- errors
class ServiceError(Exception):
    """Something the client asked for cannot be done; the API turns these into 4xx answers."""


class NotFound(ServiceError):
    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"no {kind} with id {ident!r}")
        self.kind, self.ident = kind, ident


class Conflict(ServiceError):
    pass


@dataclass
class Problem:
    param: str | None
    message: str
    line: int | None = None


class InvalidRequest(ServiceError):
    """One or more problems, each naming the field (``param``) or the line of a file."""

    def __init__(self, problems: list[Problem], code: str = "invalid_request") -> None:
        self.problems, self.code = problems, code
        first = problems[0]
        super().__init__(f"{first.param}: {first.message}" if first.param else first.message)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def ping(session: Session) -> None:
    session.execute(text("SELECT 1"))


def ensure_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        user = User(id=user_id, name=user_id)
        session.add(user)
        session.flush()
    return user


# ---------------------------------------------------------------------------------------------- files
def store_file(
    session: Session, settings: Settings, owner: str, filename: str, purpose: str, upload: Path
) -> File:
    """Validate an uploaded file (already on disk at ``upload``) and keep it; every problem names its line.

    The file is moved into the data folder before its row is written, so a row never points at
    nothing; a refused upload leaves no trace.
    """
    name = Path(filename or "upload.jsonl").name
    suffix = Path(name).suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt"):
        raise InvalidRequest([Problem("file", f"{name!r}: expected a .jsonl, .json or .txt file")])
    size = upload.stat().st_size
    if size == 0:
        raise InvalidRequest([Problem("file", f"{name!r} is empty")])
    checked_path = upload.with_suffix(suffix)  # the reader tells .txt from JSON by the suffix
    os.replace(upload, checked_path)
    try:
        if purpose == "eval":  # its task is known at submission, where its fields are checked
            check = _check_eval_upload(checked_path)
        else:
            check = check_file(checked_path, max_example_chars=settings.max_example_chars)
    except DataError as e:
        checked_path.unlink(missing_ok=True)
        raise InvalidRequest([Problem("file", str(e))], code="invalid_file") from None
    if not check.ok:
        checked_path.unlink(missing_ok=True)
        problems = [Problem("file", f"line {line}: {message}" if line else message, line or None)
                    for line, message in check.errors]
        if check.truncated_errors:
            problems.append(Problem("file", f"(only the first {len(check.errors)} problems are listed)"))
        raise InvalidRequest(problems, code="invalid_file")

    ensure_user(session, owner)
    file_id = new_id("file")
    relative = Path("files") / f"{file_id}{suffix}"
    target = settings.data_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(checked_path), target)
    row = File(id=file_id, owner_id=owner, filename=name, purpose=purpose, bytes=size,
               storage_path=str(relative), records=check.records, data_format=check.format)
    session.add(row)
    session.flush()
    return row


@dataclass
class _EvalUploadCheck:
    records: int
    errors: list[tuple[int, str]]
    truncated_errors: bool = False
    format: str = "eval"

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_eval_upload(path: Path, max_errors: int = 20) -> _EvalUploadCheck:
    """An evaluation file at upload: text, or one JSON object per line (.jsonl). Which fields it needs
    depends on the task, so they are checked when a job names it (``lomo_core.evals.check_eval_file``)."""
    import json

    records, errors = 0, []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                records += 1
                if path.suffix == ".jsonl":
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as e:
                        errors.append((number, f"invalid JSON: {e.msg}"))
                        continue
                    if not isinstance(value, dict):
                        errors.append((number, "expected a JSON object"))
        except UnicodeDecodeError:
            raise DataError(f"{path.name}: not UTF-8 text") from None
    if path.suffix == ".json":
        raise DataError("an evaluation file is .jsonl (one example per line) or .txt")
    return _EvalUploadCheck(records, errors[:max_errors], len(errors) > max_errors)


def _checked_evals(session: Session, settings: Settings, owner: str, request: JobCreate,
                   problems: list[Problem]) -> list[dict[str, Any]]:
    """The job's evaluations with their files checked for their task (every problem names
    ``evals[i].field`` and, for a file, its line)."""
    from lomo_core.evals import TASKS, EvalInputError, EvalRequest, UnknownTaskError, check_eval_file, check_request

    checked = []
    for index, spec in enumerate(request.evals):
        where = f"evals[{index}]"
        if spec.task not in TASKS:
            problems.append(Problem(f"{where}.task", f"unknown task {spec.task!r}; known: {', '.join(TASKS)}"))
            continue
        paths: dict[str, Path | None] = {"file": None, "fewshot_file": None}
        for name in paths:
            ident = getattr(spec, name)
            if ident is None:
                continue
            try:
                paths[name] = file_path(settings, get_file(session, owner, ident))
            except NotFound:
                problems.append(Problem(f"{where}.{name}", f"no uploaded file with id {ident!r}"))
                continue
            try:
                check_eval_file(spec.task, paths[name])
            except UnknownTaskError:
                pass
            except EvalInputError as e:
                problems += [Problem(f"{where}.{name}", f"file {ident}: {p.replace(str(paths[name]), ident)}")
                             for p in e.problems]
                paths[name] = None
        if paths["file"] is None:
            continue
        try:
            check_request(EvalRequest(spec.task, paths["file"], spec.limit, spec.num_fewshot, paths["fewshot_file"]))
        except EvalInputError as e:
            problems += [Problem(f"{where}.{p.partition(':')[0]}" if p.partition(":")[0] in ("limit", "num_fewshot")
                                 else f"{where}.fewshot_file", p) for p in e.problems]
            continue
        checked.append(spec.model_dump())
    return checked


def get_file(session: Session, owner: str, file_id: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.owner_id != owner or row.deleted_at is not None:
        raise NotFound("file", file_id)
    return row


def list_files(session: Session, owner: str, purpose: str | None = None) -> list[File]:
    query = select(File).where(File.owner_id == owner, File.deleted_at.is_(None))
    if purpose:
        query = query.where(File.purpose == purpose)
    return list(session.scalars(query.order_by(File.created_at.desc(), File.id.desc())))


def delete_file(session: Session, settings: Settings, owner: str, file_id: str) -> File:
    row = get_file(session, owner, file_id)
    users = session.scalars(
        select(Job.id).where(
            or_(Job.training_file_id == file_id, Job.validation_file_id == file_id), Job.status.in_(ACTIVE)
        )
    ).all()
    if users:
        raise Conflict(f"file {file_id} is used by job(s) {', '.join(users)} that have not finished")
    (settings.data_dir / row.storage_path).unlink(missing_ok=True)
    row.deleted_at = now_utc()  # the row stays: finished jobs still name the file they were trained on
    return row


def file_path(settings: Settings, row: File) -> Path:
    return (settings.data_dir / row.storage_path).resolve()


# ---------------------------------------------------------------------------------------------- models
def resolve_model(settings: Settings, reference: str) -> Path | None:
    """A model folder (path) or the name of a sub-folder of one of ``settings.model_dirs``."""
    candidates = [Path(reference)] + [Path(root) / reference for root in settings.model_dirs]
    for candidate in candidates:
        try:
            if (candidate / "config.json").is_file():
                return candidate.resolve()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a model
            continue
    return None


def registered_models(settings: Settings) -> list[str]:
    names = []
    for root in settings.model_dirs:
        if Path(root).is_dir():
            names += sorted(p.name for p in Path(root).iterdir() if (p / "config.json").is_file())
    return names


# ---------------------------------------------------------------------------------------------- jobs
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


def register_node(session: Session, name: str, gpu_memory_gib: list[float]) -> None:
    """Record (or refresh) a worker node's GPUs: the API places jobs on what the workers have."""
    node = session.get(Node, name)
    if node is None:
        session.add(Node(name=name, gpu_memory_gib=list(gpu_memory_gib), seen_at=now_utc()))
    else:
        node.gpu_memory_gib, node.seen_at = list(gpu_memory_gib), now_utc()


def deployment_inventory(session: Session, settings: Settings) -> tuple[str, int, int]:
    """(device kind, devices per node, bytes per device) that jobs are checked against at submission.

    GPUs declared in the settings (``LOMO_GPU_MEMORY_GIB``) win; otherwise the largest GPU node its
    workers registered (the most GPUs, then the most memory on its smallest one); otherwise this host's
    memory, as a CPU node."""
    if settings.gpu_memory_gib:
        return settings.device_inventory()
    nodes = [n.gpu_memory_gib for n in session.scalars(select(Node)) if n.gpu_memory_gib]
    if nodes:
        best = max(nodes, key=lambda gib: (len(gib), min(gib)))
        return "cuda", len(best), int(min(best) * 1024**3)
    return settings.device_inventory()


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


def _checked_request(session: Session, settings: Settings, owner: str, request: JobCreate, job_id: str):
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
    evals = _checked_evals(session, settings, owner, request, problems)
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
    model, _train, _val, resolved, _evals = _checked_request(session, settings, owner, request, "estimate")
    return predict_memory(session, settings, model, resolved, request.gpus)


def create_job(session: Session, settings: Settings, owner: str, request: JobCreate) -> Job:
    """Validate everything a job needs, then write it ``queued``. The caller commits, then enqueues.

    A job the memory model says cannot fit on all the devices of a node is refused; with a pinned GPU
    count that the model says is too few, the job is accepted with a warning."""
    job_id = new_id("ftjob")
    model, train, val, resolved, evals = _checked_request(session, settings, owner, request, job_id)
    prediction = predict_memory(session, settings, model, resolved, request.gpus)
    if prediction.get("available") and not prediction["fits"] and request.gpus is None:
        raise InvalidRequest([Problem("model", f"the job cannot fit on this deployment: it {prediction['reason']}; "
                                               "lower batch_size or max_seq_len, turn on gradient_checkpointing, "
                                               "set loss_chunk_size, or use lomo / adalomo")],
                             code="insufficient_memory")
    job = Job(
        id=job_id, owner_id=owner, status=JobStatus.QUEUED.value, model=request.model,
        training_file_id=train.id, validation_file_id=val.id if val else None, method=request.method,
        hyperparameters={name: resolved[name] for name in HYPERPARAMETERS}, suffix=request.suffix,
        metadata_=dict(request.metadata), created_at=now_utc(), predicted_memory=prediction,
        gpus=request.gpus or prediction.get("gpus") or 1, priority=request.priority, evals=evals or None,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"job created: {request.method} on {request.model}, "
                               f"{train.records} training records")
    if job.gpus > 1 and any(spec.get("at_checkpoints") for spec in evals):
        add_event(session, job.id, f"at_checkpoints is ignored: this job runs on {job.gpus} devices, where "
                                   "checkpoints are partitioned; the base and fine-tuned models are still scored",
                  "warning")
    if prediction.get("available"):
        level = "info" if prediction["fits"] else "warning"
        add_event(session, job.id, f"predicted memory: {prediction['per_device_gib']} GiB per device; "
                                   f"{prediction['reason']}", level, data=prediction)
    return job


def get_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner_id != owner:
        raise NotFound("job", job_id)
    return job


def list_jobs(
    session: Session, owner: str, after: str | None = None, limit: int = 20, status: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page."""
    query = select(Job).where(Job.owner_id == owner)
    if status:
        query = query.where(Job.status == status)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    if after:
        cursor = get_job(session, owner, after)
        query = query.where(or_(Job.created_at < cursor.created_at,
                                and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next step."""
    job = get_job(session, owner, job_id)
    status = JobStatus(job.status)
    if status in TERMINAL:
        raise Conflict(f"job {job_id} has already {status.value}; only queued or running jobs can be cancelled")
    if status is JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            add_event(session, job.id, "cancellation requested; the run stops at its next step")
        return job
    # Conditional: a worker claiming the job at this instant wins, and the job is then cancelled as running.
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == status.value)
        .values(cancel_requested=True, **transition_values(status, JobStatus.CANCELLED))
    ).rowcount
    if not done:
        session.refresh(job)
        return cancel_job(session, owner, job_id)
    add_event(session, job.id, "job cancelled before it started")
    session.refresh(job)
    return job


def claim_job(session: Session, job_id: str, worker: str) -> bool:
    """``queued -> running`` in one conditional UPDATE: of two workers given the same job, one wins."""
    now = now_utc()
    values = transition_values(JobStatus.QUEUED, JobStatus.RUNNING, now)
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(claimed_by=worker, heartbeat_at=now, attempt=Job.attempt + 1, **values)
    ).rowcount
    session.commit()
    return done == 1


def queued_job_ids(session: Session) -> list[str]:
    """The queue in the order jobs start: higher priority first, first come first within a priority."""
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED.value)
                                .order_by(Job.priority.desc(), Job.created_at, Job.id)))


def add_event(session: Session, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, message=message, level=level, data=data, created_at=now_utc()))


def list_events(session: Session, owner: str, job_id: str, after: int | None = None,
                limit: int = 20) -> tuple[list[JobEvent], bool]:
    """Newest first, like the job list; ``after`` is the id of the last event of the previous page."""
    get_job(session, owner, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id < after)
    rows = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_metrics(session: Session, owner: str, job_id: str, kind: str | None = None, after_step: int | None = None,
                 limit: int = 1000) -> tuple[list[MetricPoint], bool]:
    get_job(session, owner, job_id)
    query = select(MetricPoint).where(MetricPoint.job_id == job_id)
    if kind:
        query = query.where(MetricPoint.kind == kind)
    if after_step is not None:
        query = query.where(MetricPoint.step > after_step)
    rows = list(session.scalars(query.order_by(MetricPoint.step, MetricPoint.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_checkpoints(session: Session, owner: str, job_id: str) -> list[Checkpoint]:
    get_job(session, owner, job_id)
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def list_evals(session: Session, owner: str, job_id: str) -> list[EvalResult]:
    get_job(session, owner, job_id)
    return list(session.scalars(select(EvalResult).where(EvalResult.job_id == job_id).order_by(EvalResult.id)))


def memory_summary(session: Session, owner: str, job_id: str) -> dict[str, Any]:
    """The predicted figures and, per rank, the largest measured peak with its breakdown."""
    job = get_job(session, owner, job_id)
    samples = list(session.scalars(select(MemorySample).where(MemorySample.job_id == job_id)))
    ranks: dict[int, MemorySample] = {}
    for sample in samples:
        best = ranks.get(sample.rank)
        if best is None or sample.peak_bytes > best.peak_bytes:
            ranks[sample.rank] = sample
    measured = [
        {"rank": rank, "step": s.step, "device": s.device, "source": s.source, "peak_bytes": s.peak_bytes,
         "parameters_bytes": s.parameters_bytes, "gradients_bytes": s.gradients_bytes,
         "optimizer_state_bytes": s.optimizer_state_bytes, "activations_bytes": s.activations_bytes,
         "other_bytes": s.other_bytes}
        for rank, s in sorted(ranks.items())
    ]
    return {"job_id": job_id, "predicted": job.predicted_memory, "measured": measured, "samples": len(samples)}


# ---------------------------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """What a worker gathered since its last write: training records and where the run stands."""

    records: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records)


_MEMORY_FIELDS = ("peak_bytes", "parameters_bytes", "gradients_bytes", "optimizer_state_bytes",
                  "activations_bytes", "other_bytes")


def record_progress(session: Session, job_id: str, records: list[tuple[str, int, dict[str, Any]]],
                    rank: int = 0) -> bool:
    """Write a batch of training records and a heartbeat in one transaction; True when cancel was asked."""
    job = session.get(Job, job_id)
    if job is None:
        return True
    now = now_utc()
    for kind, step, payload in records:
        if kind == "start":
            job.total_steps = payload.get("total_steps")
            message = (f"training started at step {payload.get('step', 0)} of {payload.get('total_steps')}: "
                       f"{payload.get('rows')} rows ({payload.get('format')}), {payload.get('truncated', 0)} "
                       f"truncated, {payload.get('dropped', 0)} dropped")
            add_event(session, job_id, message, data=payload)
        elif kind == "train":
            session.add(MetricPoint(job_id=job_id, step=step, kind="train", loss=payload["loss"],
                                    lr=payload.get("lr"), tokens_per_s=payload.get("tokens_per_s"),
                                    grad_norm=payload.get("grad_norm"), created_at=now))
            job.step = step
            job.trained_tokens = (job.trained_tokens or 0) + int(payload.get("tokens", 0))
            if payload.get("skipped"):
                add_event(session, job_id, f"step {step} skipped: fp16 overflow (loss scale lowered)", "warning")
        elif kind == "val":
            session.add(MetricPoint(job_id=job_id, step=step, kind="val", loss=payload["loss"], created_at=now))
        elif kind == "memory":
            session.add(MemorySample(job_id=job_id, step=step, rank=int(payload.get("rank", rank)),
                                     device=str(payload.get("device")),
                                     source=str(payload.get("source")),
                                     **{k: int(payload.get(k, 0)) for k in _MEMORY_FIELDS}))
        elif kind == "checkpoint":
            session.add(Checkpoint(job_id=job_id, step=step, path=payload["path"], created_at=now))
            add_event(session, job_id, f"checkpoint saved at step {step}", data=payload)
        elif kind == "event":
            add_event(session, job_id, payload.get("message", ""), payload.get("level", "info"))
        elif kind == "eval":
            record_eval(session, job_id, payload["task"], payload["split"], payload["metric"], float(payload["value"]),
                        int(payload["examples"]), payload["model_ref"], int(payload.get("truncated", 0)))
    job.heartbeat_at = now
    _update_estimate(job, now)
    return bool(job.cancel_requested)


def _update_estimate(job: Job, now: datetime) -> None:
    if not job.total_steps or not job.step or job.started_at is None:
        return
    started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
    per_step = (now - started).total_seconds() / job.step
    remaining = max(job.total_steps - job.step, 0) * per_step
    if math.isfinite(remaining):
        job.estimated_finish = now + timedelta(seconds=remaining)


@dataclass
class Outcome:
    status: JobStatus
    error_code: str | None = None
    error_message: str | None = None
    error_param: str | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = field(default_factory=list)


def finish_job(session: Session, job_id: str, outcome: Outcome) -> bool:
    """``running -> succeeded | failed | cancelled``, only if the job is still running."""
    values = transition_values(JobStatus.RUNNING, outcome.status)
    if outcome.status is JobStatus.SUCCEEDED:
        values["estimated_finish"] = None
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value).values(
            error_code=outcome.error_code, error_message=outcome.error_message, error_param=outcome.error_param,
            fine_tuned_model=outcome.fine_tuned_model, result_files=outcome.result_files, **values)
    ).rowcount
    if done:
        text = {JobStatus.SUCCEEDED: "job succeeded", JobStatus.CANCELLED: "job cancelled"}.get(
            outcome.status, f"job failed: {outcome.error_message}")
        add_event(session, job_id, text, "error" if outcome.status is JobStatus.FAILED else "info")
    return done == 1


def record_eval(session: Session, job_id: str, task: str, split: str, metric: str, value: float, examples: int,
                model_ref: str, truncated: int = 0) -> None:
    session.add(EvalResult(job_id=job_id, task=task, split=split, metric=metric, value=value,
                           examples=examples, model_ref=model_ref, truncated=truncated, created_at=now_utc()))
