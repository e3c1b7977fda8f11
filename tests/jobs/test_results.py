"""What a job produced, read back (SQLite and Postgres): memory summaries that read only the peaks,
checkpoints and scores paged, checkpoints removed by keep_checkpoints marked, the metrics CSV, the
start-up wake-ups of a worker, and the indexes on the files a job names."""

from __future__ import annotations

import csv
import io
import uuid

import pytest
from sqlalchemy import inspect

from jobs import results, telemetry
from jobs.db import database, make_engine
from jobs.migrate import upgrade
from jobs.models import EvalResult, Job, MemorySample
from jobs.settings import Settings
from tests.conftest import REDIS_URL, seed_jobs


@pytest.fixture
def job(database_url):
    upgrade(database_url)
    db = database(database_url)
    [job_id] = seed_jobs(db, [(1, 0)], "running")
    return db, job_id


def sample(job_id: str, step: int, rank: int, peak: int) -> MemorySample:
    return MemorySample(job_id=job_id, step=step, rank=rank, peak_bytes=peak, parameters_bytes=1, gradients_bytes=2,
                        optimizer_state_bytes=0, activations_bytes=3, other_bytes=4, device="cuda:0", source="cuda")


def test_the_memory_summary_reads_only_each_ranks_peak(job):
    db, job_id = job
    with db.session() as s:  # one sample per step and rank, as a CUDA job writes them
        s.add_all(sample(job_id, step, rank, 1000 + (step * 7 + rank * 13) % 500) for step in range(1, 1001)
                  for rank in range(2))
        s.add(sample(job_id, 1001, 1, 1499))  # a second sample at rank 1's peak: the first one is reported
    with db.session() as s:
        summary = results.memory_summary(s, "ann", job_id)
        loaded = [o for o in s.identity_map.values() if isinstance(o, MemorySample)]
    assert summary["samples"] == 2001
    peaks = {m["rank"]: (m["peak_bytes"], m["step"]) for m in summary["measured"]}
    expected = {}
    for rank in range(2):
        best = max(1000 + (step * 7 + rank * 13) % 500 for step in range(1, 1001))
        first = min(step for step in range(1, 1001) if 1000 + (step * 7 + rank * 13) % 500 == best)
        expected[rank] = (best, first)
    assert peaks == expected
    assert len(loaded) <= 2 + 3, f"{len(loaded)} samples loaded to report 2"  # the peaks (and ties), not all


def test_scores_and_checkpoints_are_paged(job, tmp_path):
    db, job_id = job
    folders = [tmp_path / f"step-{n}" for n in (1, 2, 3)]
    with db.session() as s:
        s.add_all(EvalResult(job_id=job_id, task="copa", split="validation", metric="acc", value=n / 10,
                             examples=10, model_ref="base") for n in range(5))
        for n, folder in enumerate(folders, 1):
            folder.mkdir()
            telemetry.record_checkpoint(s, s.get(Job, job_id), n, str(folder), 2.0 / n, None)
    with db.session() as s:
        first, more = results.list_evals(s, "ann", job_id, limit=3)
        rest, done = results.list_evals(s, "ann", job_id, after=first[-1].id, limit=3)
        assert [e.value for e in first + rest] == [0.0, 0.1, 0.2, 0.3, 0.4] and more and not done
        page, more = results.list_checkpoints(s, "ann", job_id, limit=2)
        tail, done = results.list_checkpoints(s, "ann", job_id, after=page[-1].id, limit=2)
        assert [c.step for c in page + tail] == [3, 2, 1] and more and not done
        assert page[0].metrics == {"train_loss": pytest.approx(2 / 3), "valid_loss": None, "trained_tokens": 0}


