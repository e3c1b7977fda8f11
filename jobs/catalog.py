"""Models a job may name, and the models this service lists and serves.

A model reference is a name, never a path: a registered base model (a sub-folder of one of
``settings.model_dirs``, not a link out of it, or a folder an admin registered by name), or a fine-tuned
model or checkpoint of one of the caller's jobs (``ft:<base>:<suffix>:<job id>``,
``ft:<base>:<suffix>:<job id>:ckpt-step-<N>``). Paths are refused: a job could otherwise train on, or
probe, any folder of the node, other users' fine-tuned models included.

A fine-tuned model lives in ``<data_dir>/jobs/<job id>/model`` and its checkpoints in
``<data_dir>/jobs/<job id>/checkpoints/step-NNNNNN``; clients only ever see the names.

The shape of a model (``lomo_core.memory_model``) is cached by the content of its config.json and the
size of its tokenizer by its files' sizes and modification times, so that creating and estimating jobs
does not rebuild the model or reload the tokenizer each time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from jobs.errors import Conflict, InvalidRequest, NotFound, Problem, ServiceError
from jobs.models import Checkpoint, Job, RegisteredModel, owned, utcnow
from jobs.settings import Settings
from jobs.states import ACTIVE, JobStatus

if TYPE_CHECKING:
    from lomo_core.memory_model import ModelShape


class UnusableModel(ValueError):
    """A reference to something that exists (a job's model or checkpoint of the caller) but cannot be
    loaded as a model; the message says why and what to use instead."""


class ModelNotDeletable(ServiceError):
    """A registered base model (the deployment's, not the caller's to delete), or a checkpoint's name
    (checkpoints go with their fine-tuned model)."""


# ---------------------------------------------------------------------------------------------- folders
class OutsideTheRoots(UnusableModel):
    """A registered name whose folder is a link leading out of its model folder."""


def plain_name(name: str) -> bool:
    """Whether ``name`` is a name (of a registered model), not a path: no '/', '\\', NUL, and not '.' or
    '..' or hidden."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\x00")


def registered_folder(settings: Settings, name: str, session: Session | None = None) -> Path | None:
    """The folder of the registered model ``name``: a sub-folder of one of ``settings.model_dirs`` with a
    config.json, or (with ``session``) a folder an admin registered by that name; None for anything else,
    paths included. A sub-folder that is a link leading out of its model folder raises OutsideTheRoots."""
    if not plain_name(name):
        return None
    for root in settings.model_dirs:
        candidate = Path(root) / name
        try:
            if not (candidate / "config.json").is_file():
                continue
            folder, inside = candidate.resolve(), Path(root).resolve()
        except (OSError, ValueError):  # a name too long for the file system: not a model
            continue
        if not folder.is_relative_to(inside) or not (folder / "config.json").resolve().is_relative_to(inside):
            raise OutsideTheRoots(f"{name!r} is a link that leads out of the deployment's model folders; ask an "
                                  "admin to register that folder (POST /v1/admin/models)")
        return folder
    if session is not None:
        row = session.get(RegisteredModel, name)
        if row is not None and _is_model_folder(Path(row.path)):
            return Path(row.path)
    return None


def registered_models(settings: Settings, session: Session | None = None) -> list[str]:
    """The names of the registered models: the sub-folders of ``model_dirs`` in their order (a name once,
    as it resolves; links out of the folders left out), then (with ``session``) the admins' registrations."""
    names: list[str] = []
    for root in settings.model_dirs:
        if Path(root).is_dir():
            for name in sorted(p.name for p in Path(root).iterdir() if (p / "config.json").is_file()):
                try:
                    usable = registered_folder(settings, name) is not None
                except OutsideTheRoots:
                    usable = False
                if usable and name not in names:
                    names.append(name)
    if session is not None:
        names += [row.name for row in session.scalars(select(RegisteredModel).order_by(RegisteredModel.name))
                  if row.name not in names and _is_model_folder(Path(row.path))]
    return names


