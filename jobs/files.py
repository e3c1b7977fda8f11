"""Files: uploads checked line by line, and the files jobs produce (results), stored under the data
folder and soft-deleted.

A refused upload leaves no trace; a row never points at nothing (the file is moved into place first).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from jobs.errors import Conflict, InvalidRequest, NotFound, Problem
from jobs.models import File, Job, new_id, owned, utcnow
from jobs.settings import Settings
from jobs.states import ACTIVE
from jobs.users import ensure_user
from lomo_core.data import DataError, check_file

#: the longest name an uploaded file may have (it is kept only as a label: files are stored by id)
MAX_FILENAME = 255


def store_file(
    session: Session, settings: Settings, owner: str, filename: str, purpose: str, upload: Path
) -> File:
    """Validate an uploaded file (already on disk at ``upload``) and keep it; every problem names its line.

    The file is moved into the data folder before its row is written, so a row never points at
    nothing; a refused upload leaves no trace.
    """
    name = Path(filename or "upload.jsonl").name
    if len(name) > MAX_FILENAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidRequest([Problem("file", f"the file's name must be at most {MAX_FILENAME} characters, with "
                                              "no control characters")])
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


def store_result_file(
    session: Session, settings: Settings, owner: str, filename: str, content: bytes,
    purpose: str = "fine-tune-results",
) -> File:
    """Keep a file a job produced (e.g. its results CSV) for ``owner``, without the training-data check.

    ``records`` counts the lines after the first (a CSV's header); ``format`` is ``"csv"``. The bytes
    are written to a temporary name and renamed into place before the row is added, so a row never
    points at a partial file.
    """
    name = Path(filename or "results.csv").name
    suffix = Path(name).suffix.lower() or ".csv"
    ensure_user(session, owner)
    file_id = new_id("file")
    relative = Path("files") / f"{file_id}{suffix}"
    target = settings.data_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(content)
    os.replace(partial, target)
    lines = content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
    row = File(id=file_id, owner_id=owner, filename=name, purpose=purpose, bytes=len(content),
               storage_path=str(relative), records=max(lines - 1, 0), data_format="csv")
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
            raise DataError("the file is not UTF-8 text") from None
    if path.suffix == ".json":
        raise DataError("an evaluation file is .jsonl (one example per line) or .txt")
    return _EvalUploadCheck(records, errors[:max_errors], len(errors) > max_errors)


def get_file(session: Session, owner: str | None, file_id: str) -> File:
    """``owner``'s file (any user's for None, an admin); another user's is not found, as an unknown id."""
    row = session.get(File, file_id)
    if row is None or not owned(row.owner_id, owner) or row.deleted_at is not None:
        raise NotFound("file", file_id)
    return row


def list_files(
    session: Session, owner: str | None, purpose: str | None = None, after: str | None = None, limit: int = 10000,
    order: str = "desc",
) -> tuple[list[File], bool]:
    """The owner's files (every user's for None) by ``created_at`` (then id), newest first unless
    ``order`` is ``"asc"``, at most ``limit`` of them, and whether more follow.

    ``after`` is the id of the last file of the previous page; a file deleted since still marks its
    place, an id the owner never had is an InvalidRequest naming ``after``.
    """
    query = select(File).where(File.deleted_at.is_(None))
    if owner is not None:
        query = query.where(File.owner_id == owner)
    if purpose:
        query = query.where(File.purpose == purpose)
    if after is not None:
        cursor = session.get(File, after)
        if cursor is None or not owned(cursor.owner_id, owner):
            raise InvalidRequest([Problem("after", f"no file with id {after!r}")])
        if order == "asc":
            query = query.where(or_(File.created_at > cursor.created_at,
                                    and_(File.created_at == cursor.created_at, File.id > cursor.id)))
        else:
            query = query.where(or_(File.created_at < cursor.created_at,
                                    and_(File.created_at == cursor.created_at, File.id < cursor.id)))
    if order == "asc":
        query = query.order_by(File.created_at.asc(), File.id.asc())
    else:
        query = query.order_by(File.created_at.desc(), File.id.desc())
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def jobs_using(session: Session, owner: str, file_id: str) -> list[str]:
    """The ids of the jobs that have not finished and name the file: as training or validation file
    (any owner's job), or in an evaluation (``file`` or ``fewshot_file``) of one of the owner's jobs."""
    users = set(session.scalars(
        select(Job.id).where(
            or_(Job.training_file_id == file_id, Job.validation_file_id == file_id), Job.status.in_(ACTIVE)
        )
    ))
    # evals is a JSON list: read the owner's unfinished jobs' lists and look in Python (the same on
    # SQLite and Postgres); only jobs of the file's owner may name it
    for job_id, evals in session.execute(
        select(Job.id, Job.evals).where(Job.owner_id == owner, Job.status.in_(ACTIVE))
    ):
        for spec in evals or []:
            if isinstance(spec, dict) and file_id in (spec.get("file"), spec.get("fewshot_file")):
                users.add(job_id)
    return sorted(users)


def delete_file(session: Session, settings: Settings, owner: str | None, file_id: str) -> File:
    """Remove the stored bytes and mark the row deleted; a Conflict while an unfinished job names it."""
    row = get_file(session, owner, file_id)
    users = jobs_using(session, row.owner_id, file_id)
    if users:
        raise Conflict(f"file {file_id} is used by job(s) {', '.join(users)} that have not finished")
    (settings.data_dir / row.storage_path).unlink(missing_ok=True)
    row.deleted_at = utcnow()  # the row stays: finished jobs still name the file they were trained on
    return row


def file_path(settings: Settings, row: File) -> Path:
    return (settings.data_dir / row.storage_path).resolve()
