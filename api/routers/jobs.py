"""``/v1/fine_tuning/jobs``: create, list, read, cancel; a job's events, checkpoints, metrics, memory, evals."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from sqlalchemy.exc import IntegrityError

from api.deps import CallerDep, DatabaseDep, SessionDep, SessionRoute, SettingsDep
from api.errors import CONFLICT, ERRORS, OVER_QUOTA
from api.schemas import CheckpointList, EvalList, EventList, JobList, JobObject, MemoryObject, MetricList
from api.views import (
    CHECKPOINT_PREFIX,
    EVAL_PREFIX,
    EVENT_PREFIX,
    checkpoint_object,
    eval_object,
    event_object,
    job_object,
    metric_object,
    row_id,
)
from jobs import errors, events, idempotency, lifecycle, results
from jobs.queue import dispatch_due_webhooks, enqueue
from jobs.schemas import JobCreate
from jobs.states import JobStatus

log = logging.getLogger("lomo.api")
router = APIRouter(route_class=SessionRoute, prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"])


@router.post("", response_model=JobObject, responses={**ERRORS, **OVER_QUOTA},
             summary="Create a fine-tuning job (validated in full before it is queued)")
def create_job(body: JobCreate, db: DatabaseDep, settings: SettingsDep, caller: CallerDep,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> Any:
    key = idempotency.check_key(idempotency_key)
    route = lifecycle.CREATE_ROUTE
    with db.session() as session:
        earlier = idempotency.recall(session, caller.user_id, route, key)
        if earlier is not None:  # a retried create: the job the first request made
            return job_object(lifecycle.get_job(session, caller.user_id, earlier))
    try:
        with db.session() as session:  # committed before the message is sent: a worker finds the row
            job = lifecycle.create_job(session, settings, caller.user_id, body, key)
    except IntegrityError:  # a concurrent request with the same key won: answer with its job
        with db.session() as session:
            earlier = idempotency.recall(session, caller.user_id, route, key)
            if earlier is None:
                raise
            return job_object(lifecycle.get_job(session, caller.user_id, earlier))
    wake(db, settings, job.id)
    with db.session() as session:
        return job_object(lifecycle.get_job(session, caller.user_id, job.id))


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    request: Request, session: SessionDep, caller: CallerDep,
    after: str | None = Query(None, description="id of the last job of the previous page"),
    limit: int = Query(20, ge=1, le=100),
    status: JobStatus | None = Query(None),
    user: str | None = Query(None, max_length=200, description="admins: only this user's jobs (a name or an id)"),
) -> Any:
    owner = caller.listing(session, user)
    metadata = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]") and len(key) > len("metadata[]"):
            metadata[key[len("metadata["):-1]] = value
    if after is not None:
        try:
            lifecycle.get_job(session, owner, after)
        except errors.NotFound:
            raise errors.InvalidRequest([errors.Problem("after", f"no job with id {after!r}")]) from None
    rows, more = lifecycle.list_jobs(session, owner, after, limit, status.value if status else None, metadata)
    return JobList(data=[job_object(r) for r in rows], has_more=more)


@router.get("/{job_id}", response_model=JobObject, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return job_object(lifecycle.get_job(session, caller.scope, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject, responses={**ERRORS, **CONFLICT})
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep, db: DatabaseDep, settings: SettingsDep,
               background: BackgroundTasks) -> Any:
    job = lifecycle.cancel_job(session, caller.scope, job_id)
    if job.status == JobStatus.CANCELLED.value:  # ended here: its webhooks go out once this commits
        background.add_task(send_webhooks, db, settings)
    return job_object(job)


def send_webhooks(db, settings) -> None:
    try:
        dispatch_due_webhooks(settings, db)
    except Exception as e:  # the workers' watch sends them within seconds anyway
        log.warning("could not send webhook deliveries: %s", e)


@router.post("/{job_id}/pause", response_model=JobObject, responses={**ERRORS, **CONFLICT},
             summary="Pause a running job: it checkpoints at its next step, frees its GPUs and ends paused")
def pause_job(job_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return job_object(lifecycle.pause_job(session, caller.scope, job_id))


@router.post("/{job_id}/resume", response_model=JobObject, responses={**ERRORS, **CONFLICT},
             summary="Resume a paused job: queued again, it continues from its checkpoint")
def resume_job(job_id: str, db: DatabaseDep, settings: SettingsDep, caller: CallerDep) -> Any:
    with db.session() as session:  # committed before the wake-up is sent
        job = lifecycle.resume_job(session, caller.scope, job_id)
        answer = job_object(job)
    wake(db, settings, job.id)
    return answer


def wake(db, settings, job_id: str) -> None:
    """Send the wake-up of a job just queued; when the broker cannot be reached the job stays queued,
    and the workers wake up for it once the broker is back (``worker.app.watch_the_queue``)."""
    try:
        enqueue(settings, job_id)
    except Exception as e:
        log.warning("could not enqueue %s: %s", job_id, e)
        with db.session() as session:
            events.add_event(session, job_id, f"the broker could not be reached ({type(e).__name__}); the job "
                                              "stays queued; the workers start it once the broker is back", "warning")


@router.get("/{job_id}/events", response_model=EventList, responses=ERRORS)
def list_events(job_id: str, session: SessionDep, caller: CallerDep,
                after: str | None = Query(None, description="id of the last event of the previous page (newest "
                                                            "first)"),
                limit: int = Query(20, ge=1, le=1000)) -> Any:
    rows, more = results.list_events(session, caller.scope, job_id, row_id(after, EVENT_PREFIX), limit)
    return EventList(data=[event_object(r) for r in rows], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
def list_checkpoints(job_id: str, session: SessionDep, caller: CallerDep,
                     after: str | None = Query(None, description="id of the last checkpoint of the previous page"),
                     limit: int = Query(10, ge=1, le=100)) -> Any:
    job = lifecycle.get_job(session, caller.scope, job_id)
    rows, more = results.list_checkpoints(session, caller.scope, job_id, row_id(after, CHECKPOINT_PREFIX), limit)
    data = [checkpoint_object(r, job) for r in rows]
    return CheckpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


@router.get("/{job_id}/metrics", response_model=MetricList, responses=ERRORS,
            summary="Loss, learning rate and tokens/s per step (train) and validation loss (val)")
def list_metrics(job_id: str, session: SessionDep, caller: CallerDep,
                 kind: str | None = Query(None, pattern="^(train|val)$"),
                 after_step: int | None = Query(None, ge=0, le=2**31 - 1),
                 limit: int = Query(1000, ge=1, le=10000)) -> Any:
    rows, more = results.list_metrics(session, caller.scope, job_id, kind, after_step, limit)
    return MetricList(data=[metric_object(r) for r in rows], has_more=more)


@router.get("/{job_id}/memory", response_model=MemoryObject, responses=ERRORS,
            summary="Predicted memory and the measured peak with its breakdown, per rank")
def job_memory(job_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return MemoryObject(**results.memory_summary(session, caller.scope, job_id))


@router.get("/{job_id}/evals", response_model=EvalList, responses=ERRORS,
            summary="Evaluation scores of the base model, the fine-tuned model and checkpoints")
def list_evals(job_id: str, session: SessionDep, caller: CallerDep,
               after: str | None = Query(None, description="id of the last score of the previous page"),
               limit: int = Query(100, ge=1, le=1000)) -> Any:
    rows, more = results.list_evals(session, caller.scope, job_id, row_id(after, EVAL_PREFIX), limit)
    return EvalList(data=[eval_object(r) for r in rows], has_more=more)
