"""A worker killed mid-job (its whole process tree, SIGKILL): another, already running worker recovers the job
by its heartbeat, and the job resumes from its latest checkpoint to the weights of an uninterrupted run, bit
for bit; on one rank and on two (whose launcher and ranks die with the worker). Real processes: Postgres,
Redis, two `lomo worker`s, stories260K training on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
from tests.e2e.live_service import worker_env
from tests.e2e.test_scheduling import training_pids

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 4
JOB = {"max_steps": 100, "batch_size": 4, "max_seq_len": 64, "lr": 5e-3, "save_every": 10, "keep_checkpoints": 2}


def running_workers(tmp_path, env, names):
    workers = {}
    for name in names:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            workers[name] = (subprocess.Popen(
                [sys.executable, "-m", "client.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                env={**env, "LOMO_WORKER_NAME": name}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True),
                log)
    deadline = time.monotonic() + 90
    for process, log in workers.values():
        while " ready." not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    return workers


def stop_workers(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each live worker's process group; SIGKILL to one that has not stopped in 30 s."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    url = create_postgres_database()
    env, settings = worker_env(tmp_path / "var", url, "lomo-rec", heartbeat_timeout_s=str(TIMEOUT_S),
                               requeue_delay_s="1")
    workers = running_workers(tmp_path, env, ["node-a", "node-b"])
    api = open_api_client(settings)
    yield api, settings, workers
    api.__exit__(None, None, None)
    stop_workers([process for process, _log in workers.values()])
    import redis

    redis.Redis.from_url(REDIS_URL).delete(settings.queue)
    drop_postgres_database(url)


def wait(api, job_id, until, timeout=240, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} stuck: {job}\n" + "\n".join(Path(p).read_text()[-2000:] for p in logs))


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_killed_workers_job_resumes_elsewhere_to_the_weights_of_an_uninterrupted_run(cluster, ranks):
    api, settings, workers = cluster
    logs = [log for _p, log in workers.values()]
    file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]
    # on 2 ranks (ZeRO-3, each rank's partitions in the checkpoint) a shorter job: a step costs more there
    hyper = JOB if ranks == 1 else {**JOB, "max_steps": 40}
    body = {"model": STORIES.name, "training_file": file_id, "seed": 5, "hyperparameters": hyper,
            **({"gpus": ranks} if ranks > 1 else {})}
    job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait(api, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 12, logs=logs)
    victim = next(name for name in workers if str(_claimed_by(settings, job_id)).startswith(f"{name}:"))
    children = training_pids(job_id)
    assert children, f"no training process of {job_id} was found"
    # the launcher and its ranks: they must die with the worker too
    ranks_found = training_pids(job_id, b"lomo_core.zero3.launch")
    assert len(ranks_found) >= (ranks + 1 if ranks > 1 else 0), ranks_found
    children += ranks_found
    killed_at = time.monotonic()
    os.killpg(workers[victim][0].pid, signal.SIGKILL)  # the worker and its pool; its training child is elsewhere
    workers[victim][0].wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in children):
        assert time.monotonic() < deadline, "the training process outlived its worker:\n" + "\n".join(
            Path(p).read_text()[-2000:] for p in logs)
        time.sleep(0.1)
    job = wait(api, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=TIMEOUT_S * 3 + 20,
               logs=logs)
    recovered_after = time.monotonic() - killed_at
    job = wait(api, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), logs=logs)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert recovered_after < TIMEOUT_S + 15
    messages = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                              params={"limit": 1000}).json()["data"]]
    assert any(f"worker {victim}:" in m and "lost: no heartbeat" in m for m in messages)
    resumed_at = [int(m.rsplit(" ", 1)[1]) for m in messages if m.startswith("resuming from the checkpoint at step")]
    assert resumed_at and resumed_at[0] >= 10 and resumed_at[0] % 10 == 0  # the latest complete one at the kill
    steps = [m["step"] for m in api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics",
                                        params={"kind": "train"}).json()["data"]]
    # every step once: the lost attempt's steps after it were done again
    assert steps == list(range(1, hyper["max_steps"] + 1))

    straight = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]  # the same job, uninterrupted
    assert wait(api, straight, lambda j: j["status"] in ("succeeded", "failed"), logs=logs)["status"] == "succeeded"
    resumed = load_file(str(settings.data_dir / "jobs" / job_id / "model" / "model.safetensors"))
    uninterrupted = load_file(str(settings.data_dir / "jobs" / straight / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def _claimed_by(settings: Settings, job_id: str) -> str | None:
    from jobs.db import database
    from jobs.models import Job

    with database(settings.resolved_database_url()).session() as s:
        return s.get(Job, job_id).claimed_by


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
