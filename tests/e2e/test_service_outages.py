"""Outages of the parts around a worker. A broker that goes away and comes back empty (Redis without
persistence, restarted): the job running then finishes undisturbed, and the jobs queued meanwhile, whose
messages are gone or were never sent, start once it is back, each exactly once, with no worker restart.
The API stopped and started again mid-job: nothing is lost, and the worker needs no restart. Real
processes: Postgres, Redis servers, `lomo worker`, `lomo serve`, stories260K training on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from jobs.settings import Settings
from tests.conftest import (
    INSTRUCT,
    STORIES,
    create_postgres_database,
    drop_postgres_database,
    need_shared,
    open_api_client,
)
from tests.e2e.live_service import ROOT, free_port
from tests.e2e.test_worker_loss import running_workers, stop_workers, wait


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.port, self.folder, self.process = free_port(), folder, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
                time.sleep(0.1)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def node(tmp_path):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    broker = RedisServer(tmp_path)
    broker.start()
    url = create_postgres_database()
    env = {**os.environ, "LOMO_DATA_DIR": str(tmp_path / "var"), "LOMO_QUEUE": f"lomo-out-{uuid.uuid4().hex[:8]}",
           "LOMO_DATABASE_URL": url, "LOMO_BROKER_URL": broker.url, "LOMO_FLUSH_INTERVAL_S": "0.2",
           "LOMO_DEVICE": "cpu",
           "LOMO_MODEL_DIRS": json.dumps([str(STORIES.parent)]),
           "LOMO_HEARTBEAT_TIMEOUT_S": "4", "LOMO_REQUEUE_DELAY_S": "1"}
    settings = Settings(data_dir=Path(env["LOMO_DATA_DIR"]), model_dirs=[STORIES.parent],
                        database_url=url, broker_url=broker.url,
                        queue=env["LOMO_QUEUE"])
    settings.data_dir.mkdir(parents=True)
    workers = running_workers(tmp_path, env, ["node-a"])
    api = open_api_client(settings)
    yield api, broker, workers["node-a"]
    api.__exit__(None, None, None)
    stop_workers([workers["node-a"][0]])
    if broker.process.poll() is None:
        broker.kill()
    drop_postgres_database(url)


def test_jobs_run_once_each_through_a_broker_that_restarts_empty(node):
    api, broker, (worker, log) = node
    file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]

    def submit(steps: int) -> str:
        body = {"model": STORIES.name, "training_file": file_id,
                "hyperparameters": {"max_steps": steps, "batch_size": 4, "max_seq_len": 64}}
        answer = api.post("/v1/fine_tuning/jobs", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["id"]

    running = submit(30)
    queued = submit(4)  # its message is in the broker, and lost with it
    wait(api, running, lambda j: j["status"] == "running" and j["progress"]["step"] >= 3, logs=[log])
    broker.kill()
    # the running job ends while the broker is away: its training never needed it
    wait(api, running, lambda j: j["status"] != "running", logs=[log])
    assert api.get(f"/v1/fine_tuning/jobs/{running}").json()["status"] == "succeeded"
    sent_while_down = submit(4)  # its message cannot be sent: it stays queued, and says so
    messages = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{sent_while_down}/events").json()["data"]]
    assert any(m.startswith("the broker could not be reached") for m in messages)
    time.sleep(1)
    assert {api.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in (queued, sent_while_down)} == {"queued"}

    broker.start()  # empty: no message of either queued job survived
    for job_id in (queued, sent_while_down):
        job = wait(api, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=120,
                   logs=[log])
        assert (job["status"], job["attempt"]) == ("succeeded", 1), job
    for job_id in (running, queued, sent_while_down):
        events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        assert sum(e["message"].startswith("started by worker") for e in events) == 1, job_id
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["attempt"] == 1
    assert worker.poll() is None, log.read_text()[-3000:]  # the worker rode it out


def test_restarting_the_api_loses_nothing_and_the_worker_goes_on(tmp_path):
    import httpx

    from tests.e2e.live_service import _spawn, start_service

    service = start_service("postgres+redis", tmp_path)
    try:
        client = httpx.Client(base_url=service.url, timeout=30, headers=service.headers)
        file_id = client.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())},
                              data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": "stories260K", "training_file": file_id,
                "hyperparameters": {"max_steps": 40, "batch_size": 4, "max_seq_len": 64}}
        first = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/fine_tuning/jobs/{first}").json()["progress"]["step"] < 3:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        serve = service.processes[-1]
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        with pytest.raises(httpx.TransportError):
            client.get("/health")
        time.sleep(2)  # the job trains on meanwhile, reporting to the database
        port = service.url.rsplit(":", 1)[1]
        service.processes[-1] = _spawn(["serve", "--port", port], service.env, tmp_path / "serve-2.log", ROOT)
        service.logs.append(tmp_path / "serve-2.log")
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline + 60, service.log_tail()
            time.sleep(0.2)
        second = client.post("/v1/fine_tuning/jobs", json={**body, "hyperparameters": {
            "max_steps": 3, "batch_size": 4, "max_seq_len": 64}}).json()["id"]  # through the new API, same worker
        for job_id, steps in ((first, 40), (second, 3)):
            while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline + 240, service.log_tail()
                time.sleep(0.2)
            assert (job["status"], job["progress"]["step"], job["attempt"]) == ("succeeded", steps, 1), job
            points = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"kind": "train"}).json()["data"]
            assert [p["step"] for p in points] == list(range(1, steps + 1))  # none lost while the API was away
    finally:
        service.stop()
