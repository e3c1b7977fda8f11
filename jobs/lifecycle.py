"""A job's life: created ``queued``, claimed ``running`` by a worker, cancelled, ended. Status changes
go through ``jobs.states``; the claim and the end of a run are single conditional UPDATEs, so of two
workers given the same job one wins, and a job ends once."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from jobs import idempotency, quotas, webhooks
from jobs.admission import checked_request, predict_memory
from jobs.errors import Conflict, InvalidRequest, NotFound, Problem
from jobs.events import add_event
from jobs.models import Job, new_id, owned, utcnow
from jobs.schemas import HYPERPARAMETERS, JobCreate
from jobs.settings import Settings
from jobs.states import ALLOWED, TERMINAL, JobStatus, transition_values

#: the route name Idempotency-Keys of job creation are stored under
CREATE_ROUTE = "fine_tuning.jobs.create"


def create_job(session: Session, settings: Settings, owner: str, request: JobCreate,
               idempotency_key: str | None = None) -> Job:
    """Validate everything a job needs, then write it ``queued``. The caller commits, then enqueues.

    A job over the caller's queued-jobs or GPU-hours quota is refused (``jobs.quotas``). A job the memory
    model says cannot fit on all the devices of a node is refused; with a pinned GPU
    count that the model says is too few, the job is accepted with a warning. With an
    ``idempotency_key``, the key is stored with the job in this transaction (``jobs.idempotency``:
    the caller looks it up first)."""
    job_id = new_id("ftjob")
    admitted = checked_request(session, settings, owner, request, job_id)
    quotas.check_submission(session, settings, owner)
    resolved, train = admitted.resolved, admitted.train
    prediction = predict_memory(session, settings, admitted.model, resolved, request.gpus)
    if prediction.get("available") and not prediction["fits"] and request.gpus is None:
        raise InvalidRequest([Problem("model", f"the job cannot fit on this deployment: it {prediction['reason']}; "
                                               "lower batch_size or max_seq_len, turn on gradient_checkpointing, "
                                               "set loss_chunk_size, or use lomo / adalomo")],
                             code="insufficient_memory")
    job = Job(
        id=job_id, owner_id=owner, status=JobStatus.QUEUED.value, model=request.model,
        training_file_id=train.id, validation_file_id=admitted.val.id if admitted.val else None,
        method=request.optimizer, hyperparameters={name: resolved[name] for name in HYPERPARAMETERS},
        suffix=request.suffix or None, metadata_=dict(request.metadata or {}), created_at=utcnow(),
        predicted_memory=prediction, gpus=request.gpus or prediction.get("gpus") or 1, priority=request.priority,
        evals=admitted.evals or None,
        integrations=[i.model_dump() for i in request.integrations] if request.integrations else None,
    )
    session.add(job)
    session.flush()
    idempotency.remember(session, owner, CREATE_ROUTE, idempotency_key, job.id)
    add_event(session, job.id, f"job created: {request.optimizer} on {request.model}, "
                               f"{train.records} training records")
    if admitted.batch_choice is not None:
        add_event(session, job.id, f"batch_size auto: {admitted.batch_choice.reason}",
                  data={"batch_size": admitted.batch_choice.batch_size})
    if request.integrations:
        add_event(session, job.id, "integrations are stored with the job; this service sends nothing to "
                                   f"{', '.join(sorted({i.type for i in request.integrations}))}", "warning")
    if job.gpus > 1 and any(spec.get("at_checkpoints") for spec in admitted.evals):
        add_event(session, job.id, f"at_checkpoints is ignored: this job runs on {job.gpus} devices, where "
                                   "checkpoints are partitioned; the base and fine-tuned models are still scored",
                  "warning")
    for warning in prediction.get("warnings") or []:
        add_event(session, job.id, warning, "warning")
    if prediction.get("available"):
        level = "info" if prediction["fits"] else "warning"
        add_event(session, job.id, f"predicted memory: {prediction['per_device_gib']} GiB per device; "
                                   f"{prediction['reason']}", level, data=prediction)
    return job


def get_job(session: Session, owner: str | None, job_id: str) -> Job:
    """``owner``'s job (any user's for None, an admin); another user's is not found, as an unknown id."""
    job = session.get(Job, job_id)
    if job is None or not owned(job.owner_id, owner):
        raise NotFound("job", job_id)
    return job


