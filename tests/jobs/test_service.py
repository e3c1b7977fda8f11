"""The atomic claim, the conditional end of a run, progress records, model references (SQLite and Postgres)."""

from __future__ import annotations

import threading

import pytest

from jobs import catalog, errors, files, lifecycle, results, telemetry
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import Checkpoint, Job, MemorySample, MetricPoint
from jobs.schemas import JobCreate
from jobs.settings import Settings
from jobs.states import IllegalTransition, JobStatus, transition_values


@pytest.fixture
def env(tmp_path, database_url, tiny_model_dir):
    upgrade(database_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[tiny_model_dir.parent])
    db = database(database_url)
    upload = tmp_path / "up.part"
    upload.write_text('{"prompt": "a", "response": "b"}\n')
    with db.session() as s:
        row = files.store_file(s, settings, "ann", "d.jsonl", "fine-tune", upload)
        job = lifecycle.create_job(s, settings, "ann", JobCreate(model=tiny_model_dir.name, training_file=row.id))
    return settings, db, job.id


def test_of_many_concurrent_claims_exactly_one_wins(env):
    _settings, db, job_id = env
    results, barrier = [], threading.Barrier(6)

    def claim(n: int) -> None:
        barrier.wait()
        with db.session() as s:
            results.append(lifecycle.claim(s, job_id, f"worker-{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == "running" and job.attempt == 1 and job.claimed_by.startswith("worker-")
        assert job.started_at is not None and job.heartbeat_at is not None


def test_a_job_ends_once_and_only_from_running(env):
    _settings, db, job_id = env
    with db.session() as s:
        assert not lifecycle.finish_job(s, job_id, lifecycle.Outcome(JobStatus.SUCCEEDED))  # still queued
        assert lifecycle.claim(s, job_id, "w")
    with db.session() as s:
        assert lifecycle.finish_job(s, job_id, lifecycle.Outcome(JobStatus.FAILED, "nan_loss", "the loss became nan"))
    with db.session() as s:
        assert not lifecycle.finish_job(s, job_id, lifecycle.Outcome(JobStatus.SUCCEEDED))
        job = s.get(Job, job_id)
        assert (job.status, job.error_code, job.error_message) == ("failed", "nan_loss", "the loss became nan")
        assert job.finished_at is not None
    with pytest.raises(IllegalTransition):
        transition_values(JobStatus.FAILED, JobStatus.RUNNING)


def test_cancelling_a_running_job_asks_the_worker(env):
    _settings, db, job_id = env
    with db.session() as s:
        lifecycle.claim(s, job_id, "w")
    with db.session() as s:
        job = lifecycle.cancel_job(s, "ann", job_id)
        assert job.status == "running" and job.cancel_requested
    with db.session() as s:
        assert telemetry.record_progress(s, job_id, []) is True  # the worker's next write learns of it
    with pytest.raises(errors.NotFound), db.session() as s:
        lifecycle.cancel_job(s, "bob", job_id)  # another owner does not see the job


def test_progress_records_become_rows_and_an_estimate(env):
    _settings, db, job_id = env
    with db.session() as s:
        lifecycle.claim(s, job_id, "w")
    memory = {"peak_bytes": 100, "parameters_bytes": 40, "gradients_bytes": 1, "optimizer_state_bytes": 0,
              "activations_bytes": 50, "other_bytes": 9, "device": "cpu", "source": "cpu_tracker"}
    records = [
        ("start", 0, {"total_steps": 10, "step": 0, "rows": 5, "format": "instruct"}),
        ("val", 0, {"loss": 3.0}),
        ("train", 1, {"loss": 2.5, "lr": 0.1, "tokens": 7, "tokens_per_s": 70.0}),
        ("memory", 1, memory),
        ("train", 2, {"loss": 2.0, "lr": 0.1, "tokens": 8, "tokens_per_s": 80.0, "skipped": True}),
        ("checkpoint", 2, {"path": "/x/step-000002"}),
    ]
    with db.session() as s:
        assert telemetry.record_progress(s, job_id, records) is False
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.step, job.total_steps, job.trained_tokens) == (2, 10, 15)
        assert job.estimated_finish is not None
        points = s.query(MetricPoint).filter_by(job_id=job_id).order_by(MetricPoint.step, MetricPoint.id).all()
        assert [(p.kind, p.step, p.loss) for p in points] == [("val", 0, 3.0), ("train", 1, 2.5), ("train", 2, 2.0)]
        assert s.query(MemorySample).filter_by(job_id=job_id).one().activations_bytes == 50
        assert s.query(Checkpoint).filter_by(job_id=job_id).one().path == "/x/step-000002"
        summary = results.memory_summary(s, "ann", job_id)
        assert summary["measured"][0]["peak_bytes"] == 100 and summary["samples"] == 1
        events, _ = results.list_events(s, "ann", job_id, limit=100)
        assert any("skipped" in e.message and e.level == "warning" for e in events)


def test_registered_names_resolve_to_their_folders_and_nothing_else_does(tmp_path, tiny_model_dir):
    settings = Settings(data_dir=tmp_path, model_dirs=[tiny_model_dir.parent])
    assert catalog.registered_folder(settings, tiny_model_dir.name) == tiny_model_dir.resolve()
    assert tiny_model_dir.name in catalog.registered_models(settings)
    for not_a_name in (str(tiny_model_dir), f"../{tiny_model_dir.parent.name}/{tiny_model_dir.name}", "..", ".",
                       "nothing-like-it", f"{tiny_model_dir.name}/config.json", "a\x00b", "x" * 5000):
        assert catalog.registered_folder(settings, not_a_name) is None, not_a_name