def register_model(session: Session, settings: Settings, admin: str, name: str, path: str) -> RegisteredModel:
    """Register the folder ``path`` of this host (absolute, with a config.json, outside the data folder,
    where the users' files and jobs are) as the base model ``name``. A name taken is a Conflict."""
    problems = []
    if not plain_name(name) or len(name) > 200:
        problems.append(Problem("name", f"{name[:80]!r} is not a model name: up to 200 characters, no '/', "
                                        "'\\' or NUL, not starting with '.'"))
    elif parse_fine_tuned(name) is not None or name.startswith("ft:"):
        problems.append(Problem("name", "names starting with 'ft:' are those of fine-tuned models"))
    folder = Path(path)
    if not folder.is_absolute():
        problems.append(Problem("path", "must be an absolute path of a folder on the service's host"))
    elif not _is_model_folder(folder):
        problems.append(Problem("path", "is not a model folder: no config.json there (or it cannot be read)"))
    elif folder.resolve().is_relative_to(settings.data_dir.resolve()):
        problems.append(Problem("path", "is inside the service's data folder, where the users' files and jobs are"))
    if problems:
        raise InvalidRequest(problems)
    taken = session.get(RegisteredModel, name) is not None
    try:
        taken = taken or registered_folder(settings, name) is not None
    except OutsideTheRoots:
        taken = True
    if taken:
        raise Conflict(f"a registered model named {name!r} exists already", code="model_exists")
    row = RegisteredModel(name=name, path=str(folder.resolve()), registered_by=admin, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def unregister_model(session: Session, name: str) -> RegisteredModel:
    """Forget an admin's registration (the folder stays); the sub-folders of ``model_dirs`` are not
    registrations and answer NotFound, as unknown names do."""
    row = session.get(RegisteredModel, name)
    if row is None:
        raise NotFound("registered_model", name)
    session.delete(row)
    return row


def registrations(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def job_folder(settings: Settings, job_id: str) -> Path:
    """A job's output folder (``admission.job_output_dir``): the run's config, logs, model, checkpoints."""
    from jobs.admission import job_output_dir  # admission imports this module

    return job_output_dir(settings, job_id)


def model_folder(settings: Settings, job: Job) -> Path:
    """Where a job's fine-tuned model is (``<data_dir>/jobs/<job id>/model``), whether or not it exists."""
    return job_folder(settings, job.id) / "model"


def checkpoint_folder(settings: Settings, checkpoint: Checkpoint) -> Path:
    """Where a checkpoint's folder is on this host. The worker records its node's absolute path, inside
    the job's folder (``<data_dir>/jobs/<job id>/checkpoints/step-NNNNNN``, or ``.../<job id>/model`` for
    the final model listed as the last checkpoint); every host sees the data folder but may mount it
    elsewhere, so the part after ``jobs/<job id>/`` is read under this host's job folder. A relative path
    is read relative to the job folder; any other path as it is."""
    stored = PurePath(checkpoint.path)
    root = job_folder(settings, checkpoint.job_id)
    if not stored.is_absolute():
        return root / stored
    parts = stored.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == checkpoint.job_id and parts[i - 1] == "jobs":
            return root.joinpath(*parts[i + 1:])
    return Path(stored)


def _is_model_folder(folder: Path) -> bool:
    try:
        return (folder / "config.json").is_file()
    except (OSError, ValueError):
        return False


def _is_partitioned(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("zero3-rank-*.pt"))


# ---------------------------------------------------------------------------------------------- references
def resolve_reference(session: Session, settings: Settings, owner: str | None, reference: str) -> Path | None:
    """The folder a job's ``model`` names, or None when it names nothing ``owner`` may use (any user's
    models for None, an admin).

    A fine-tuned model's name resolves when its job is ``owner``'s, succeeded, saved a final model and
    the model was not deleted; a checkpoint's name when the job is ``owner``'s, has that checkpoint (not
    removed), the job's model was not deleted, and the folder is a Hugging Face model folder. Anything
    else must be a registered model's name (``registered_folder``): a path, absolute or relative, is
    refused. Raises UnusableModel, saying why and what to name instead, for a path, a registered name
    that leads out of the model folders, and a model or checkpoint of ``owner`` that exists (or existed)
    but cannot be loaded."""
    parsed = parse_fine_tuned(reference)
    if parsed is None:
        if not plain_name(reference):
            raise UnusableModel("a job names its model, not a path: a registered model (GET /v1/models lists "
                                "them; an admin registers a folder with POST /v1/admin/models) or one of your "
                                "fine-tuned models or checkpoints (ft:...)")
        return registered_folder(settings, reference, session)
    job_id, step = parsed
    job = session.get(Job, job_id)
    if job is None or not owned(job.owner_id, owner):
        return None
    if step is None:
        if fine_tuned_name(job.model, job.suffix, job.id) != reference:
            return None
        if job.status != JobStatus.SUCCEEDED.value:
            raise UnusableModel(f"job {job.id} has not succeeded (it is {job.status}): {reference} does not exist; "
                                "name a checkpoint of the job, or wait until it has succeeded")
        if not job.fine_tuned_model:
            raise UnusableModel(f"job {job.id} saved no final model (save_final_model=false); name one of its "
                                f"checkpoints ({reference}:ckpt-step-<N>)")
        _check_not_deleted(job, reference)
        folder = model_folder(settings, job)
        if not _is_model_folder(folder):
            raise UnusableModel(f"the files of {reference} are gone from the service's data folder")
        return folder
    if checkpoint_name(job.model, job.suffix, job.id, step) != reference:
        return None
    row = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
                          .order_by(Checkpoint.id.desc())).first()
    if row is None:
        raise UnusableModel(f"job {job.id} has no checkpoint at step {step}; "
                            f"GET /v1/fine_tuning/jobs/{job.id}/checkpoints lists them")
    _check_not_deleted(job, reference)
    if row.deleted_at is not None:
        raise UnusableModel(f"checkpoint {reference} was removed (the job keeps only its last keep_checkpoints); "
                            "name a later checkpoint or the fine-tuned model")
    folder = checkpoint_folder(settings, row)
    if _is_model_folder(folder):
        return folder
    if _is_partitioned(folder):
        raise UnusableModel(f"checkpoint {reference} was saved partitioned over the job's {job.gpus} devices "
                            "(ZeRO-3 shards, no config.json or weights): it can resume that job but is not a "
                            "model folder; name the job's fine-tuned model instead")
    raise UnusableModel(f"the files of checkpoint {reference} are gone from the service's data folder")


def _check_not_deleted(job: Job, reference: str) -> None:
    if job.model_deleted_at is not None:
        raise UnusableModel(f"{reference} was deleted (DELETE /v1/models), with its checkpoints")


# ---------------------------------------------------------------------------------------------- shape, vocabulary
def _config_bytes(folder: str | Path) -> tuple[Path, bytes]:
    folder = Path(folder).resolve()
    return folder, (folder / "config.json").read_bytes()


#: transformers imports its classes lazily, and that is not thread-safe: two API threads reading a model or a
#: tokenizer for the first time at once can get an ImportError. Cache misses take this lock (hits do not).
_TRANSFORMERS = threading.Lock()


@functools.lru_cache(maxsize=128)
def _shape_of(folder: str, digest: str, config_text: str) -> ModelShape:
    from lomo_core import memory_model

    with _TRANSFORMERS:
        return memory_model.model_shape(json.loads(config_text))


def model_shape(folder: str | Path) -> ModelShape:
    """``lomo_core.memory_model.model_shape`` of a model folder, cached by the folder and the content of
    its config.json (a changed config is read again)."""
    path, config = _config_bytes(folder)
    return _shape_of(str(path), hashlib.sha256(config).hexdigest(), config.decode())


#: the files a tokenizer may be read from; a folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "added_tokens.json", "special_tokens_map.json")


def _tokenizer_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    found = []
    for name in TOKENIZER_FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            continue
        found.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


@functools.lru_cache(maxsize=128)
def _tokenizer_size_of(folder: str, fingerprint: tuple[tuple[str, int, int], ...]) -> int | None:
    with _TRANSFORMERS:
        from transformers import AutoTokenizer

        try:
            return len(AutoTokenizer.from_pretrained(folder))
        except Exception:  # noqa: BLE001 - not a tokenizer this check can read: training reports its own error
            return None


def tokenizer_size(folder: str | Path) -> int | None:
    """``len(tokenizer)`` of the tokenizer saved in a model folder (base vocabulary and added tokens), or
    None when the folder has no tokenizer (or none that loads); cached by the tokenizer files' size and
    modification time."""
    path = Path(folder).resolve()
    fingerprint = _tokenizer_fingerprint(path)
    if not fingerprint:
        return None
    return _tokenizer_size_of(str(path), fingerprint)


def _vocab_size(config: dict[str, Any]) -> int | None:
    for values in (config, config.get("text_config") or {}):
        if isinstance(values, dict) and isinstance(values.get("vocab_size"), int):
            return values["vocab_size"]
    return None


def vocabulary_problem(folder: str | Path, reference: str) -> str | None:
    """Why the tokenizer of a model folder can produce ids its embedding has no row for, or None (also
    for a folder without a tokenizer). ``reference`` is how the message names the model."""
    try:
        vocab = _vocab_size(json.loads(_config_bytes(folder)[1]))
    except (OSError, ValueError):  # no readable config: what loads the model reports it
        return None
    size = tokenizer_size(folder)
    if vocab is None or size is None or size <= vocab:
        return None
    return (f"the tokenizer of {reference} has {size} tokens (with its added tokens) but the model's embedding has "
            f"{vocab} rows (config.json vocab_size): token ids {vocab} to {size - 1} would fail in training "
            "('index out of range'); resize the embeddings with model.resize_token_embeddings(len(tokenizer)) "
            "and save the model with its tokenizer, or use a tokenizer without the added tokens")


# ---------------------------------------------------------------------------------------------- the models API
@dataclass(frozen=True)
class ModelEntry:
    """A model as ``/v1/models`` shows it: a registered base model, or a fine-tuned model or checkpoint."""

    id: str
    created: datetime
    owned_by: str
    job_id: str | None = None
    step: int | None = None

    @property
    def is_base(self) -> bool:
        return self.job_id is None


def _mtime(folder: Path) -> datetime:
    return datetime.fromtimestamp(folder.stat().st_mtime, tz=timezone.utc)


def _fine_tuned_entry(job: Job) -> ModelEntry:
    return ModelEntry(id=job.fine_tuned_model, created=job.finished_at or job.created_at, owned_by=job.owner_id,
                      job_id=job.id)


def list_models(session: Session, settings: Settings, owner: str | None) -> list[ModelEntry]:
    """The registered base models (by name), then ``owner``'s fine-tuned models (every user's for None),
    oldest first."""
    entries = []
    for name in registered_models(settings, session):
        folder = registered_folder(settings, name, session)
        if folder is not None:
            entries.append(ModelEntry(id=name, created=_mtime(folder), owned_by="system"))
    query = select(Job).where(Job.status == JobStatus.SUCCEEDED.value, Job.fine_tuned_model.is_not(None),
                              Job.model_deleted_at.is_(None))
    if owner is not None:
        query = query.where(Job.owner_id == owner)
    jobs = session.scalars(query.order_by(Job.finished_at, Job.id))
    entries += [_fine_tuned_entry(job) for job in jobs]
    return entries


def get_model(session: Session, settings: Settings, owner: str | None, name: str) -> ModelEntry:
    """A registered base model, or a fine-tuned model or checkpoint of ``owner`` (any user's for None)
    that was not deleted; NotFound otherwise (another owner's models are not found either)."""
    parsed = parse_fine_tuned(name)
    if parsed is None:
        try:
            folder = registered_folder(settings, name, session)
        except OutsideTheRoots:
            folder = None
        if folder is None:
            raise NotFound("model", name)
        return ModelEntry(id=name, created=_mtime(folder), owned_by="system")
    job_id, step = parsed
    job = session.get(Job, job_id)
    if job is None or not owned(job.owner_id, owner) or job.model_deleted_at is not None:
        raise NotFound("model", name)
    if step is None:
        if job.status != JobStatus.SUCCEEDED.value or job.fine_tuned_model != name:
            raise NotFound("model", name)
        return _fine_tuned_entry(job)
    row = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step,
                                                   Checkpoint.deleted_at.is_(None))
                          .order_by(Checkpoint.id.desc())).first()
    if row is None or checkpoint_name(job.model, job.suffix, job.id, step) != name:
        raise NotFound("model", name)
    return ModelEntry(id=name, created=row.created_at, owned_by=job.owner_id, job_id=job.id, step=step)


