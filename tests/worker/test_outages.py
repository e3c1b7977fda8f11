"""Outages of seconds lose nothing: the real Postgres is stopped and started again while a job trains (the
worker keeps the job's records and writes them when it is back; the API answers 503 meanwhile), and the
watch of the queue wakes the workers for queued jobs whose messages a broker lost."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from jobs import lifecycle
from jobs.db import close_database, database
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job, JobEvent, MetricPoint, Node, aware
from jobs.settings import Settings
from tests.conftest import (
    INSTRUCT,
    STORIES,
    create_postgres_database,
    drop_postgres_database,
    need_shared,
    open_api_client,
)
from tests.worker.test_supervisor import job_row, run_until_step, submit
from worker.app import wake_idle


def postgres(action: str) -> None:
    """Stop or start the local Postgres cluster (the one the tests use), as its administrator would."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
                   + (["-m", "fast"] if action == "stop" else []), check=True, capture_output=True, timeout=60)


def test_postgres_stopped_and_started_during_a_job_loses_no_metric_point(tmp_path):
    url = create_postgres_database()
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, flush_interval_s=0.2, device="cpu")
    db = database(url)
    api = open_api_client(settings, raise_server_exceptions=False)
    steps = 200
    job_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=steps, batch_size=4,
                    max_seq_len=64, lr=5e-3)
    metrics = settings.data_dir / "jobs" / job_id / "metrics.jsonl"
    thread, outcome = run_until_step(settings, db, job_id, 5)
    try:
        postgres("stop")
        try:
            logged = len(metrics.read_text().splitlines())
            time.sleep(3)
            answer = api.get(f"/v1/fine_tuning/jobs/{job_id}")
            assert answer.status_code == 503 and answer.headers["retry-after"]
            assert answer.json()["error"]["code"] == "database_unavailable"
            assert len(metrics.read_text().splitlines()) > logged  # the training went on meanwhile
            assert thread.is_alive()
        finally:
            postgres("start")
        thread.join(timeout=180)
        assert outcome == ["succeeded"]
        job = job_row(db, job_id)
        assert (job.status, job.step, job.attempt) == ("succeeded", steps, 1)
        with db.session() as s:
            logged_steps = [p.step for p in s.query(MetricPoint).filter_by(job_id=job_id, kind="train")
                            .order_by(MetricPoint.step)]
            said = [e.message for e in s.query(JobEvent).filter_by(job_id=job_id)]
            assert s.query(GpuLease).filter(GpuLease.released_at.is_(None)).count() == 0
        assert logged_steps == list(range(1, steps + 1))  # every point once: none lost, none twice
        assert any(m.startswith("the database could not be reached for") for m in said)
        assert api.get("/v1/fine_tuning/jobs").status_code == 200  # the API is back too, without a restart
    finally:
        thread.join(timeout=180)
        close_database(url)
        drop_postgres_database(url)


def test_the_watch_wakes_one_worker_per_free_gpu_while_jobs_are_queued(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'lomo.db'}"
    upgrade(url)
    db = database(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, gpu_memory_gib=[24.0, 24.0],
                        worker_name="node-a")
    sent: list[tuple[str, bool]] = []
    monkeypatch.setattr("worker.app.enqueue", lambda _settings, job_id, poll=True, **_: sent.append((job_id, poll)))
    assert wake_idle(settings, db, slots=2) == 0  # nothing queued: nothing sent
    first = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=2)
    second = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=2)
    third = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=2)
    assert wake_idle(settings, db, slots=2) == 2 and sent == [(first, False), (second, False)]  # 2 GPUs free
    with db.session() as s:
        assert lifecycle.claim(s, first, "node-a:1")
        s.add(GpuLease(node="node-a", device_index=0, job_id=first))
    sent.clear()
    assert wake_idle(settings, db, slots=2) == 1 and sent == [(second, False)]  # one GPU left
    assert wake_idle(settings, db, slots=1) == 0  # a free GPU, but the worker's only slot is busy
    with db.session() as s:
        s.add(GpuLease(node="node-b", device_index=1, job_id=third))  # another node's: not this one's
    sent.clear()
    assert wake_idle(settings, db, slots=2) == 1
    cpu = settings.model_copy(update={"gpu_memory_gib": []})  # a CPU node: its worker's slots count
    sent.clear()
    assert wake_idle(cpu, db, slots=2) == 1 and wake_idle(cpu, db, slots=1) == 0
    with db.session() as s:
        assert s.get(Job, first).claimed_by == "node-a:1"


def test_after_the_database_was_unreachable_recovery_waits_a_heartbeat_timeout(tmp_path, monkeypatch):
    """After an outage every heartbeat is as old as the outage: the watch takes no job for lost until the
    live workers have had a heartbeat timeout to write theirs."""
    from sqlalchemy.exc import OperationalError

    from worker import app as worker_app

    url = f"sqlite:///{tmp_path / 'lomo.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, heartbeat_timeout_s=1.0)
    looked: list[float] = []
    failed: list[float] = []

    def recover(_db, _settings):
        looked.append(time.monotonic())
        return []

    def wake(_settings, _db, _slots):
        if len(failed) < 2:  # the database is away for the first two rounds
            failed.append(time.monotonic())
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return 0

    monkeypatch.setattr(worker_app, "recover_lost", recover)
    monkeypatch.setattr(worker_app, "wake_idle", wake)
    long_ago = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with database(url).session() as s:
        s.add(Node(name=settings.worker_name, gpu_memory_gib=[], seen_at=long_ago))
    stop = threading.Event()
    watch = threading.Thread(target=worker_app.watch_the_queue, args=(settings, 1, stop))
    watch.start()
    time.sleep(2.5)
    stop.set()
    watch.join(5)
    assert len(failed) == 2 and looked
    assert all(moment < failed[0] or moment - failed[-1] >= settings.heartbeat_timeout_s for moment in looked)
    assert looked[-1] > failed[-1]  # and it looks again once that time has passed
    with database(url).session() as s:  # and each round that reached the database said the node is up
        assert aware(s.get(Node, settings.worker_name).seen_at) > long_ago
