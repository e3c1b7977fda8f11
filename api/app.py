"""The REST API (v1). Thin routes: validate input, call ``jobs.service``, shape the answer.

Errors follow one shape, ``{"error": {"message", "type", "code", "param", "details"}}``: 422 for input
that is wrong (the field or the line named), 404 for unknown ids, 409 for a request that conflicts with
a job's state, 413 for an upload over the limit. Anything a client sends gets one of these, not a 500.

Run with ``lomo serve`` or ``uvicorn --factory api.app:create_app``.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import (
    CheckpointList,
    CheckpointObject,
    ErrorResponse,
    EvalList,
    EvalObject,
    EventList,
    EventObject,
    FileDeleted,
    FileList,
    FileObject,
    JobList,
    JobObject,
    MemoryObject,
    MetricList,
    MetricObject,
)
from jobs import admission, errors, events, files, lifecycle, results
from jobs.db import database, ping
from jobs.queue import enqueue
from jobs.schemas import FilePurpose, JobCreate
from jobs.settings import Settings, get_settings
from jobs.states import JobStatus
from lomo_core import __version__

log = logging.getLogger("lomo.api")
ERRORS = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
CHUNK = 1 << 20


def _error(status: int, message: str, code: str, param: str | None = None,
           details: list[dict[str, Any]] | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"message": message, "type": kind, "code": code, "param": param, "details": details or []}
    return JSONResponse(status_code=status, content={"error": body})


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.auto_migrate:
            from jobs.migrate import upgrade

            upgrade(settings.resolved_database_url())
        yield

    app = FastAPI(
        title="LOMO fine-tuning service", version=__version__, lifespan=lifespan,
        description="Full-parameter fine-tuning jobs with LOMO / AdaLomo. The job routes follow the shape "
                    "of OpenAI's fine-tuning API; metrics, memory and evals are this service's own.",
    )
    db = database(settings.resolved_database_url())
    owner = settings.default_user

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for item in exc.errors():
            param = _param_of(tuple(item.get("loc", ())))
            message = item.get("msg", "invalid value").removeprefix("Value error, ")
            if item.get("type") == "json_invalid":
                param, message = None, f"the request body is not valid JSON: {item.get('ctx', {}).get('error', '')}"
            details.append({"param": param, "message": message})
        first = details[0] if details else {"param": None, "message": "invalid request"}
        text = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        return _error(422, text, "invalid_request", first["param"], details)

    @app.exception_handler(errors.InvalidRequest)
    async def _invalid(_request: Request, exc: errors.InvalidRequest) -> JSONResponse:
        details = [{"param": p.param, "message": p.message, "line": p.line} for p in exc.problems]
        return _error(422, str(exc), exc.code, exc.problems[0].param, details)

    @app.exception_handler(errors.NotFound)
    async def _not_found(_request: Request, exc: errors.NotFound) -> JSONResponse:
        return _error(404, str(exc), f"{exc.kind}_not_found", "id")

    @app.exception_handler(errors.Conflict)
    async def _conflict(_request: Request, exc: errors.Conflict) -> JSONResponse:
        return _error(409, str(exc), "conflict")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:  # a bug of ours, never client input
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details",
                      "internal_error", kind="server_error")

    # ------------------------------------------------------------------------------------------ misc
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.get("/health")
    def health() -> dict[str, Any]:
        with db.session() as session:
            ping(session)
        return {"status": "ok", "version": __version__, "embedded": settings.embedded}

    # ------------------------------------------------------------------------------------------ files
    @app.post("/v1/files", response_model=FileObject, responses={**ERRORS, 413: {"model": ErrorResponse}},
              summary="Upload a training or validation file (checked line by line)")
    async def upload_file(
        request: Request,
        file: Annotated[UploadFile, File(description=".jsonl, .json or .txt")],
        purpose: Annotated[FilePurpose, Form()] = "fine-tune",
    ) -> Any:
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + (1 << 16):
            return _error(413, f"the upload is {int(declared)} bytes, over the limit of {limit}", "too_large", "file")
        uploads = settings.data_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=uploads, delete=False, suffix=".part") as tmp:
            size = 0
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    tmp.close()
                    Path(tmp.name).unlink(missing_ok=True)
                    return _error(413, f"the upload is over the limit of {limit} bytes", "too_large", "file")
                tmp.write(chunk)
        part = Path(tmp.name)
        try:
            with db.session() as session:
                row = files.store_file(session, settings, owner, file.filename or "", purpose, part)
                return FileObject.of(row)
        finally:
            for leftover in uploads.glob(part.stem + ".*"):
                leftover.unlink(missing_ok=True)

    @app.get("/v1/files", response_model=FileList)
    def list_files(purpose: str | None = None) -> Any:
        with db.session() as session:
            return FileList(data=[FileObject.of(r) for r in files.list_files(session, owner, purpose)])

    @app.get("/v1/files/{file_id}", response_model=FileObject, responses=ERRORS)
    def get_file(file_id: str) -> Any:
        with db.session() as session:
            return FileObject.of(files.get_file(session, owner, file_id))

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, responses={**ERRORS, 409: {"model": ErrorResponse}})
    def delete_file(file_id: str) -> Any:
        with db.session() as session:
            files.delete_file(session, settings, owner, file_id)
        return FileDeleted(id=file_id)

    # ------------------------------------------------------------------------------------------ jobs
    @app.post("/v1/fine_tuning/jobs", response_model=JobObject, responses=ERRORS,
              summary="Create a fine-tuning job (validated in full before it is queued)")
    def create_job(body: JobCreate) -> Any:
        with db.session() as session:
            job = lifecycle.create_job(session, settings, owner, body)
        try:
            enqueue(settings, job.id)
        except Exception as e:  # the job is safe in the database; workers re-send queued jobs when they start
            log.warning("could not enqueue %s: %s", job.id, e)
            with db.session() as session:
                events.add_event(session, job.id, f"the broker could not be reached ({type(e).__name__}); the "
                                                   "job stays queued and is sent when a worker starts", "warning")
        with db.session() as session:
            return JobObject.of(lifecycle.get_job(session, owner, job.id))

    @app.post("/v1/estimates", responses=ERRORS,
              summary="Predicted memory per device of a job (same body as a job), the GPU count and whether it fits")
    def estimate(body: JobCreate) -> dict[str, Any]:
        with db.session() as session:
            return {"object": "estimate", **admission.estimate_job(session, settings, owner, body)}

    @app.get("/v1/fine_tuning/jobs", response_model=JobList, responses=ERRORS)
    def list_jobs(
        request: Request,
        after: str | None = Query(None, description="id of the last job of the previous page"),
        limit: int = Query(20, ge=1, le=100),
        status: JobStatus | None = Query(None),
    ) -> Any:
        metadata = {}
        for key, value in request.query_params.multi_items():
            if key.startswith("metadata[") and key.endswith("]") and len(key) > len("metadata[]"):
                metadata[key[len("metadata["):-1]] = value
        with db.session() as session:
            if after is not None:
                try:
                    lifecycle.get_job(session, owner, after)
                except errors.NotFound:
                    raise errors.InvalidRequest([errors.Problem("after", f"no job with id {after!r}")]) from None
            rows, more = lifecycle.list_jobs(session, owner, after, limit, status.value if status else None, metadata)
            return JobList(data=[JobObject.of(r) for r in rows], has_more=more)

    @app.get("/v1/fine_tuning/jobs/{job_id}", response_model=JobObject, responses=ERRORS)
    def get_job(job_id: str) -> Any:
        with db.session() as session:
            return JobObject.of(lifecycle.get_job(session, owner, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject,
              responses={**ERRORS, 409: {"model": ErrorResponse}})
    def cancel_job(job_id: str) -> Any:
        with db.session() as session:
            return JobObject.of(lifecycle.cancel_job(session, owner, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=EventList, responses=ERRORS)
    def list_events(job_id: str, after: int | None = Query(None, description="id of the last event seen"),
                    limit: int = Query(20, ge=1, le=1000)) -> Any:
        with db.session() as session:
            rows, more = results.list_events(session, owner, job_id, after, limit)
            return EventList(data=[EventObject.of(r) for r in rows], has_more=more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
    def list_checkpoints(job_id: str) -> Any:
        with db.session() as session:
            rows = results.list_checkpoints(session, owner, job_id)
            return CheckpointList(data=[CheckpointObject.of(r) for r in rows])

    @app.get("/v1/fine_tuning/jobs/{job_id}/metrics", response_model=MetricList, responses=ERRORS,
             summary="Loss, learning rate and tokens/s per step (train) and validation loss (val)")
    def list_metrics(job_id: str, kind: str | None = Query(None, pattern="^(train|val)$"),
                     after_step: int | None = Query(None, ge=0), limit: int = Query(1000, ge=1, le=10000)) -> Any:
        with db.session() as session:
            rows, more = results.list_metrics(session, owner, job_id, kind, after_step, limit)
            return MetricList(data=[MetricObject.of(r) for r in rows], has_more=more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/memory", response_model=MemoryObject, responses=ERRORS,
             summary="Predicted memory and the measured peak with its breakdown, per rank")
    def job_memory(job_id: str) -> Any:
        with db.session() as session:
            return MemoryObject(**results.memory_summary(session, owner, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/evals", response_model=EvalList, responses=ERRORS)
    def list_evals(job_id: str) -> Any:
        with db.session() as session:
            return EvalList(data=[EvalObject.of(r) for r in results.list_evals(session, owner, job_id)])

    return app
