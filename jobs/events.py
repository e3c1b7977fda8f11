"""A job's events: what happened to it, newest first, in words (and data where there is some)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from jobs.models import JobEvent, utcnow


def add_event(session: Session, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, message=message, level=level, data=data, created_at=utcnow()))