def list_jobs(
    session: Session, owner: str | None, after: str | None = None, limit: int = 20, status: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """``owner``'s jobs (every user's for None), newest first; ``after`` is the id of the last job of the
    previous page."""
    query = select(Job) if owner is None else select(Job).where(Job.owner_id == owner)
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


def cancel_job(session: Session, owner: str | None, job_id: str) -> Job:
    """A queued or paused job is cancelled at once; a running (or pausing) one is asked to stop at its
    next step."""
    job = get_job(session, owner, job_id)
    status = JobStatus(job.status)
    if status in TERMINAL:
        raise Conflict(f"job {job_id} has already {status.value}; only queued, running or paused jobs can be "
                       "cancelled")
    if status in (JobStatus.RUNNING, JobStatus.PAUSING):
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
    webhooks.job_ended(session, job.id, JobStatus.CANCELLED.value)
    session.refresh(job)
    return job


def claim(session: Session, job_id: str, worker: str, now: datetime | None = None) -> bool:
    """``queued -> running`` in one conditional UPDATE (the caller's transaction commits it): of two
    workers given the same job, one wins. ``jobs.scheduler`` claims through this, with the leases."""
    now = now or utcnow()
    values = transition_values(JobStatus.QUEUED, JobStatus.RUNNING, now)
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(claimed_by=worker, heartbeat_at=now, attempt=Job.attempt + 1, **values)
    ).rowcount
    return done == 1


def queued_job_ids(session: Session) -> list[str]:
    """The queue in the order jobs start: higher priority first, first come first within a priority."""
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED.value)
                                .order_by(Job.priority.desc(), Job.created_at, Job.id)))


def running_on_worker(session: Session, worker_name: str) -> int:
    """How many jobs the worker processes of ``worker_name`` run now (claimed as ``<name>:<pid>``)."""
    return session.scalar(select(func.count(Job.id)).where(
        Job.status.in_([JobStatus.RUNNING.value, JobStatus.PAUSING.value]),
        Job.claimed_by.startswith(f"{worker_name}:", autoescape=True))) or 0


@dataclass
class Outcome:
    status: JobStatus
    error_code: str | None = None
    error_message: str | None = None
    error_param: str | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = field(default_factory=list)


def finish_job(session: Session, job_id: str, outcome: Outcome, attempt: int | None = None) -> JobStatus | None:
    """``running | pausing -> succeeded | failed | cancelled | paused``, only if the job is still live
    (in ``attempt``, when given: an attempt that was recovered elsewhere ends nothing). A job that paused
    because it was preempted goes back to the queue instead. Returns the status the job is left in, or
    None when it was not live."""
    live = [Job.id == job_id, *([Job.attempt == attempt] if attempt is not None else [])]
    if outcome.status is JobStatus.PAUSED:
        row = session.execute(select(Job.preempted_by, Job.cancel_requested)
                              .where(*live, Job.status == JobStatus.PAUSING.value)).first()
        if row is not None and row.cancel_requested:  # cancelled while it paused: it ends cancelled
            outcome = Outcome(JobStatus.CANCELLED)
        preempted_by = row.preempted_by if row is not None else None
        if preempted_by and not row.cancel_requested and session.execute(
                update(Job).where(*live, Job.status == JobStatus.PAUSING.value, Job.preempted_by == preempted_by,
                                  Job.cancel_requested.is_(False))
                .values(claimed_by=None, estimated_finish=None, preempted_by=None, preemptions=Job.preemptions + 1,
                        **transition_values(JobStatus.PAUSING, JobStatus.QUEUED))).rowcount:
            step = session.scalar(select(Job.step).where(Job.id == job_id))
            add_event(session, job_id, f"preempted by {preempted_by}: back in the queue, its GPUs free; it resumes "
                                       f"from its checkpoint at step {step} when GPUs free up")
            return JobStatus.QUEUED
    for current in (JobStatus.RUNNING, JobStatus.PAUSING):
        if outcome.status not in ALLOWED[current]:
            continue
        values = transition_values(current, outcome.status)
        if outcome.status in (JobStatus.SUCCEEDED, JobStatus.PAUSED):
            values["estimated_finish"] = None
        done = session.execute(
            update(Job).where(*live, Job.status == current.value).values(
                error_code=outcome.error_code, error_message=outcome.error_message, error_param=outcome.error_param,
                fine_tuned_model=outcome.fine_tuned_model, result_files=outcome.result_files, **values)
        ).rowcount
        if done:
            text = {JobStatus.SUCCEEDED: "job succeeded", JobStatus.CANCELLED: "job cancelled",
                    JobStatus.PAUSED: "job paused: its GPUs are free; resume continues from its checkpoint"}.get(
                outcome.status, f"job failed: {outcome.error_message}")
            add_event(session, job_id, text, "error" if outcome.status is JobStatus.FAILED else "info")
            webhooks.job_ended(session, job_id, outcome.status.value)
            return outcome.status
    return None