def jobs_using(session: Session, settings: Settings, name: str, job: Job) -> list[str]:
    """Queued or running jobs whose ``model`` is the fine-tuned model ``name`` of ``job`` or one of its
    checkpoints (models are named, never reached by a path)."""
    return list(session.scalars(
        select(Job.id).where(Job.status.in_(ACTIVE),
                             or_(Job.model == name, Job.model.startswith(f"{name}:ckpt-step-", autoescape=True)))
        .order_by(Job.created_at, Job.id)))


def delete_model(session: Session, settings: Settings, owner: str | None, name: str) -> Job:
    """Delete ``owner``'s fine-tuned model ``name``: its folder and its checkpoints' folders are removed,
    the job is marked (``model_deleted_at``, and its checkpoints' ``deleted_at``); the job row stays.

    NotFound for an unknown model or another owner's; ModelNotDeletable for a registered base model or
    a checkpoint's name; Conflict when a queued or running job trains from it."""
    entry = get_model(session, settings, owner, name)
    if entry.is_base:
        raise ModelNotDeletable(f"{name} is a registered base model of this deployment (owned by system); only "
                                "fine-tuned models (ft:...) can be deleted")
    if entry.step is not None:
        raise ModelNotDeletable(f"{name} is a checkpoint; checkpoints are deleted with their fine-tuned model "
                                f"(DELETE /v1/models/{name.rsplit(':', 1)[0]})")
    job = session.get(Job, entry.job_id)
    users = jobs_using(session, settings, name, job)
    if users:
        raise Conflict(f"model {name} is the model of job(s) {', '.join(users)} that have not finished; cancel "
                       "them or wait until they end", code="model_in_use")
    now = utcnow()
    job.model_deleted_at = now
    for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.deleted_at.is_(None))):
        row.deleted_at = now
    session.flush()
    root = job_folder(settings, job.id)
    shutil.rmtree(root / "model", ignore_errors=True)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    return job


