"""``/v1/files``: upload, list, read, download, delete (OpenAI's files API).

An upload's multipart body is parsed as it arrives: the file part goes to a temporary file under
``data_dir/uploads`` chunk by chunk and the upload is refused (413) as soon as it is over
``max_upload_bytes``, whatever the headers say. The check of the file (line by line, up to the limit)
and its storing run in a worker thread with their own session, so the event loop keeps answering.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Annotated, Any, Literal, get_args
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import CallerDep, DatabaseDep, SessionDep, SessionRoute, SettingsDep
from api.errors import CONFLICT, ERRORS, OVER_QUOTA, TOO_LARGE, UNSUPPORTED, error_response
from api.schemas import FileDeleted, FileList, FileObject
from api.views import file_object
from jobs import files, idempotency, quotas
from jobs.db import Database
from jobs.errors import InvalidRequest, NotFound, Problem, UnsupportedMediaType
from jobs.schemas import FilePurpose
from jobs.settings import Settings

router = APIRouter(route_class=SessionRoute, prefix="/v1/files", tags=["files"])

#: the Idempotency-Key route name of an upload
ROUTE = "files.create"
#: the purposes an upload may have
PURPOSES: tuple[str, ...] = get_args(FilePurpose)
#: what a multipart body may carry besides the file's bytes (boundaries, part headers, the purpose)
OVERHEAD = 1 << 16
#: file bytes are written to disk in a worker thread once this many are buffered
WRITE_CHUNK = 1 << 20
#: bytes read per chunk when a file's content is sent
READ_CHUNK = 1 << 20
#: the longest purpose value read (longer is refused)
MAX_PURPOSE = 64

#: the request body, declared by hand: the route reads the stream itself, not through Form/UploadFile
UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream", "title": "File",
                     "description": ".jsonl, .json or .txt"},
            "purpose": {"type": "string", "enum": list(PURPOSES), "title": "Purpose", "default": "fine-tune"},
        },
    }}},
}

#: the 200 answer of ``/content``: bytes, not JSON
CONTENT_ANSWER: dict[int | str, dict[str, Any]] = {200: {
    "description": "The stored bytes of the file",
    "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType":
                                                        "application/octet-stream"}}},
}}


class _TooLarge(Exception):
    pass


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _purpose(raw: bytes) -> str:
    value = _decode(raw)
    if value not in PURPOSES:
        allowed = ", ".join(repr(p) for p in PURPOSES)
        raise InvalidRequest([Problem("purpose", f"must be one of {allowed}, not {value[:MAX_PURPOSE]!r}")])
    return value


class _UploadForm:
    """The parts of one upload body: the ``file`` part's bytes go to ``sink``, ``purpose`` is kept,
    any other part is read and dropped. Too many bytes raise ``_TooLarge``; bad input InvalidRequest."""

    def __init__(self, sink: IO[bytes], limit: int) -> None:
        self.sink, self.limit = sink, limit
        self.filename: str | None = None  # set once the file part's headers are read
        self.size = 0
        self.purpose = "fine-tune"
        self.complete = False
        self._pending = bytearray()  # file bytes not written yet
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part: str | None = None  # "file", "purpose" or None (a part that is dropped)
        self._value = bytearray()

    # -- the parser's callbacks (synchronous: no I/O here) ------------------------------------------
    def _on_part_begin(self) -> None:
        self._disposition, self._part = b"", None
        self._value.clear()
        self._header_name.clear()
        self._header_value.clear()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _kind, options = parse_options_header(self._disposition)
        name = _decode(options.get(b"name", b""))
        if name == "file":
            if self.filename is not None:
                raise InvalidRequest([Problem("file", "only one file per upload")])
            # a part without a filename is taken as the file too (store_file names it upload.jsonl)
            self.filename = _decode(options.get(b"filename", b""))
            self._part = "file"
        elif name == "purpose":
            self._part = "purpose"

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.size += end - start
            if self.size > self.limit:
                raise _TooLarge
            self._pending += data[start:end]
        elif self._part == "purpose":
            self._value += data[start:end]
            if len(self._value) > MAX_PURPOSE:
                raise InvalidRequest([Problem("purpose", f"must be one of {', '.join(map(repr, PURPOSES))}")])

    def _on_part_end(self) -> None:
        if self._part == "purpose":
            self.purpose = _purpose(bytes(self._value))  # refused before the rest of the body is read
        self._part = None

    def _on_end(self) -> None:
        self.complete = True

    # -----------------------------------------------------------------------------------------------
    async def read(self, stream: AsyncIterator[bytes], boundary: bytes) -> None:
        """Feed the body to the parser as it arrives; file bytes are written in a worker thread."""
        callbacks = {
            "on_part_begin": self._on_part_begin, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_end": self._on_end,
        }
        received = 0
        try:
            parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
            async for chunk in stream:
                received += len(chunk)
                if received > self.limit + OVERHEAD:
                    raise _TooLarge
                parser.write(chunk)
                if len(self._pending) >= WRITE_CHUNK:
                    await self._flush()
        except FormParserError as e:
            raise InvalidRequest([Problem(None, f"the request body is not valid multipart/form-data: {e}")]) from None
        await self._flush()
        if not self.complete:
            raise InvalidRequest([Problem(None, "the multipart/form-data body ended before its closing boundary")])
        if self.filename is None:
            raise InvalidRequest([Problem("file", "required: a multipart/form-data part named 'file' with the "
                                                  "file's content")])

    async def _flush(self) -> None:
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            await run_in_threadpool(self.sink.write, data)


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        got = f"; got Content-Type {content_type!r}" if content_type else "; the request has no Content-Type"
        raise UnsupportedMediaType("the request body must be multipart/form-data with a 'file' part (and "
                                   "optionally 'purpose')" + got, param="file")
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest([Problem(None, "the multipart/form-data Content-Type has no boundary")])
    return boundary


def _too_large(limit: int, declared: int | None = None) -> JSONResponse:
    size = f"the upload is {declared} bytes, " if declared is not None else "the upload is "
    return error_response(413, f"{size}over the limit of {limit} bytes", "too_large", "file")


def _store(db: Database, settings: Settings, owner: str, filename: str, purpose: str, part: Path,
           key: str | None) -> FileObject:
    """Check and keep the uploaded file, in a worker thread with its own transaction; with a key an
    earlier request already used, the file that request made (a NotFound if it was deleted since)."""
    stored: Path | None = None
    try:
        with db.session() as session:
            known = idempotency.recall(session, owner, ROUTE, key)
            if known is not None:
                return file_object(files.get_file(session, owner, known))
            quotas.check_upload(session, settings, owner, part.stat().st_size)
            row = files.store_file(session, settings, owner, filename, purpose, part)
            stored = settings.data_dir / row.storage_path
            idempotency.remember(session, owner, ROUTE, key, row.id)
            answer = file_object(row)
        return answer
    except BaseException as e:
        if stored is not None:  # the row was rolled back: its bytes go too
            stored.unlink(missing_ok=True)
        if isinstance(e, IntegrityError) and key is not None:  # a concurrent request with this key won
            with db.session() as session:
                known = idempotency.recall(session, owner, ROUTE, key)
                if known is not None:
                    return file_object(files.get_file(session, owner, known))
        raise


def _upload_quota(db: Database, settings: Settings, owner: str) -> tuple[int | None, int]:
    with db.session() as session:
        return quotas.upload_quota(session, settings, owner)


@router.post("", response_model=FileObject, responses={**ERRORS, **TOO_LARGE, **OVER_QUOTA, **UNSUPPORTED},
             openapi_extra={"requestBody": UPLOAD_BODY},
             summary="Upload a training or evaluation file (checked line by line)")
async def upload_file(
    request: Request, settings: SettingsDep, db: DatabaseDep, caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key",
                                                  description="a retry with the same key returns the first "
                                                              "upload's file and stores nothing")] = None,
) -> Any:
    key = idempotency.check_key(idempotency_key)
    quota, used = await run_in_threadpool(_upload_quota, db, settings, caller.user_id)
    limit = settings.max_upload_bytes
    by_quota = quota is not None and quota - used < limit  # the quota's room, not the size limit, binds
    if by_quota:
        if quota - used <= 0:
            raise quotas.over_upload_quota(quota, used)
        limit = quota - used
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + OVERHEAD:
        if by_quota:
            raise quotas.over_upload_quota(quota, used, int(declared))
        return _too_large(limit, int(declared))
    boundary = _boundary(request.headers.get("content-type"))
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=uploads, suffix=".part")
    part = Path(name)
    try:
        with os.fdopen(handle, "wb") as sink:
            form = _UploadForm(sink, limit)
            await form.read(request.stream(), boundary)
        return await run_in_threadpool(_store, db, settings, caller.user_id, form.filename or "", form.purpose,
                                       part, key)
    except _TooLarge:
        if by_quota:  # refused as it streams, as soon as the bytes pass what is left of the quota
            raise quotas.over_upload_quota(quota, used, limit + 1, at_least=True) from None
        return _too_large(limit)
    except ClientDisconnect:  # nobody reads this answer; what was received is removed below
        return error_response(400, "the client disconnected during the upload", "client_disconnected")
    finally:
        # store_file renames the part to the file's suffix before checking it; whatever is left goes
        for leftover in uploads.glob(part.stem + ".*"):
            leftover.unlink(missing_ok=True)


@router.get("", response_model=FileList, responses=ERRORS)
def list_files(
    session: SessionDep, caller: CallerDep,
    after: str | None = Query(None, description="id of the last file of the previous page"),
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = Query("desc", description="by created_at"),
    purpose: str | None = Query(None, max_length=64, description="only the files with this purpose"),
    user: str | None = Query(None, max_length=200, description="admins: only this user's files (a name or an id)"),
) -> Any:
    rows, more = files.list_files(session, caller.listing(session, user), purpose, after, limit, order)
    data = [file_object(r) for r in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject, responses=ERRORS)
def get_file(file_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return file_object(files.get_file(session, caller.scope, file_id))


def _disposition(filename: str) -> str:
    """``attachment`` with the original name: plain when it is safe ASCII, else an ASCII stand-in
    and the exact name in RFC 5987's ``filename*``."""
    encoded = quote(filename, safe="")
    if encoded == filename:
        return f'attachment; filename="{filename}"'
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=utf-8''{encoded}"


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


@router.get("/{file_id}/content", response_class=StreamingResponse, responses={**CONTENT_ANSWER, **ERRORS},
            summary="The stored bytes of a file")
def file_content(file_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> StreamingResponse:
    row = files.get_file(session, caller.scope, file_id)
    try:  # opened here: a delete from now on does not cut the answer short
        handle = files.file_path(settings, row).open("rb")
    except FileNotFoundError:
        raise NotFound("file", file_id) from None
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(_chunks(handle), media_type="application/octet-stream",
                             headers={"Content-Length": str(size), "Content-Disposition": _disposition(row.filename)})


@router.delete("/{file_id}", response_model=FileDeleted, responses={**ERRORS, **CONFLICT})
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    files.delete_file(session, settings, caller.scope, file_id)
    return FileDeleted(id=file_id)
