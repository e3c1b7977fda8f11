"""Each user's quotas: running jobs, queued jobs, GPU-hours in a rolling window, uploaded bytes.

The deployment's defaults are settings (``LOMO_QUOTA_*``, unset: no limit); an admin overrides them per
user (``users.quotas``: a quota named there with a number is that user's limit, with null no limit).

- ``queued_jobs``, ``gpu_hours`` and ``upload_bytes`` refuse a request (``QuotaExceeded``, a 429 that names
  the limit, its value and the use): a submission with that many jobs queued already or with the
  GPU-hours used up, an upload that would pass the bytes (refused while it streams).
- ``running_jobs`` does not refuse a submission: the job queues, and the scheduler starts none of the
  user's jobs while that many run (``running_limits``); when one ends, the next starts. Refusing
  would keep a user from queueing work behind their running job, which is what a queue is for.

GPU-hours are counted from the GPU leases (``gpu_leases``: every GPU a job held, from its lease to its
release, or now for a lease held now), the part of each inside the window; CPU jobs hold no GPU.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from jobs.errors import InvalidRequest, Problem, QuotaExceeded
from jobs.models import File, GpuLease, Job, User, aware, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus

#: the quotas, with what each counts
QUOTAS: dict[str, str] = {
    "running_jobs": "jobs running at once",
    "queued_jobs": "jobs waiting in the queue",
    "gpu_hours": "GPU-hours held in the rolling window",
    "upload_bytes": "bytes of uploaded files kept",
}
#: the statuses in which a job holds (or is about to hold, or still frees) its GPUs
RUNNING = (JobStatus.RUNNING.value, JobStatus.PAUSING.value)


def defaults(settings: Settings) -> dict[str, float | None]:
    return {"running_jobs": settings.quota_running_jobs, "queued_jobs": settings.quota_queued_jobs,
            "gpu_hours": settings.quota_gpu_hours, "upload_bytes": settings.quota_upload_bytes}


def checked_overrides(values: dict[str, Any]) -> dict[str, float | None]:
    """An admin's overrides, validated: known quota names, each a positive number or null (no limit)."""
    problems = []
    out: dict[str, float | None] = {}
    for name, value in values.items():
        if name not in QUOTAS:
            problems.append(Problem(f"quotas.{name}", f"not a quota; the quotas are {', '.join(QUOTAS)}"))
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
                                    or value > 1e15):
            problems.append(Problem(f"quotas.{name}", "must be a positive number, or null for no limit"))
        elif value is not None and name != "gpu_hours" and value != int(value):
            problems.append(Problem(f"quotas.{name}", "must be a whole number"))
        else:
            out[name] = value if value is None or name == "gpu_hours" else int(value)
    if problems:
        raise InvalidRequest(problems)
    return out


def limits(settings: Settings, user: User | None) -> dict[str, float | None]:
    """A user's limits: the settings' defaults with the admin's overrides."""
    return defaults(settings) | dict((user.quotas or {}) if user is not None else {})


def gpu_hours(session: Session, user_id: str, since: datetime, now: datetime | None = None) -> float:
    """The GPU-hours ``user_id``'s jobs held since ``since``, from the leases (the part inside it)."""
    now = now or utcnow()
    rows = session.execute(
        select(GpuLease.leased_at, GpuLease.released_at).join(Job, Job.id == GpuLease.job_id)
        .where(Job.owner_id == user_id, or_(GpuLease.released_at.is_(None), GpuLease.released_at > since)))
    seconds = 0.0
    for leased, released in rows:
        start, end = max(aware(leased), since), aware(released) if released else now
        seconds += max((end - start).total_seconds(), 0.0)
    return seconds / 3600


