"""The job state machine: the only place that changes ``Job.status``."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any


class JobStatus(str, enum.Enum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"  # a pause was asked: the run checkpoints at its next step and frees its GPUs
    PAUSED = "paused"  # checkpointed, holding no GPU; resume queues it again
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: the statuses of jobs that have not ended, as stored
ACTIVE = tuple(s.value for s in JobStatus if s not in TERMINAL)

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    # RUNNING -> QUEUED: a job whose worker died goes back to the queue, to resume from its checkpoint.
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED,
                                  JobStatus.PAUSING}),
    # a pausing run may still end on its own before its next step, or lose its worker
    JobStatus.PAUSING: frozenset({JobStatus.PAUSED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.QUEUED}),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, current: JobStatus, new: JobStatus) -> None:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[current])) or "none: it is final"
        super().__init__(f"a {current.value} job cannot become {new.value} (allowed: {allowed})")
        self.current, self.new = current, new


def check_transition(current: JobStatus | str, new: JobStatus | str) -> None:
    current, new = JobStatus(current), JobStatus(new)
    if new not in ALLOWED[current]:
        raise IllegalTransition(current, new)


def transition_values(current: JobStatus | str, new: JobStatus | str, now: datetime | None = None) -> dict[str, Any]:
    """The column values that move a job from ``current`` to ``new``.

    For conditional updates (``UPDATE jobs SET <these> WHERE id = ... AND status = current``): the
    claim of a queued job and the end of a running one are single atomic statements.
    """
    current, new = JobStatus(current), JobStatus(new)
    check_transition(current, new)
    now = now or datetime.now(timezone.utc)
    values: dict[str, Any] = {"status": new.value}
    if new is JobStatus.RUNNING:
        values["started_at"] = now
    if new in TERMINAL:
        values["finished_at"] = now
    return values


def transition(job: Any, new: JobStatus | str, now: datetime | None = None) -> None:
    """Move ``job`` (any object with ``status``, ``started_at``, ``finished_at``) to ``new``."""
    for name, value in transition_values(job.status, new, now).items():
        setattr(job, name, value)
