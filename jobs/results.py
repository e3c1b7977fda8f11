"""What a job produced, read back for the API: metrics, checkpoints, evaluation scores, memory."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from jobs.lifecycle import get_job
from jobs.models import Checkpoint, EvalResult, JobEvent, MemorySample, MetricPoint


def list_events(session: Session, owner: str | None, job_id: str, after: int | None = None,
                limit: int = 20) -> tuple[list[JobEvent], bool]:
    """Newest first, like the job list; ``after`` is the id of the last event of the previous page."""
    get_job(session, owner, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id < after)
    rows = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_metrics(session: Session, owner: str | None, job_id: str, kind: str | None = None,
                 after_step: int | None = None, limit: int = 1000) -> tuple[list[MetricPoint], bool]:
    """Points in step order; the next page starts ``after_step`` = the last step of this one, so a page
    ends with whole steps (a step's train and val points are never split over two pages)."""
    get_job(session, owner, job_id)
    query = select(MetricPoint).where(MetricPoint.job_id == job_id)
    if kind:
        query = query.where(MetricPoint.kind == kind)
    if after_step is not None:
        query = query.where(MetricPoint.step > after_step)
    query = query.order_by(MetricPoint.step, MetricPoint.id)
    rows = list(session.scalars(query.limit(limit + 1)))
    more = len(rows) > limit
    if more and rows[limit].step == rows[limit - 1].step:  # the cut falls inside a step
        split = rows[limit - 1].step
        whole = [r for r in rows[:limit] if r.step != split]
        if whole:
            return whole, True
        return list(session.scalars(query.where(MetricPoint.step == split))), True  # one step over the limit
    return rows[:limit], more


def list_checkpoints(session: Session, owner: str | None, job_id: str, after: int | None = None,
                     limit: int = 10) -> tuple[list[Checkpoint], bool]:
    """The checkpoints not marked removed, newest first; ``after`` is the id of the last one of the
    previous page. A checkpoint ``keep_checkpoints`` removed is marked (``deleted_at``) when the next one
    is recorded, and from then on not listed (nor resolved as a model)."""
    get_job(session, owner, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.deleted_at.is_(None))
    if after is not None:
        query = query.where(Checkpoint.id < after)
    rows = list(session.scalars(query.order_by(Checkpoint.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_evals(session: Session, owner: str | None, job_id: str, after: int | None = None,
               limit: int = 100) -> tuple[list[EvalResult], bool]:
    """Scores in the order they were recorded (base model first); ``after`` is the id of the last score
    of the previous page."""
    get_job(session, owner, job_id)
    query = select(EvalResult).where(EvalResult.job_id == job_id)
    if after is not None:
        query = query.where(EvalResult.id > after)
    rows = list(session.scalars(query.order_by(EvalResult.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def memory_summary(session: Session, owner: str | None, job_id: str) -> dict[str, Any]:
    """The predicted figures and, per rank, the largest measured peak with its breakdown (the first
    sample of that peak). Only those samples are read: a CUDA job has one per step and rank."""
    job = get_job(session, owner, job_id)
    count = session.scalar(select(func.count()).select_from(MemorySample).where(MemorySample.job_id == job_id))
    peaks = (select(MemorySample.rank, func.max(MemorySample.peak_bytes).label("peak"))
             .where(MemorySample.job_id == job_id).group_by(MemorySample.rank).subquery())
    best = session.scalars(
        select(MemorySample).join(peaks, and_(MemorySample.rank == peaks.c.rank,
                                              MemorySample.peak_bytes == peaks.c.peak))
        .where(MemorySample.job_id == job_id).order_by(MemorySample.rank, MemorySample.id))
    ranks: dict[int, MemorySample] = {}
    for sample in best:
        ranks.setdefault(sample.rank, sample)
    measured = [
        {"rank": rank, "step": s.step, "device": s.device, "source": s.source, "peak_bytes": s.peak_bytes,
         "parameters_bytes": s.parameters_bytes, "gradients_bytes": s.gradients_bytes,
         "optimizer_state_bytes": s.optimizer_state_bytes, "activations_bytes": s.activations_bytes,
         "other_bytes": s.other_bytes}
        for rank, s in sorted(ranks.items())
    ]
    return {"job_id": job_id, "predicted": job.predicted_memory, "measured": measured, "samples": count}


def measured_peaks(session: Session, job_ids: list[str]) -> dict[str, int]:
    """The largest measured peak of any rank, per job of ``job_ids`` that has memory samples (one query,
    for lists)."""
    if not job_ids:
        return {}
    rows = session.execute(select(MemorySample.job_id, func.max(MemorySample.peak_bytes))
                           .where(MemorySample.job_id.in_(job_ids)).group_by(MemorySample.job_id))
    return {job_id: int(peak) for job_id, peak in rows}