def usage(session: Session, settings: Settings, user_id: str) -> dict[str, float]:
    """What ``user_id`` uses of each quota now."""
    def count(*statuses: str) -> int:
        return session.scalar(select(func.count(Job.id)).where(Job.owner_id == user_id,
                                                               Job.status.in_(statuses))) or 0

    stored = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.owner_id == user_id, File.deleted_at.is_(None))) or 0
    since = utcnow() - timedelta(hours=settings.quota_window_hours)
    return {"running_jobs": count(*RUNNING), "queued_jobs": count(JobStatus.QUEUED.value),
            "gpu_hours": round(gpu_hours(session, user_id, since), 4), "upload_bytes": int(stored)}


def check_submission(session: Session, settings: Settings, user_id: str) -> None:
    """Refuse a new job over the queued-jobs or GPU-hours quota. The user's row is locked until the caller
    commits, so that two submissions at once cannot both take the last place."""
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    limit = limits(settings, session.get(User, user_id))
    queued = limit["queued_jobs"]
    if queued is not None:  # each use is counted only when its quota has a limit
        waiting = session.scalar(select(func.count(Job.id)).where(
            Job.owner_id == user_id, Job.status == JobStatus.QUEUED.value)) or 0
        if waiting >= queued:
            raise QuotaExceeded("queued_jobs", queued, waiting,
                                f"quota queued_jobs: at most {int(queued)} of your jobs may wait in the queue "
                                f"and {waiting} do; submit again when some have started, or cancel some")
    hours = limit["gpu_hours"]
    if hours is not None:
        held = round(gpu_hours(session, user_id, utcnow() - timedelta(hours=settings.quota_window_hours)), 4)
        if held >= hours:
            raise QuotaExceeded("gpu_hours", hours, held,
                                f"quota gpu_hours: your jobs may hold {hours:g} GPU-hours in "
                                f"{settings.quota_window_hours:g} hours and have held {held:.2f}; "
                                "the window moves on as time passes (an admin can raise the quota)")


def upload_quota(session: Session, settings: Settings, user_id: str) -> tuple[int | None, int]:
    """``user_id``'s upload quota (None: no limit) and the bytes of their files kept now."""
    limit = limits(settings, session.get(User, user_id))["upload_bytes"]
    used = usage(session, settings, user_id)["upload_bytes"] if limit is not None else 0
    return (int(limit) if limit is not None else None), int(used)


def check_upload(session: Session, settings: Settings, user_id: str, size: int) -> None:
    """Refuse to keep an upload of ``size`` bytes that would pass the user's quota (checked again as the
    file is stored, under a lock of the user's row: two uploads at once cannot both take the last room)."""
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    limit, used = upload_quota(session, settings, user_id)
    if limit is not None and used + size > limit:
        raise over_upload_quota(limit, used, size)


def over_upload_quota(limit: int, used: int, adding: int | None = None, at_least: bool = False) -> QuotaExceeded:
    more = f" and the upload would add {'at least ' if at_least else ''}{adding}" if adding is not None else ""
    return QuotaExceeded("upload_bytes", limit, used,
                         f"quota upload_bytes: your files may take {limit} bytes and take {used}{more}; "
                         "delete files you no longer need (DELETE /v1/files/{id})")


def running_limits(session: Session, settings: Settings, owners: set[str]) -> dict[str, str]:
    """Of ``owners``, those whose running-jobs quota is reached, each with the reason their jobs wait."""
    if not owners:
        return {}
    default = settings.quota_running_jobs
    found = {user.id: user for user in session.scalars(select(User).where(User.id.in_(owners)))}
    capped = {}
    for owner in owners:
        user = found.get(owner)
        value = (user.quotas or {}).get("running_jobs", default) if user is not None else default
        if value is not None:
            capped[owner] = int(value)
    if not capped:
        return {}
    running = dict(session.execute(select(Job.owner_id, func.count(Job.id)).where(
        Job.owner_id.in_(capped), Job.status.in_(RUNNING)).group_by(Job.owner_id)).all())
    return {owner: f"waiting: quota running_jobs: {running.get(owner, 0)} of its owner's jobs run and the limit "
                   f"is {limit}; it starts when one of them ends"
            for owner, limit in capped.items() if running.get(owner, 0) >= limit}
