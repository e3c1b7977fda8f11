"""``/v1/models``: the registered base models and the caller's fine-tuned models, in OpenAI's shapes (the
``openai`` SDK's ``models.list / retrieve / delete`` work unmodified); and a model's files as a tar archive
(``/content``), streamed file by file. Models are named, never shown by their path on the server."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, SessionDep, SessionRoute, SettingsDep
from api.errors import CONFLICT, ERRORS, FORBIDDEN, error_response
from api.schemas import ModelDeleted, ModelList, ModelObject
from api.views import unix
from jobs import catalog
from jobs.errors import InvalidRequest, NotFound, Problem

router = APIRouter(route_class=SessionRoute, prefix="/v1/models", tags=["models"])
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


def model_object(entry: catalog.ModelEntry) -> ModelObject:
    return ModelObject(id=entry.id, created=unix(entry.created) or 0, owned_by=entry.owned_by)


@router.get("", response_model=ModelList, responses=ERRORS,
            summary="The registered base models and your fine-tuned models")
def list_models(
    session: SessionDep, settings: SettingsDep, caller: CallerDep,
    after: str | None = Query(None, description="id of the last model of the previous page"),
    limit: int | None = Query(None, ge=1, le=1000, description="at most this many (all when unset)"),
    user: str | None = Query(None, max_length=200, description="admins: only this user's fine-tuned models (a "
                                                              "name or an id), with the base models"),
) -> Any:
    entries = catalog.list_models(session, settings, caller.listing(session, user))
    start = 0
    if after is not None:
        ids = [e.id for e in entries]
        if after not in ids:
            raise InvalidRequest([Problem("after", f"no model with id {after!r}")])
        start = ids.index(after) + 1
    page = entries[start:] if limit is None else entries[start:start + limit]
    return ModelList(data=[model_object(e) for e in page], has_more=start + len(page) < len(entries))


@router.get("/{model_id}", response_model=ModelObject, responses=ERRORS,
            summary="A registered base model, or one of your fine-tuned models or checkpoints")
def get_model(model_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    return model_object(catalog.get_model(session, settings, caller.scope, model_id))


@router.delete("/{model_id}", response_model=ModelDeleted, responses={**ERRORS, **CONFLICT, **FORBIDDEN},
               summary="Delete one of your fine-tuned models (its files and its checkpoints; the job stays)")
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    try:
        catalog.delete_model(session, settings, caller.scope, model_id)
    except catalog.ModelNotDeletable as e:
        return error_response(403, str(e), "model_not_deletable", "model")
    return ModelDeleted(id=model_id)


@router.get("/{model_id}/content", responses={**ERRORS, **FORBIDDEN,
                                              200: {"content": {"application/x-tar": {}},
                                                    "description": "a tar archive of one folder"}},
            response_class=StreamingResponse,
            summary="A fine-tuned model's or checkpoint's files (what from_pretrained loads), as a tar archive")
def model_content(model_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    entry = catalog.get_model(session, settings, caller.scope, model_id)
    if entry.is_base:
        return error_response(403, f"{model_id} is a registered base model of this deployment; only fine-tuned "
                                   "models and their checkpoints are served for download", "model_not_downloadable",
                              "model")
    try:
        folder = catalog.resolve_reference(session, settings, caller.scope, model_id)
    except catalog.UnusableModel as e:
        raise InvalidRequest([Problem("model", str(e))], code="model_not_usable") from None
    if folder is None:
        raise NotFound("model", model_id)
    root = archive_root(model_id)
    members = [(f"{root}/{path.name}", path, path.stat()) for path in catalog.model_files(folder)]
    headers = [_header(root, tarfile.DIRTYPE, 0, max((s.st_mtime for *_, s in members), default=0))]
    headers += [_header(name, tarfile.REGTYPE, stat.st_size, stat.st_mtime) for name, _path, stat in members]
    files = [(path, stat.st_size) for _name, path, stat in members]
    return StreamingResponse(
        _tar_stream(headers, files), media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{root}.tar"',
                 "Content-Length": str(_archive_length(headers, files))})


# ---------------------------------------------------------------------------------------------- the archive
def archive_root(model_id: str) -> str:
    """The folder the archive unpacks to: the model's name with anything but letters, digits, '.', '_'
    and '-' replaced by '-' (``ft:stories260K:demo:ftjob-1`` -> ``ft-stories260K-demo-ftjob-1``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", model_id).strip(".") or "model"


def _header(name: str, kind: bytes, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, int(mtime)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int, unit: int = BLOCK) -> int:
    return -size % unit


def _archive_length(headers: list[bytes], files: list[tuple[Path, int]]) -> int:
    total = sum(len(h) for h in headers) + sum(size + _padding(size) for _path, size in files) + 2 * BLOCK
    return total + _padding(total, RECORD)


def _tar_stream(headers: list[bytes], files: list[tuple[Path, int]]) -> Iterator[bytes]:
    """A tar archive, produced a chunk at a time: each file is read in CHUNK pieces, never held whole.
    A file is sent with the size its header declares (cut or padded with zeros if it changed meanwhile),
    so the archive is always well formed and as long as announced."""
    total = len(headers[0])
    yield headers[0]
    for header, (path, size) in zip(headers[1:], files, strict=True):
        yield header
        sent = 0
        with path.open("rb") as f:
            while sent < size and (chunk := f.read(min(CHUNK, size - sent))):
                sent += len(chunk)
                yield chunk
        if sent < size:
            yield bytes(size - sent)
        yield bytes(_padding(size))
        total += len(header) + size + _padding(size)
    total += 2 * BLOCK
    yield bytes(2 * BLOCK + _padding(total, RECORD))
