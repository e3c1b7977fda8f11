"""A job larger than a node, end to end: two real `lomo worker` processes as two "nodes" (different
LOMO_WORKER_NAME, one CPU rank each, LOMO_CPU_RANKS=1), Postgres and Redis. A 2-rank job is leased on both,
node-a or node-b launches it and the other joins its rendezvous (gloo on 127.0.0.1), and its weights equal
those of the same job on one process. When the joining node's rank dies, the job fails with that node named,
every rank stops and both nodes' GPUs (ranks) come back. When the joining node's whole worker dies, the job
goes back to the queue and, once the node is back, resumes from its checkpoint to the end."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from jobs.db import database
from jobs.models import GpuLease
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
from tests.e2e.live_service import processes, worker_env
from tests.e2e.test_scheduling import training_pids
from tests.e2e.test_worker_loss import running_workers, stop_workers, wait

JOB = {"max_steps": 6, "batch_size": 4, "max_seq_len": 64, "lr": 5e-3}
ENDED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    tmp = tmp_path_factory.mktemp("two-nodes")
    url = create_postgres_database()
    env, settings = worker_env(tmp / "var", url, "lomo-nodes", cpu_ranks="1", node_address="127.0.0.1",
                               rendezvous_timeout_s="120", heartbeat_timeout_s="6", requeue_delay_s="1")
    env["OMP_NUM_THREADS"] = "1"
    workers = running_workers(tmp, env, ["node-a", "node-b"])
    api = open_api_client(settings)
    file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]
    yield api, settings, workers, file_id, (tmp, env)
    api.__exit__(None, None, None)
    stop_workers([process for process, _log in workers.values()])
    import redis

    redis.Redis.from_url(REDIS_URL).delete(settings.queue)
    drop_postgres_database(url)


def _run(api, workers, body: dict) -> dict:
    job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    return wait(api, job_id, lambda j: j["status"] in ENDED, logs=[log for _p, log in workers.values()])


def _leases(settings: Settings, job_id: str) -> list[tuple]:
    db = database(settings.resolved_database_url())
    with db.session() as s:
        return [tuple(row) for row in s.execute(
            select(GpuLease.node, GpuLease.node_rank, GpuLease.joined_by.is_not(None), GpuLease.released_at.is_(None))
            .where(GpuLease.job_id == job_id).order_by(GpuLease.node_rank))]


def test_a_job_of_two_ranks_runs_over_two_nodes_to_the_weights_of_one_process(two_nodes):
    api, settings, workers, file_id, _ = two_nodes
    body = {"model": STORIES.name, "training_file": file_id, "seed": 3, "hyperparameters": JOB}
    spread = _run(api, workers, {**body, "gpus": 2})
    assert spread["status"] == "succeeded", spread
    parts = _leases(settings, spread["id"])
    # one lease on each node: the launcher's (rank 0), and the joining node's, taken by one of its processes
    assert sorted(node for node, *_ in parts) == ["node-a", "node-b"]
    assert [(rank, joined, live) for _node, rank, joined, live in parts] == [(0, False, False), (1, True, False)]
    launcher = parts[0][0]
    messages = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{spread['id']}/events",
                                              params={"limit": 1000}).json()["data"]]
    assert any(f"; {launcher} launches" in m for m in messages), messages
    assert any(m.startswith("launching on 2 nodes") and "127.0.0.1:" in m for m in messages), messages
    steps = [m["step"] for m in api.get(f"/v1/fine_tuning/jobs/{spread['id']}/metrics",
                                        params={"kind": "train"}).json()["data"]]
    assert steps == list(range(1, JOB["max_steps"] + 1))  # rank 0's records, once (not the joining node's too)
    folder = settings.data_dir / "jobs" / spread["id"]
    assert (folder / "launch-node-1.log").is_file() and (folder / "train-node-1.log").is_file()

    alone = _run(api, workers, body)  # the same job on one process of one node
    assert alone["status"] == "succeeded", alone
    two = load_file(str(folder / "model" / "model.safetensors"))
    one = load_file(str(settings.data_dir / "jobs" / alone["id"] / "model" / "model.safetensors"))
    base = load_file(str(STORIES / "model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        assert (one[name] - base[name]).abs().max() > 0  # trained
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name  # float32 rounding only


def _ranks_of_node(job_id: str, node_rank: int) -> list[int]:
    """The rank processes (not torch.distributed.run) of node ``node_rank``'s part of a job."""
    config = f"{job_id}/launch-config-node-{node_rank}.json".encode()
    return processes(b"lomo_core.zero3.launch", ending=config, without=b"torch.distributed.run")


