"""A job's events: what happened to it, newest first, in words (and data where there is some)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from jobs import logs
from jobs.models import JobEvent, utcnow


def add_event(session: Session, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
    """Record an event of ``job_id``; one made while a request is served carries the request's id
    (``data.request_id``), so that a client's request can be followed into its job's events."""
    request_id = logs.current("request_id")
    if request_id is not None:
        data = {**(data or {}), "request_id": request_id}
    session.add(JobEvent(job_id=job_id, message=message, level=level, data=data, created_at=utcnow()))
