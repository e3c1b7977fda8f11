"""Scheduling end to end: two real Celery worker processes (2 slots each) share one node's 3 simulated
GPUs through Postgres + Redis. Jobs of 1, 2 and 3 GPUs and two priorities are submitted through the
REST API and train stories260K for real (a 2- or 3-GPU job runs as 2 or 3 ZeRO-3 ranks on the CPU).

Checked: no GPU is ever leased to two jobs at once (the lease rows' intervals), every job runs to its
end, jobs of one size start in queue order (priority, then first come), backfill never lets more than
``LOMO_BACKFILL_LIMIT`` jobs overtake a waiting one, and the GPUs of a job whose training process is
killed come back to the jobs that wait for them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job
from jobs.settings import Settings
from tests.conftest import (
    INSTRUCT,
    REDIS_URL,
    STORIES,
    create_postgres_database,
    drop_postgres_database,
    need_shared,
    open_api_client,
)
from tests.e2e.live_service import processes

ROOT = Path(__file__).resolve().parents[2]
TINY = {"max_steps": 2, "batch_size": 2, "max_seq_len": 64, "lr": 1e-3}
LIMIT = 2


def training_pids(job_id: str, module: bytes = b"worker.runner") -> list[int]:
    """The worker.runner process of a job (its command line names the job's config); with ``module``
    ``lomo_core.zero3.launch``, torch.distributed.run and the ranks of a job on several ranks."""
    return processes(module, containing=job_id.encode())


@pytest.fixture
def node(tmp_path):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    url = create_postgres_database()
    upgrade(url)
    env = {**os.environ, "LOMO_DATA_DIR": str(tmp_path / "var"), "LOMO_QUEUE": f"lomo-sched-{uuid.uuid4().hex[:8]}",
           "LOMO_DATABASE_URL": url, "LOMO_BROKER_URL": REDIS_URL, "LOMO_FLUSH_INTERVAL_S": "0.3",
           "LOMO_DEVICE": "cpu",
           "LOMO_MODEL_DIRS": json.dumps([str(STORIES.parent)]),
           "LOMO_GPU_MEMORY_GIB": "[24, 24, 24]", "LOMO_WORKER_NAME": "node-a",
           "LOMO_REQUEUE_DELAY_S": "1", "LOMO_BACKFILL_LIMIT": str(LIMIT)}
    settings = Settings(data_dir=Path(env["LOMO_DATA_DIR"]), model_dirs=[STORIES.parent],
                        database_url=url, broker_url=REDIS_URL,
                        queue=env["LOMO_QUEUE"], gpu_memory_gib=[24, 24, 24], device="cpu")
    settings.data_dir.mkdir(parents=True)
    api = open_api_client(settings)
    workers: list[subprocess.Popen] = []

    def start_workers() -> None:
        for n in range(2):
            log = (tmp_path / f"worker-{n}.log").open("wb")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "client.cli", "worker", "--concurrency", "2"], cwd=ROOT,
                env={**env, "LOMO_WORKER_NAME": "node-a"}, stdout=log, stderr=subprocess.STDOUT))

    yield api, settings, start_workers, workers, tmp_path
    api.__exit__(None, None, None)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    import redis

    redis.Redis.from_url(REDIS_URL).delete(settings.queue)
    drop_postgres_database(url)


def test_jobs_of_mixed_sizes_and_priorities_share_the_gpus_of_a_node(node):
    api, settings, start_workers, workers, tmp = node
    file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]

    def submit(gpus: int, priority: int = 0, **hyper) -> str:
        body = {"model": STORIES.name, "training_file": file_id, "gpus": gpus, "priority": priority,
                "hyperparameters": {**TINY, **hyper}}
        response = api.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    # Submitted while no worker runs, so the whole queue is there when the workers start.
    doomed = submit(1, priority=9, max_steps=100000)  # first to start; its training process gets killed
    jobs = [doomed, submit(3), submit(1), submit(2), submit(1, priority=5), submit(1), submit(2, priority=5),
            submit(1)]
    start_workers()

    deadline = time.monotonic() + 120
    def stepped() -> bool:
        return api.get(f"/v1/fine_tuning/jobs/{doomed}").json()["progress"]["step"] >= 1

    while not (pids := training_pids(doomed)) or not stepped():
        assert time.monotonic() < deadline, "the first job never started training"
        assert all(w.poll() is None for w in workers), "a worker died"
        time.sleep(0.3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would

    deadline = time.monotonic() + 420
    while True:
        states = {j: api.get(f"/v1/fine_tuning/jobs/{j}").json() for j in jobs}
        if all(s["status"] in ("succeeded", "failed", "cancelled") for s in states.values()):
            break
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp.glob("worker-*.log")))
        assert time.monotonic() < deadline, f"jobs stuck: {[(j, s['status']) for j, s in states.items()]}\n{logs}"
        assert all(w.poll() is None for w in workers), f"a worker died\n{logs}"
        time.sleep(0.5)

    assert states[doomed]["status"] == "failed" and states[doomed]["error"]["code"] == "process_killed"
    for job_id in jobs[1:]:
        assert states[job_id]["status"] == "succeeded", (job_id, states[job_id].get("error"))

    db = database(settings.resolved_database_url())
    with db.session() as s:
        rows = s.execute(select(GpuLease.device_index, GpuLease.job_id, GpuLease.leased_at, GpuLease.released_at)
                         .where(GpuLease.node == "node-a")).all()
        order = list(s.scalars(select(Job.id).order_by(Job.priority.desc(), Job.created_at, Job.id)))
        started = {j.id: j.started_at for j in s.scalars(select(Job))}
        gpus = {j.id: j.gpus for j in s.scalars(select(Job))}
    assert all(released is not None for *_, released in rows)  # every GPU given back
    for device in {r.device_index for r in rows}:  # never two jobs on one GPU at once
        spans = sorted((r.leased_at, r.released_at, r.job_id) for r in rows if r.device_index == device)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            assert end <= begin, f"GPU {device} leased to {a} and {b} at once"
    assert sorted({r.job_id for r in rows}) == sorted(jobs)  # each job held GPUs...
    assert all(sum(1 for r in rows if r.job_id == j) == gpus[j] for j in jobs)  # ...as many as it asked for, once
    doomed_end = next(r.released_at for r in rows if r.job_id == doomed)
    doomed_devices = {r.device_index for r in rows if r.job_id == doomed}
    assert any(r.leased_at >= doomed_end for r in rows if r.device_index in doomed_devices and r.job_id != doomed)
    for size in set(gpus.values()):  # among jobs of one size: the queue's order
        same = [j for j in order if gpus[j] == size]
        assert [started[j] for j in same] == sorted(started[j] for j in same), size
    for j in order:  # backfill is bounded
        assert sum(1 for k in order[order.index(j) + 1:] if started[k] < started[j]) <= LIMIT, j