def test_when_the_joining_nodes_rank_dies_the_job_fails_naming_it_and_every_part_is_freed(two_nodes):
    api, settings, workers, file_id, _ = two_nodes
    logs = [log for _p, log in workers.values()]
    body = {"model": STORIES.name, "training_file": file_id, "gpus": 2,
            "hyperparameters": {**JOB, "max_steps": 400}}
    job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait(api, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, logs=logs)
    ranks = _ranks_of_node(job_id, 1)
    assert len(ranks) == 1, ranks
    joiner = next(node for node, rank, *_ in _leases(settings, job_id) if rank == 1)
    os.kill(ranks[0], signal.SIGKILL)
    killed_at = time.monotonic()
    job = wait(api, job_id, lambda j: j["status"] in ENDED, timeout=120, logs=logs)
    assert time.monotonic() - killed_at < 60  # nothing waits for the dead rank
    assert job["status"] == "failed", job
    message = " ".join(job["error"]["message"].split())
    # said by the joining node, or by the launch, which reads every node's rank reports: the node is named
    assert f"node {joiner} (node rank 1) failed:" in message or "on node 1" in message, message
    assert "rank 1 was killed by signal 9" in message or "killed by signal 9 on node 1" in message, message
    assert all(not live for *_rest, live in _leases(settings, job_id))  # both nodes' parts released
    deadline = time.monotonic() + 30
    while training_pids(job_id) or training_pids(job_id, b"lomo_core.zero3.launch"):
        assert time.monotonic() < deadline, "a rank or launcher of the failed job is still running"
        time.sleep(0.2)
    assert all(process.poll() is None for process, _log in workers.values())  # the workers live on


def test_when_the_joining_nodes_worker_dies_the_job_requeues_and_resumes_when_it_is_back(two_nodes):
    api, settings, workers, file_id, (tmp, env) = two_nodes
    logs = [log for _p, log in workers.values()]
    hyper = {**JOB, "max_steps": 40, "save_every": 5, "keep_checkpoints": 2}
    body = {"model": STORIES.name, "training_file": file_id, "gpus": 2, "seed": 4, "hyperparameters": hyper}
    job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait(api, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 7, logs=logs)
    joiner = next(node for node, rank, *_ in _leases(settings, job_id) if rank == 1)
    os.killpg(workers[joiner][0].pid, signal.SIGKILL)  # the node's worker and everything it started
    workers[joiner][0].wait()
    job = wait(api, job_id, lambda j: j["status"] != "running", timeout=60, logs=logs)
    assert job["status"] == "queued" and job["error"] is None, job  # an infrastructure loss: not a failure
    messages = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                              params={"limit": 1000}).json()["data"]]
    assert any(f"node {joiner} (node rank 1) is no longer seen" in m and "back in the queue" in m
               for m in messages), messages
    assert all(not live for *_rest, live in _leases(settings, job_id))
    workers.update(running_workers(tmp, env, [joiner]))  # the node is back: the job spreads again and resumes
    job = wait(api, job_id, lambda j: j["status"] in ENDED, logs=[log for _p, log in workers.values()])
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    messages = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                              params={"limit": 1000}).json()["data"]]
    resumed_at = [int(m.rsplit(" ", 1)[1]) for m in messages if m.startswith("resuming from the checkpoint at step")]
    assert resumed_at and resumed_at[0] >= 5 and resumed_at[0] % 5 == 0
    steps = [m["step"] for m in api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics",
                                        params={"kind": "train"}).json()["data"]]
    assert steps == list(range(1, hyper["max_steps"] + 1))
