"""GPU leases: which devices of which node a job holds. A device is never leased twice at once.

The database enforces it: a partial unique index on (node, device_index) over the leases not yet
released (``uq_gpu_leases_active``). ``acquire`` picks free devices and inserts their leases in one
transaction; when another worker took one of them first, the insert fails, the transaction is rolled
back and the choice is made again, so several worker processes or nodes sharing the database never
hold a device together.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import session_scope
from jobs.models import GpuLease, Job
from jobs.states import TERMINAL


def _now() -> datetime:
    return datetime.now(timezone.utc)


def leased_devices(session: Session, node: str) -> dict[int, str]:
    """Device index -> job id, for the devices of ``node`` leased now."""
    rows = session.execute(select(GpuLease.device_index, GpuLease.job_id)
                           .where(GpuLease.node == node, GpuLease.released_at.is_(None)))
    return {index: job for index, job in rows}


def acquire(sessions: sessionmaker[Session], node: str, devices: list[int], job_id: str, count: int,
            attempts: int = 20) -> list[int] | None:
    """Lease ``count`` free devices of ``node`` to ``job_id`` (the lowest free indices); None when fewer
    than ``count`` are free. A job that already holds leases gets them back (a re-delivered task)."""
    for _ in range(attempts):
        try:
            with session_scope(sessions) as session:
                taken = leased_devices(session, node)
                mine = sorted(i for i, job in taken.items() if job == job_id)
                if mine:
                    return mine
                free = [i for i in devices if i not in taken]
                if len(free) < count:
                    return None
                chosen = free[:count]
                now = _now()
                session.add_all([GpuLease(node=node, device_index=i, job_id=job_id, leased_at=now) for i in chosen])
                session.flush()  # the unique index decides here, inside the transaction
            return chosen
        except IntegrityError:
            continue  # another worker leased one of them first: look again
    return None


def release(session: Session, job_id: str) -> int:
    """End every lease of ``job_id``; returns how many were released."""
    return session.execute(update(GpuLease).where(GpuLease.job_id == job_id, GpuLease.released_at.is_(None))
                           .values(released_at=_now())).rowcount


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