def pause_job(session: Session, owner: str | None, job_id: str) -> Job:
    """``running -> pausing``: the run checkpoints at its next step, frees its GPUs and ends ``paused``.
    Pausing a pausing or paused job changes nothing; a queued or ended one cannot pause (Conflict)."""
    job = get_job(session, owner, job_id)
    status = JobStatus(job.status)
    if status is JobStatus.PAUSING and job.preempted_by:  # pausing for a preemption: now it stays paused
        if session.execute(update(Job).where(Job.id == job_id, Job.status == status.value,
                                             Job.preempted_by == job.preempted_by)
                           .values(preempted_by=None)).rowcount:
            add_event(session, job.id, "pause requested: the run, already stopping for a preemption, ends paused "
                                       "instead of going back to the queue")
        session.refresh(job)
        return job if job.status in (JobStatus.PAUSING.value, JobStatus.PAUSED.value) else pause_job(
            session, owner, job_id)
    if status in (JobStatus.PAUSING, JobStatus.PAUSED):
        return job
    if status is JobStatus.QUEUED:
        raise Conflict(f"job {job_id} is queued and holds no GPU yet: nothing to pause; cancel it, or let it run",
                       code="not_running")
    if status is not JobStatus.RUNNING:
        raise Conflict(f"job {job_id} has {status.value}; only a running job can be paused", code="not_running")
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                           .values(**transition_values(JobStatus.RUNNING, JobStatus.PAUSING))).rowcount
    session.refresh(job)
    if not done:  # it ended (or lost its worker) at this instant
        return pause_job(session, owner, job_id)
    add_event(session, job.id, "pause requested: the run checkpoints at its next step and frees its GPUs")
    return job


def resume_job(session: Session, owner: str | None, job_id: str) -> Job:
    """``paused -> queued``: it starts again from its checkpoint when GPUs are free (the caller commits,
    then sends a wake-up). A job that is not paused cannot resume (Conflict)."""
    job = get_job(session, owner, job_id)
    if job.status == JobStatus.QUEUED.value and job.attempt > 0:  # resumed already (or recovered): queued
        return job
    if job.status != JobStatus.PAUSED.value:
        raise Conflict(f"job {job.id} is {job.status}, not paused: only a paused job can be resumed",
                       code="not_paused")
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.PAUSED.value)
                           .values(claimed_by=None, **transition_values(JobStatus.PAUSED, JobStatus.QUEUED))
                           ).rowcount
    session.refresh(job)
    if not done:
        return resume_job(session, owner, job_id)
    add_event(session, job.id, f"resumed: queued, to continue from its checkpoint at step {job.step}")
    return job

