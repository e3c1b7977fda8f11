"""``/v1/files``: upload (streamed to disk, checked line by line), list, read, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from api.deps import CallerDep, DatabaseDep, SessionDep, SettingsDep
from api.errors import CONFLICT, ERRORS, TOO_LARGE, error_response
from api.schemas import FileDeleted, FileList, FileObject
from api.views import file_object
from jobs import files
from jobs.schemas import FilePurpose

router = APIRouter(prefix="/v1/files", tags=["files"])
CHUNK = 1 << 20


@router.post("", response_model=FileObject, responses={**ERRORS, **TOO_LARGE},
             summary="Upload a training or validation file (checked line by line)")
async def upload_file(
    request: Request, settings: SettingsDep, db: DatabaseDep, caller: CallerDep,
    file: Annotated[UploadFile, File(description=".jsonl, .json or .txt")],
    purpose: Annotated[FilePurpose, Form()] = "fine-tune",
) -> Any:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + (1 << 16):
        return error_response(413, f"the upload is {int(declared)} bytes, over the limit of {limit}", "too_large",
                              "file")
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=uploads, delete=False, suffix=".part") as tmp:
        size = 0
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                tmp.close()
                Path(tmp.name).unlink(missing_ok=True)
                return error_response(413, f"the upload is over the limit of {limit} bytes", "too_large", "file")
            tmp.write(chunk)
    part = Path(tmp.name)
    try:
        with db.session() as session:
            row = files.store_file(session, settings, caller.user_id, file.filename or "", purpose, part)
            return file_object(row)
    finally:
        for leftover in uploads.glob(part.stem + ".*"):
            leftover.unlink(missing_ok=True)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, caller: CallerDep, purpose: str | None = None) -> Any:
    return FileList(data=[file_object(r) for r in files.list_files(session, caller.user_id, purpose)])


@router.get("/{file_id}", response_model=FileObject, responses=ERRORS)
def get_file(file_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return file_object(files.get_file(session, caller.user_id, file_id))


@router.delete("/{file_id}", response_model=FileDeleted, responses={**ERRORS, **CONFLICT})
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    files.delete_file(session, settings, caller.user_id, file_id)
    return FileDeleted(id=file_id)
