"""Jobs whose worker was lost: found by their heartbeat, sent back to the queue to resume.

The database is the source of truth. A running job's worker writes its heartbeat every
``LOMO_FLUSH_INTERVAL_S``; a job not heard of for ``LOMO_HEARTBEAT_TIMEOUT_S`` is taken for lost (the
worker was killed, its node rebooted or cut off). Any live worker recovers it: one conditional UPDATE
(still running, in the attempt and with the heartbeat it was seen with) moves it back to ``queued``,
and its GPU leases are released. Its next attempt resumes from the latest complete checkpoint of its
folder. The old attempt, if it is still alive somewhere, is fenced: each of its writes checks the
attempt (``telemetry.record_progress``, ``lifecycle.finish_job``, ``leases.release``), so it writes
nothing more and stops its training process.

Losing a worker is an infrastructure failure: a job is recovered up to ``LOMO_MAX_RECOVERIES`` times,
then fails with ``worker_lost``. A failure of the job itself (bad data, NaN loss, out of memory) ends
it at once and is never retried. A lost job whose cancellation was asked ends ``cancelled``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from jobs import leases, webhooks
from jobs.db import UNREACHABLE, Database
from jobs.events import add_event
from jobs.models import Job, aware, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus, transition_values

log = logging.getLogger("lomo.recovery")
#: the statuses of a job that has a worker (and so a heartbeat)
LIVE = (JobStatus.RUNNING.value, JobStatus.PAUSING.value)


def recover_lost(db: Database, settings: Settings, now: datetime | None = None) -> list[str]:
    """Send back to the queue (or end) the running jobs not heard of for ``heartbeat_timeout_s``;
    returns the ids of the jobs put back in the queue."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
    with db.session() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.recoveries, Job.claimed_by, Job.heartbeat_at,
                   Job.cancel_requested, Job.preempted_by)
            .where(Job.status.in_(LIVE), Job.heartbeat_at < cutoff)).all()
    requeued = []
    for job_id, status, attempt, recoveries, worker, heartbeat, cancel, preempted_by in stale:
        silent = (now - aware(heartbeat)).total_seconds()
        try:
            recovered = _recover_one(db, settings, now, job_id, status, attempt, recoveries, worker, heartbeat,
                                     cancel, preempted_by, silent)
        except UNREACHABLE as error:  # its row is locked (a frozen worker mid-write): the next round tries again
            log.warning("job %s: not recovered this round: %s", job_id, type(error).__name__)
            continue
        if recovered:
            requeued.append(job_id)
    return requeued


def _recover_one(db: Database, settings: Settings, now: datetime, job_id: str, status: str, attempt: int,
                 recoveries: int, worker: str | None, heartbeat: datetime, cancel: bool, preempted_by: str | None,
                 silent: float) -> bool:
    """One lost job back in the queue (True), or ended; False when it changed meanwhile."""
    with db.session() as session:
        if session.bind.dialect.name == "postgresql":  # a row locked by a stuck writer is not waited for
            session.execute(text("SET LOCAL lock_timeout = '2s'"))
        seen = (Job.id == job_id, Job.status == status, Job.attempt == attempt, Job.heartbeat_at == heartbeat)
        lost = f"worker {worker} lost: no heartbeat for {silent:.0f} s (attempt {attempt})"
        return _recover(session, settings, now, job_id, seen, status, attempt, recoveries, worker, cancel,
                        preempted_by, lost) == JobStatus.QUEUED.value


def requeue_after_node_loss(session: Session, settings: Settings, job_id: str, attempt: int, lost: str) -> str | None:
    """A job spread over several nodes lost one of them (``jobs.placement``): its launcher stopped its own
    ranks, and the job is recovered as if its worker were lost (back in the queue to resume from its latest
    checkpoint, on a new placement; ended when cancelled, paused when it was pausing, failed past
    ``max_recoveries``). Returns the status it is left in; None when it was not running in ``attempt``."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(LIVE))
                         .with_for_update())
    if job is None:
        return None
    seen = (Job.id == job_id, Job.status == job.status, Job.attempt == attempt)
    return _recover(session, settings, utcnow(), job_id, seen, job.status, attempt, job.recoveries,
                    job.claimed_by, job.cancel_requested, job.preempted_by, lost)


def _recover(session: Session, settings: Settings, now: datetime, job_id: str, seen: tuple, status: str,
             attempt: int, recoveries: int, worker: str | None, cancel: bool, preempted_by: str | None,
             lost: str) -> str | None:
    """Move a lost job (``seen``: the conditions it was seen in) on: the status it is left in, or None
    when it changed meanwhile."""
    if cancel:
        values = {**transition_values(status, JobStatus.CANCELLED, now), "estimated_finish": None}
        message, level = f"{lost}; its cancellation was asked, so the job ends cancelled", "warning"
    elif status == JobStatus.PAUSING.value and not preempted_by:  # paused it is, at its latest checkpoint
        values = {**transition_values(status, JobStatus.PAUSED, now), "claimed_by": None,
                  "estimated_finish": None}
        message, level = f"{lost} while pausing; paused at its latest checkpoint", "warning"
    elif recoveries >= settings.max_recoveries:
        values = {**transition_values(status, JobStatus.FAILED, now), "estimated_finish": None,
                  "error_code": "worker_lost",
                  "error_message": f"the job lost its worker {recoveries + 1} times (the last: {worker}); "
                                   f"after {settings.max_recoveries} recoveries (LOMO_MAX_RECOVERIES) it is "
                                   "not retried again"}
        message, level = f"{lost}; no recovery left: the job fails", "error"
    else:
        values = {**transition_values(status, JobStatus.QUEUED, now), "claimed_by": None,
                  "estimated_finish": None, "recoveries": Job.recoveries + 1, "preempted_by": None}
        message, level = (f"{lost}; back in the queue, to resume from its latest checkpoint (recovery "
                          f"{recoveries + 1} of at most {settings.max_recoveries})"), "warning"
    if session.execute(update(Job).where(*seen).values(**values)).rowcount != 1:
        return None  # it wrote a heartbeat, ended, or another worker recovered it meanwhile
    leases.release(session, job_id)  # every attempt's: the lost one holds them no more
    add_event(session, job_id, message, level)
    webhooks.job_ended(session, job_id, values["status"])  # cancelled, paused or failed: an event
    log.warning("job %s: %s", job_id, message)
    return values["status"]
