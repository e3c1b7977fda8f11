"""What a worker writes while a job trains: metrics, memory samples, checkpoints, events, eval scores,
the heartbeat and the estimated finish, a batch at a time in one transaction."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.admission import job_output_dir
from jobs.catalog import checkpoint_name
from jobs.events import add_event
from jobs.files import store_result_file
from jobs.models import Checkpoint, EvalResult, Job, MemorySample, MetricPoint, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus

_MEMORY_FIELDS = ("peak_bytes", "parameters_bytes", "gradients_bytes", "optimizer_state_bytes",
                  "activations_bytes", "other_bytes")


class Fenced(Exception):
    """The job is no longer this attempt's (it was recovered after its worker was taken for lost, or it
    ended): the attempt writes nothing more and stops."""


def record_progress(session: Session, job_id: str, records: list[tuple[str, int, dict[str, Any]]],
                    rank: int = 0, attempt: int | None = None) -> bool:
    """Write a batch of training records and a heartbeat in one transaction; True when cancel was asked
    (see ``pause_requested`` for a pause).

    With ``attempt``, the job's row is locked and checked first: when the job is not running (or pausing)
    in that attempt any more, nothing is written and Fenced is raised."""
    if attempt is not None:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status not in (JobStatus.RUNNING.value, JobStatus.PAUSING.value) \
                or job.attempt != attempt:
            raise Fenced(job_id)
    else:
        job = session.get(Job, job_id)
    if job is None:
        return True
    now = utcnow()
    last: dict[str, float | None] = {"train": None, "val": None}  # the latest losses, for checkpoints' metrics
    for kind, step, payload in records:
        if kind == "start":
            job.total_steps = payload.get("total_steps")
            if step > 0 or job.attempt > 1:  # what an earlier attempt did after this start is done again
                _rewind(session, job, step)
            message = (f"training started at step {payload.get('step', 0)} of {payload.get('total_steps')}: "
                       f"{payload.get('rows')} rows ({payload.get('format')}), {payload.get('truncated', 0)} "
                       f"truncated, {payload.get('dropped', 0)} dropped")
            add_event(session, job_id, message, data=payload)
        elif kind == "train":
            if step <= (job.step or 0):  # written already (a batch sent again after its commit's answer was lost)
                continue
            session.add(MetricPoint(job_id=job_id, step=step, kind="train", loss=payload["loss"],
                                    lr=payload.get("lr"), tokens_per_s=payload.get("tokens_per_s"),
                                    grad_norm=payload.get("grad_norm"), created_at=now))
            job.step, last["train"] = step, payload["loss"]
            job.trained_tokens = (job.trained_tokens or 0) + int(payload.get("tokens", 0))
            if payload.get("skipped"):
                add_event(session, job_id, f"step {step} skipped: fp16 overflow (loss scale lowered)", "warning")
        elif kind == "val":
            session.add(MetricPoint(job_id=job_id, step=step, kind="val", loss=payload["loss"], created_at=now))
            last["val"] = payload["loss"]
            metrics = {"step": step, "train_loss": _latest(session, job_id, "train", last),
                       "valid_loss": payload["loss"]}
            add_event(session, job_id, f"step {step}: validation loss {payload['loss']:.4f}", data=metrics)
        elif kind == "memory":
            session.add(MemorySample(job_id=job_id, step=step, rank=int(payload.get("rank", rank)),
                                     device=str(payload.get("device")),
                                     source=str(payload.get("source")),
                                     **{k: int(payload.get(k, 0)) for k in _MEMORY_FIELDS}))
        elif kind == "checkpoint":
            record_checkpoint(session, job, step, payload["path"], _latest(session, job_id, "train", last),
                              _latest(session, job_id, "val", last))
        elif kind == "event":
            add_event(session, job_id, payload.get("message", ""), payload.get("level", "info"))
        elif kind == "eval":
            record_eval(session, job_id, payload["task"], payload["split"], payload["metric"], float(payload["value"]),
                        int(payload["examples"]), payload["model_ref"], int(payload.get("truncated", 0)))
    job.heartbeat_at = now
    _update_estimate(job, now)
    return bool(job.cancel_requested)


def backfill(session: Session, job_id: str, step: int, checkpoint_path: str,
             records: list[tuple[str, int, dict[str, Any]]]) -> None:
    """Before an attempt resumes from the checkpoint at ``step``: the train and val points up to it that
    the lost attempt logged (its ``metrics.jsonl``) but never reported are added, the checkpoint is listed
    if it was not, and the trained tokens are those of the steps up to it."""
    job = session.get(Job, job_id)
    have = set(session.execute(select(MetricPoint.kind, MetricPoint.step).where(
        MetricPoint.job_id == job_id, MetricPoint.step <= step)).all())
    tokens = 0
    for kind, at, payload in records:
        if kind == "train":
            tokens += int(payload.get("tokens", 0))
        if (kind, at) in have:
            continue
        session.add(MetricPoint(job_id=job_id, step=at, kind=kind, loss=payload["loss"], lr=payload.get("lr"),
                                tokens_per_s=payload.get("tokens_per_s"), grad_norm=payload.get("grad_norm"),
                                created_at=utcnow()))
    if records:
        job.trained_tokens = tokens
    if not session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.step == step,
                                                      Checkpoint.deleted_at.is_(None))):
        last = {kind: next((p["loss"] for k, _at, p in reversed(records) if k == kind), None)
                for kind in ("train", "val")}
        record_checkpoint(session, job, step, checkpoint_path, last["train"], last["val"])


def still_running(session: Session, job_id: str, attempt: int) -> bool:
    """For a node that joined a job spread over several nodes (it writes no records nor heartbeat): True
    when its cancellation was asked; raises Fenced when the job is no longer running in ``attempt``."""
    row = session.execute(select(Job.status, Job.attempt, Job.cancel_requested).where(Job.id == job_id)).first()
    if row is None or row.status not in (JobStatus.RUNNING.value, JobStatus.PAUSING.value) or row.attempt != attempt:
        raise Fenced(job_id)
    return bool(row.cancel_requested)


def pause_requested(session: Session, job_id: str) -> bool:
    """Whether the job was asked to pause (``pausing``): the worker then has its run checkpoint and stop."""
    return session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.PAUSING.value


def _rewind(session: Session, job: Job, step: int) -> None:
    """Forget the points an earlier attempt wrote after ``step`` (the checkpoint this attempt resumes
    from; at step 0, a start from scratch, all of them, the base model's validation point too, which the
    new attempt writes again), and take the trained tokens back to what they were there."""
    after = MetricPoint.step > step if step > 0 else MetricPoint.step >= 0
    session.execute(delete(MetricPoint).where(MetricPoint.job_id == job.id, after))
    session.execute(delete(MemorySample).where(MemorySample.job_id == job.id, MemorySample.step > step))
    if step == 0:
        job.trained_tokens = 0
    row = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
                          .order_by(Checkpoint.id.desc())).first()
    if row is not None and row.metrics and row.metrics.get("trained_tokens") is not None:
        job.trained_tokens = int(row.metrics["trained_tokens"])
    job.step = step


def _latest(session: Session, job_id: str, kind: str, last: dict[str, float | None]) -> float | None:
    """The latest loss of ``kind`` (train | val): from this batch of records, else the stored ones."""
    if last[kind] is not None:
        return last[kind]
    session.flush()
    return session.scalar(select(MetricPoint.loss).where(MetricPoint.job_id == job_id, MetricPoint.kind == kind)
                          .order_by(MetricPoint.step.desc(), MetricPoint.id.desc()).limit(1))


def record_checkpoint(session: Session, job: Job, step: int, path: str, train_loss: float | None,
                      valid_loss: float | None, final: bool = False) -> None:
    """A checkpoint row with its figures; rows whose folder ``keep_checkpoints`` has removed since are
    marked deleted (they are not listed, and their names no longer resolve)."""
    metrics = {"train_loss": train_loss, "valid_loss": valid_loss}
    session.add(Checkpoint(job_id=job.id, step=step, path=path, created_at=utcnow(),
                           metrics={**metrics, "trained_tokens": job.trained_tokens or 0}))
    for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.deleted_at.is_(None))):
        if row.path != path and not Path(row.path).is_dir():
            row.deleted_at = utcnow()
    name = checkpoint_name(job.model, job.suffix, job.id, step)
    add_event(session, job.id, f"{'final model' if final else 'checkpoint'} saved at step {step}: {name}",
              data={"step": step, "checkpoint": name, **metrics})


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
    """One score of one model of the job; the same model scored again on the same examples (an attempt
    that started over, a batch sent twice) replaces its score instead of adding a second one."""
    session.flush()
    row = session.scalars(select(EvalResult).where(
        EvalResult.job_id == job_id, EvalResult.task == task, EvalResult.split == split,
        EvalResult.metric == metric, EvalResult.model_ref == model_ref, EvalResult.examples == examples)).first()
    if row is None:
        session.add(EvalResult(job_id=job_id, task=task, split=split, metric=metric, value=value,
                               examples=examples, model_ref=model_ref, truncated=truncated, created_at=utcnow()))
    else:
        row.value, row.truncated, row.created_at = value, truncated, utcnow()


def publish_results(session: Session, settings: Settings, job_id: str) -> list[str]:
    """At a job's success: its final model listed as its last checkpoint, and its metrics as a CSV file
    of the job's owner (OpenAI's columns first). Returns the result files' ids."""
    job = session.get(Job, job_id)
    model_dir = job_output_dir(settings, job_id) / "model"
    if model_dir.is_dir() and not session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id,
                                                                             Checkpoint.step == job.step)):
        record_checkpoint(session, job, job.step, str(model_dir), _latest(session, job_id, "train", {"train": None}),
                          _latest(session, job_id, "val", {"val": None}), final=True)
    table = store_result_file(session, settings, job.owner_id, f"{job_id}-metrics.csv", metrics_csv(session, job_id))
    return [table.id]


def metrics_csv(session: Session, job_id: str) -> bytes:
    """One row per step: OpenAI's columns (``step,train_loss,train_accuracy,valid_loss,
    valid_mean_token_accuracy``; accuracies are not measured here and stay empty), then ``lr``,
    ``tokens_per_s`` and ``grad_norm``."""
    rows: dict[int, dict[str, Any]] = {}
    for point in session.scalars(select(MetricPoint).where(MetricPoint.job_id == job_id)
                                 .order_by(MetricPoint.step, MetricPoint.id)):
        row = rows.setdefault(point.step, {})
        if point.kind == "train":
            row.update(train_loss=point.loss, lr=point.lr, tokens_per_s=point.tokens_per_s, grad_norm=point.grad_norm)
        else:
            row["valid_loss"] = point.loss
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ("train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", "lr", "tokens_per_s",
               "grad_norm")
    writer.writerow(("step", *columns))
    for step in sorted(rows):
        writer.writerow((step, *("" if rows[step].get(c) is None else rows[step][c] for c in columns)))
    return out.getvalue().encode()
