"""What a worker writes while a job trains: metrics, memory samples, checkpoints, events, eval scores,
the heartbeat and the estimated finish, a batch at a time in one transaction."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session

from jobs.events import add_event
from jobs.models import Checkpoint, EvalResult, Job, MemorySample, MetricPoint, utcnow

_MEMORY_FIELDS = ("peak_bytes", "parameters_bytes", "gradients_bytes", "optimizer_state_bytes",
                  "activations_bytes", "other_bytes")


def record_progress(session: Session, job_id: str, records: list[tuple[str, int, dict[str, Any]]],
                    rank: int = 0) -> bool:
    """Write a batch of training records and a heartbeat in one transaction; True when cancel was asked."""
    job = session.get(Job, job_id)
    if job is None:
        return True
    now = utcnow()
    for kind, step, payload in records:
        if kind == "start":
            job.total_steps = payload.get("total_steps")
            message = (f"training started at step {payload.get('step', 0)} of {payload.get('total_steps')}: "
                       f"{payload.get('rows')} rows ({payload.get('format')}), {payload.get('truncated', 0)} "
                       f"truncated, {payload.get('dropped', 0)} dropped")
            add_event(session, job_id, message, data=payload)
        elif kind == "train":
            session.add(MetricPoint(job_id=job_id, step=step, kind="train", loss=payload["loss"],
                                    lr=payload.get("lr"), tokens_per_s=payload.get("tokens_per_s"),
                                    grad_norm=payload.get("grad_norm"), created_at=now))
            job.step = step
            job.trained_tokens = (job.trained_tokens or 0) + int(payload.get("tokens", 0))
            if payload.get("skipped"):
                add_event(session, job_id, f"step {step} skipped: fp16 overflow (loss scale lowered)", "warning")
        elif kind == "val":
            session.add(MetricPoint(job_id=job_id, step=step, kind="val", loss=payload["loss"], created_at=now))
        elif kind == "memory":
            session.add(MemorySample(job_id=job_id, step=step, rank=int(payload.get("rank", rank)),
                                     device=str(payload.get("device")),
                                     source=str(payload.get("source")),
                                     **{k: int(payload.get(k, 0)) for k in _MEMORY_FIELDS}))
        elif kind == "checkpoint":
            session.add(Checkpoint(job_id=job_id, step=step, path=payload["path"], created_at=now))
            add_event(session, job_id, f"checkpoint saved at step {step}", data=payload)
        elif kind == "event":
            add_event(session, job_id, payload.get("message", ""), payload.get("level", "info"))
        elif kind == "eval":
            record_eval(session, job_id, payload["task"], payload["split"], payload["metric"], float(payload["value"]),
                        int(payload["examples"]), payload["model_ref"], int(payload.get("truncated", 0)))
    job.heartbeat_at = now
    _update_estimate(job, now)
    return bool(job.cancel_requested)


def _update_estimate(job: Job, now: datetime) -> None:
    if not job.total_steps or not job.step or job.started_at is None:
        return
    started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
    per_step = (now - started).total_seconds() / job.step
    remaining = max(job.total_steps - job.step, 0) * per_step
    if math.isfinite(remaining):
        job.estimated_finish = now + timedelta(seconds=remaining)


def record_eval(session: Session, job_id: str, task: str, split: str, metric: str, value: float, examples: int,
                model_ref: str, truncated: int = 0) -> None:
    session.add(EvalResult(job_id=job_id, task=task, split=split, metric=metric, value=value,
                           examples=examples, model_ref=model_ref, truncated=truncated, created_at=utcnow()))
