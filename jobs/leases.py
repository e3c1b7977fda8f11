"""GPU leases: which devices of which node a job holds. A device is never leased twice at once.

The database enforces it: a partial unique index on (node, device_index) over the leases not yet
released (``uq_gpu_leases_active``). ``jobs.scheduler`` picks free devices and inserts their leases
in the transaction that claims the job; when another worker took one of them first, the insert fails,
the transaction is rolled back and the choice is made again, so several worker processes or nodes
sharing the database never hold a device together.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from jobs.models import GpuLease, Job
from jobs.states import TERMINAL


def _now() -> datetime:
    return datetime.now(timezone.utc)


def leased_devices(session: Session, node: str) -> dict[int, str]:
    """Device index -> job id, for the devices of ``node`` leased now."""
    rows = session.execute(select(GpuLease.device_index, GpuLease.job_id)
                           .where(GpuLease.node == node, GpuLease.released_at.is_(None)))
    return {index: job for index, job in rows}


def release(session: Session, job_id: str, attempt: int | None = None, node: str | None = None) -> int:
    """End the leases of ``job_id`` (only those of its ``attempt``, when given: a recovered job's old
    worker must not free the GPUs of its new attempt; only those on ``node``, when given: a joining node
    of a job spread over several nodes frees its part); returns how many were released."""
    query = update(GpuLease).where(GpuLease.job_id == job_id, GpuLease.released_at.is_(None))
    if attempt is not None:
        query = query.where(or_(GpuLease.attempt == attempt, GpuLease.attempt.is_(None)))
    if node is not None:
        query = query.where(GpuLease.node == node)
    return session.execute(query.values(released_at=_now())).rowcount


def release_orphans(session: Session, node: str) -> list[str]:
    """End the leases on ``node`` of jobs that have ended (a worker that died before releasing them).
    Returns the job ids whose leases came back."""
    rows = session.execute(
        select(GpuLease.job_id).join(Job, Job.id == GpuLease.job_id)
        .where(GpuLease.node == node, GpuLease.released_at.is_(None), Job.status.in_([s.value for s in TERMINAL]))
    ).scalars().all()
    for job_id in set(rows):
        release(session, job_id)
    return sorted(set(rows))