def test_checkpoints_that_keep_checkpoints_removed_are_marked_and_not_listed(job, tmp_path):
    db, job_id = job
    with db.session() as s:
        for n in (1, 2):
            (tmp_path / f"step-{n}").mkdir()
            telemetry.record_checkpoint(s, s.get(Job, job_id), n, str(tmp_path / f"step-{n}"), 1.0, None)
    (tmp_path / "step-1").rmdir()  # the training loop keeps the newest keep_checkpoints folders
    (tmp_path / "step-3").mkdir()
    with db.session() as s:
        telemetry.record_progress(s, job_id, [("checkpoint", 3, {"path": str(tmp_path / "step-3")})])
    with db.session() as s:
        listed, _ = results.list_checkpoints(s, "ann", job_id)
        assert [c.step for c in listed] == [3, 2]
        events, _ = results.list_events(s, "ann", job_id, limit=10)
        assert str(tmp_path) not in " ".join(f"{e.message} {e.data}" for e in events)  # no path of the node


def test_the_metrics_csv_has_openais_columns_first(job):
    db, job_id = job
    records = [("train", 1, {"loss": 2.5, "lr": 0.1, "tokens": 3, "tokens_per_s": 30.0, "grad_norm": 1.5}),
               ("train", 2, {"loss": 2.0, "lr": 0.1, "tokens": 3, "tokens_per_s": 31.0}),
               ("val", 2, {"loss": 2.2})]
    with db.session() as s:
        telemetry.record_progress(s, job_id, records)
    with db.session() as s:
        table = list(csv.reader(io.StringIO(telemetry.metrics_csv(s, job_id).decode())))
    assert table == [
        ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", "lr", "tokens_per_s",
         "grad_norm"],
        ["1", "2.5", "", "", "", "0.1", "30.0", "1.5"],
        ["2", "2.0", "", "2.2", "", "0.1", "31.0", ""],
    ]


def test_a_validation_loss_is_a_metrics_event(job):
    db, job_id = job
    with db.session() as s:
        telemetry.record_progress(s, job_id, [("train", 1, {"loss": 2.5}), ("val", 1, {"loss": 2.25})])
    with db.session() as s:
        events, _ = results.list_events(s, "ann", job_id)
    assert {"step": 1, "train_loss": 2.5, "valid_loss": 2.25} in [e.data for e in events]


def test_restarting_workers_do_not_multiply_wake_ups(database_url, tmp_path):
    """Each start sends one wake-up per slot of the worker, not one per queued job (10 here)."""
    import redis

    from worker.app import start_node

    upgrade(database_url)
    seed_jobs(database(database_url), [(1, 0)] * 10)
    settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS_URL,
                        queue=f"lomo-test-{uuid.uuid4().hex[:8]}", gpu_memory_gib=[24.0, 24.0])
    broker = redis.Redis.from_url(REDIS_URL)
    try:
        for _restart in range(3):
            start_node(settings)
        assert broker.llen(settings.queue) == 3 * 2
    finally:
        broker.delete(settings.queue)


def test_the_files_a_job_names_are_indexed(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    indexed = {tuple(ix["column_names"]) for ix in inspect(engine).get_indexes("jobs")}
    engine.dispose()
    assert {("training_file_id",), ("validation_file_id",)} <= indexed


def test_metric_pages_never_split_a_step(job):
    db, job_id = job
    records = []
    for step in range(1, 6):
        records.append(("train", step, {"loss": float(step)}))
        if step % 2 == 0:
            records.append(("val", step, {"loss": step + 0.5}))
    with db.session() as s:
        telemetry.record_progress(s, job_id, records)
    for limit in (1, 2, 3, 4):
        seen, after = [], None
        with db.session() as s:
            while True:
                page, more = results.list_metrics(s, "ann", job_id, after_step=after, limit=limit)
                seen += [(p.kind, p.step) for p in page]
                if not more:
                    break
                after = page[-1].step
        assert sorted(seen, key=lambda kv: (kv[1], kv[0] != "train")) == seen
        assert len(seen) == 7 and len(set(seen)) == 7, (limit, seen)  # every point once
