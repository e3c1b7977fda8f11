"""What a job produced, read back for the API: metrics, checkpoints, evaluation scores, memory."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.lifecycle import get_job
from jobs.models import Checkpoint, EvalResult, JobEvent, MemorySample, MetricPoint


def list_events(session: Session, owner: str, job_id: str, after: int | None = None,
                limit: int = 20) -> tuple[list[JobEvent], bool]:
    """Newest first, like the job list; ``after`` is the id of the last event of the previous page."""
    get_job(session, owner, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id < after)
    rows = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_metrics(session: Session, owner: str, job_id: str, kind: str | None = None, after_step: int | None = None,
                 limit: int = 1000) -> tuple[list[MetricPoint], bool]:
    get_job(session, owner, job_id)
    query = select(MetricPoint).where(MetricPoint.job_id == job_id)
    if kind:
        query = query.where(MetricPoint.kind == kind)
    if after_step is not None:
        query = query.where(MetricPoint.step > after_step)
    rows = list(session.scalars(query.order_by(MetricPoint.step, MetricPoint.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_checkpoints(session: Session, owner: str, job_id: str) -> list[Checkpoint]:
    get_job(session, owner, job_id)
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def list_evals(session: Session, owner: str, job_id: str) -> list[EvalResult]:
    get_job(session, owner, job_id)
    return list(session.scalars(select(EvalResult).where(EvalResult.job_id == job_id).order_by(EvalResult.id)))


def memory_summary(session: Session, owner: str, job_id: str) -> dict[str, Any]:
    """The predicted figures and, per rank, the largest measured peak with its breakdown."""
    job = get_job(session, owner, job_id)
    samples = list(session.scalars(select(MemorySample).where(MemorySample.job_id == job_id)))
    ranks: dict[int, MemorySample] = {}
    for sample in samples:
        best = ranks.get(sample.rank)
        if best is None or sample.peak_bytes > best.peak_bytes:
            ranks[sample.rank] = sample
    measured = [
        {"rank": rank, "step": s.step, "device": s.device, "source": s.source, "peak_bytes": s.peak_bytes,
         "parameters_bytes": s.parameters_bytes, "gradients_bytes": s.gradients_bytes,
         "optimizer_state_bytes": s.optimizer_state_bytes, "activations_bytes": s.activations_bytes,
         "other_bytes": s.other_bytes}
        for rank, s in sorted(ranks.items())
    ]
    return {"job_id": job_id, "predicted": job.predicted_memory, "measured": measured, "samples": len(samples)}
