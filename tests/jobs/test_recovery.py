"""Jobs whose worker was lost (SQLite and Postgres): recovered by heartbeat, within the recovery budget,
and the lost attempt fenced: it writes, ends and releases nothing of the new one's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs import leases, lifecycle, results, telemetry
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import EvalResult, GpuLease, Job, MetricPoint, utcnow
from jobs.recovery import recover_lost
from jobs.settings import Settings
from jobs.states import JobStatus
from tests.conftest import seed_jobs


@pytest.fixture
def env(database_url, tmp_path):
    upgrade(database_url)
    db = database(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, heartbeat_timeout_s=60, max_recoveries=2)
    return db, settings


def running(db, job_id: str, attempt: int, silent_s: float, devices=(0,), cancel=False) -> None:
    with db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.attempt, job.claimed_by = "running", attempt, "node-a:123"
        job.started_at, job.cancel_requested = utcnow(), cancel
        job.heartbeat_at = utcnow() - timedelta(seconds=silent_s)
        s.add_all(GpuLease(node="node-a", device_index=i, job_id=job_id, attempt=attempt) for i in devices)


def test_a_job_not_heard_of_goes_back_to_the_queue_and_frees_its_gpus(env):
    db, settings = env
    lost, alive = seed_jobs(db, [(2, 0), (1, 0)])
    running(db, lost, 1, silent_s=90, devices=(0, 1))
    running(db, alive, 1, silent_s=5, devices=(2,))
    assert recover_lost(db, settings) == [lost]
    with db.session() as s:
        job = s.get(Job, lost)
        assert (job.status, job.claimed_by, job.attempt) == ("queued", None, 1)
        assert s.get(Job, alive).status == "running"
        assert leases.leased_devices(s, "node-a") == {2: alive}
        events, _ = results.list_events(s, "ann", lost)
    assert "worker node-a:123 lost: no heartbeat for 90 s" in events[0].message
    assert "recovery 1 of at most 2" in events[0].message
    assert recover_lost(db, settings) == []  # once


def test_past_the_recovery_budget_the_job_fails_and_a_cancelled_one_ends_cancelled(env):
    db, settings = env
    spent, cancelled = seed_jobs(db, [(1, 0), (1, 0)])
    running(db, spent, 3, silent_s=120)  # 2 recoveries already (attempts 2 and 3)
    with db.session() as s:
        s.get(Job, spent).recoveries = 2
    running(db, cancelled, 1, silent_s=120, devices=(1,), cancel=True)
    assert recover_lost(db, settings) == []
    with db.session() as s:
        job = s.get(Job, spent)
        assert (job.status, job.error_code) == ("failed", "worker_lost") and "3 times" in job.error_message
        assert s.get(Job, cancelled).status == "cancelled"
        assert leases.leased_devices(s, "node-a") == {}


def test_the_lost_attempt_is_fenced(env):
    db, settings = env
    [job_id] = seed_jobs(db, [(1, 0)])
    running(db, job_id, 1, silent_s=90)
    recover_lost(db, settings)
    running(db, job_id, 2, silent_s=0, devices=(3,))  # claimed again elsewhere, on GPU 3
    with pytest.raises(telemetry.Fenced), db.session() as s:  # the old attempt wakes up and reports
        telemetry.record_progress(s, job_id, [("train", 7, {"loss": 1.0})], attempt=1)
    with db.session() as s:
        assert s.query(MetricPoint).filter_by(job_id=job_id).count() == 0  # nothing of it landed
        assert not lifecycle.finish_job(s, job_id, lifecycle.Outcome(JobStatus.FAILED, "x", "y"), attempt=1)
        assert leases.release(s, job_id, attempt=1) == 0
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.attempt) == ("running", 2)
        assert leases.leased_devices(s, "node-a") == {3: job_id}
        assert telemetry.record_progress(s, job_id, [("train", 1, {"loss": 1.0})], attempt=2) is False
    with db.session() as s:
        assert lifecycle.finish_job(s, job_id, lifecycle.Outcome(JobStatus.SUCCEEDED), attempt=2)


def test_a_resumed_attempt_forgets_what_the_lost_one_did_after_the_checkpoint(env, tmp_path):
    db, _settings = env
    [job_id] = seed_jobs(db, [(1, 0)])
    running(db, job_id, 1, silent_s=0)
    (tmp_path / "step-2").mkdir()
    records = [("train", 1, {"loss": 3.0, "tokens": 10}), ("train", 2, {"loss": 2.0, "tokens": 10}),
               ("checkpoint", 2, {"path": str(tmp_path / "step-2")}), ("train", 3, {"loss": 1.5, "tokens": 10})]
    with db.session() as s:
        telemetry.record_progress(s, job_id, records, attempt=1)
    with db.session() as s:
        job = s.get(Job, job_id)
        job.attempt = 2  # recovered; the next attempt starts from the checkpoint at step 2
    with db.session() as s:
        telemetry.record_progress(s, job_id, [("start", 2, {"total_steps": 4, "step": 2}),
                                              ("train", 3, {"loss": 1.4, "tokens": 10})], attempt=2)
    with db.session() as s:
        points = [(p.step, p.loss) for p in s.query(MetricPoint).filter_by(job_id=job_id).order_by(MetricPoint.step)]
        job = s.get(Job, job_id)
    assert points == [(1, 3.0), (2, 2.0), (3, 1.4)]  # step 3 once, from the attempt that counts
    assert (job.step, job.trained_tokens) == (3, 30)


def test_an_attempt_lost_before_its_first_checkpoint_is_forgotten_by_the_next(env):
    db, _settings = env
    [job_id] = seed_jobs(db, [(1, 0)])
    running(db, job_id, 1, silent_s=0)
    with db.session() as s:
        telemetry.record_progress(s, job_id, [("start", 0, {"total_steps": 4, "step": 0}),
                                              ("val", 0, {"loss": 4.0}), ("train", 1, {"loss": 3.0, "tokens": 10}),
                                              ("train", 2, {"loss": 2.0, "tokens": 10})], attempt=1)
    with db.session() as s:
        s.get(Job, job_id).attempt = 2  # recovered with no checkpoint: it starts again from step 0
    with db.session() as s:
        telemetry.record_progress(s, job_id, [("start", 0, {"total_steps": 4, "step": 0}),
                                              ("val", 0, {"loss": 4.0}), ("train", 1, {"loss": 3.0, "tokens": 10})],
                                  attempt=2)
    with db.session() as s:
        points = [(p.kind, p.step) for p in s.query(MetricPoint).filter_by(job_id=job_id)
                  .order_by(MetricPoint.step, MetricPoint.kind)]
        job = s.get(Job, job_id)
    assert points == [("val", 0), ("train", 1)]  # each once, from the attempt that counts
    assert (job.step, job.trained_tokens) == (1, 10)


def test_what_the_lost_attempt_logged_but_never_reported_is_backfilled(env, tmp_path):
    db, _settings = env
    [job_id] = seed_jobs(db, [(1, 0)])
    running(db, job_id, 1, silent_s=0)
    with db.session() as s:  # reported before the kill: steps 1 and 2
        telemetry.record_progress(s, job_id, [("train", 1, {"loss": 3.0, "tokens": 10}),
                                              ("train", 2, {"loss": 2.5, "tokens": 10})], attempt=1)
    logged = [("train", n, {"loss": 3.0 - n / 4, "tokens": 10}) for n in range(1, 5)] + [("val", 4, {"loss": 2.2})]
    with db.session() as s:  # the next attempt resumes from the checkpoint at step 4 the lost one saved
        telemetry.backfill(s, job_id, 4, str(tmp_path / "step-4"), logged)
    with db.session() as s:
        points = sorted((p.kind, p.step) for p in s.query(MetricPoint).filter_by(job_id=job_id))
        job = s.get(Job, job_id)
        listed, _ = results.list_checkpoints(s, "ann", job_id)
    assert points == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4)]
    assert job.trained_tokens == 40
    assert [(c.step, c.metrics["train_loss"], c.metrics["valid_loss"]) for c in listed] == [(4, 2.0, 2.2)]


def test_a_batch_written_twice_adds_its_points_once(env):
    """A worker that sends a batch again (its commit went through but the answer was lost in an outage)."""
    db, _settings = env
    [job_id] = seed_jobs(db, [(1, 0)])
    running(db, job_id, 1, silent_s=0)
    score = {"task": "copa", "split": "validation", "metric": "acc", "value": 0.5, "examples": 4, "model_ref": "base"}
    batch = [("eval", 0, score), ("train", 1, {"loss": 3.0, "tokens": 10}), ("train", 2, {"loss": 2.0, "tokens": 10})]
    for _ in range(2):
        with db.session() as s:
            telemetry.record_progress(s, job_id, batch, attempt=1)
    with db.session() as s:
        points = [p.step for p in s.query(MetricPoint).filter_by(job_id=job_id).order_by(MetricPoint.step)]
        scores = [(e.task, e.model_ref, e.value) for e in s.query(EvalResult).filter_by(job_id=job_id)]
        job = s.get(Job, job_id)
    assert points == [1, 2] and (job.step, job.trained_tokens) == (2, 20)
    assert scores == [("copa", "base", 0.5)]  # a model scored again replaces its score