def describe_model(session: Session, settings: Settings, owner: str | None, entry: ModelEntry) -> dict[str, Any]:
    """What a list of models shows of one (the portal's): its kind, its size on disk and weight format, its
    architecture, dtype and parameter count, and the job that made it; never its path. Figures that cannot
    be read (a folder gone or unreadable) are None."""
    kind = "base" if entry.is_base else ("checkpoint" if entry.step is not None else "fine-tuned")
    info: dict[str, Any] = {"id": entry.id, "kind": kind, "created": entry.created, "owned_by": entry.owned_by,
                            "job_id": entry.job_id, "step": entry.step, "bytes": None, "format": None,
                            "architecture": None, "dtype": None, "parameters": None}
    try:
        folder = (registered_folder(settings, entry.id, session) if entry.is_base
                  else resolve_reference(session, settings, owner, entry.id))
    except (UnusableModel, NotFound, OSError):
        folder = None
    if folder is None or not folder.is_dir():
        return info
    try:
        present = [p for p in folder.iterdir() if p.is_file()]
        info["bytes"] = sum(p.stat().st_size for p in present)
        kinds = {"safetensors" for p in present if p.suffix == ".safetensors"}
        kinds |= {"pytorch (.bin)" for p in present if p.suffix == ".bin"}
        info["format"] = ", ".join(sorted(kinds)) or None
        config = json.loads((folder / "config.json").read_text())
        info["architecture"] = (config.get("architectures") or [config.get("model_type")])[0]
        info["dtype"] = config.get("torch_dtype") or config.get("dtype")
        info["parameters"] = model_shape(folder).parameters
    except Exception:  # a model the memory model cannot read still lists, with what could be read
        pass
    return info


#: what ``from_pretrained`` reads of a model folder (weights, config, tokenizer); never trainer or
#: optimizer state
MODEL_FILES = ("config.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
               "preprocessor_config.json", *TOKENIZER_FILES)
MODEL_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


def model_files(folder: Path) -> list[Path]:
    """The regular files of a model folder that a copy of the model needs, by name (symbolic links are
    left out: only what the job wrote is served)."""
    chosen = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        if path.name in MODEL_FILES or any(path.match(p) for p in MODEL_FILE_PATTERNS):
            chosen.append(path)
    return chosen


# ---------------------------------------------------------------------------------------------- names
#: fine-tuned models and checkpoints are named like OpenAI's: ``ft:<base>:<suffix>:<job id>`` and
#: ``ft:<base>:<suffix>:<job id>:ckpt-step-<N>`` (the suffix may be empty); never a path of the node
FINE_TUNED_PREFIX = "ft:"


def base_name(model_reference: str) -> str:
    """The base model's name in a fine-tuned model's name: a registered model's name, a folder's last
    part, or the base of a fine-tuned model that was itself fine-tuned (a ':' becomes '-', so that the
    name parses back)."""
    if model_reference.startswith(FINE_TUNED_PREFIX):
        return model_reference.split(":")[1]
    return (Path(model_reference.rstrip("/")).name or "model").replace(":", "-")


def fine_tuned_name(model_reference: str, suffix: str | None, job_id: str) -> str:
    return f"{FINE_TUNED_PREFIX}{base_name(model_reference)}:{suffix or ''}:{job_id}"


def checkpoint_name(model_reference: str, suffix: str | None, job_id: str, step: int) -> str:
    return f"{fine_tuned_name(model_reference, suffix, job_id)}:ckpt-step-{step}"


def parse_fine_tuned(name: str) -> tuple[str, int | None] | None:
    """(job id, checkpoint step or None) of a fine-tuned model's or checkpoint's name; None otherwise."""
    if not name.startswith(FINE_TUNED_PREFIX):
        return None
    parts = name.split(":")
    if len(parts) == 4 and parts[3]:
        return parts[3], None
    if len(parts) == 5 and parts[3] and parts[4].startswith("ckpt-step-") and parts[4][10:].isdigit():
        return parts[3], int(parts[4][10:])
    return None
