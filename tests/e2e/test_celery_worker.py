"""End to end through a real Celery worker process: on Postgres + Redis, and on the embedded SQLite + SQLite
broker. Jobs are submitted through the REST API and train stories260K for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs import catalog, lifecycle
from jobs.db import database
from jobs.queue import enqueue
from jobs.schemas import JobCreate
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

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"max_steps": 4, "batch_size": 4, "max_seq_len": 128, "lr": 5e-3, "validation_split": 0.02,
         "save_every": 2}


class Service:
    def __init__(self, settings: Settings, worker: subprocess.Popen, log: Path) -> None:
        self.settings, self.worker, self.log = settings, worker, log
        self.api = open_api_client(settings)
        self.file_id = self.api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]

    def submit(self, **fields) -> str:
        body = {"model": STORIES.name, "training_file": self.file_id, "hyperparameters": SMALL, **fields}
        response = self.api.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

    def wait(self, job_id: str, until=lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
             timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            assert self.worker.poll() is None, f"the worker died:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stuck at {self.job(job_id)}\n{self.log.read_text()[-3000:]}")

    def events(self, job_id: str) -> list[str]:
        data = self.api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return [e["message"] for e in data]


@pytest.fixture(scope="module", params=["postgres+redis", "embedded"])
def live(request, tmp_path_factory):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    env = {**os.environ, "LOMO_DATA_DIR": str(tmp / "var"), "LOMO_QUEUE": f"lomo-test-{uuid.uuid4().hex[:8]}",
           "LOMO_FLUSH_INTERVAL_S": "0.3", "LOMO_DEVICE": "cpu", "LOMO_CANCEL_GRACE_S": "20",
           "LOMO_WORKER_NAME": f"e2e-{request.param}", "LOMO_MODEL_DIRS": json.dumps([str(STORIES.parent)])}
    env.pop("LOMO_DATABASE_URL", None)
    env.pop("LOMO_BROKER_URL", None)
    pg_url = None
    if request.param == "postgres+redis":
        pg_url = create_postgres_database()
        env.update(LOMO_DATABASE_URL=pg_url, LOMO_BROKER_URL=REDIS_URL)
    settings = Settings(data_dir=Path(env["LOMO_DATA_DIR"]), database_url=env.get("LOMO_DATABASE_URL"),
                        broker_url=env.get("LOMO_BROKER_URL"), queue=env["LOMO_QUEUE"], flush_interval_s=0.3,
                        device="cpu", model_dirs=[STORIES.parent])
    settings.data_dir.mkdir(parents=True)
    log = tmp / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--loglevel", "info"], cwd=ROOT,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while " ready." not in log.read_text() and time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    assert " ready." in log.read_text(), log.read_text()[-3000:]
    live = Service(settings, worker, log)
    yield live
    live.api.__exit__(None, None, None)
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    if request.param == "postgres+redis":
        import redis

        redis.Redis.from_url(REDIS_URL).delete(settings.queue)
        drop_postgres_database(pg_url)


def test_a_job_runs_to_succeeded_and_the_api_returns_its_results(live):
    job_id = live.submit(metadata={"case": "happy"})
    job = live.wait(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"step": 4, "total_steps": 4, "fraction": 1.0}
    assert job["trained_tokens"] > 0 and job["error"] is None and job["finished_at"] >= job["started_at"]
    assert job["fine_tuned_model"] == f"ft:{STORIES.name}::{job_id}"
    assert (live.settings.data_dir / "jobs" / job_id / "model" / "model.safetensors").is_file()
    base = f"/v1/fine_tuning/jobs/{job_id}"
    train = live.api.get(base + "/metrics", params={"kind": "train"}).json()["data"]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and all(m["lr"] == 5e-3 for m in train)
    memory = live.api.get(base + "/memory").json()
    assert memory["measured"][0]["rank"] == 0 and memory["measured"][0]["peak_bytes"] > 0
    checkpoints = live.api.get(base + "/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [4, 2]  # newest first; the last one is the final model
    evals = live.api.get(base + "/evals").json()["data"]
    assert {(e["model"], e["metric"]) for e in evals} == {("base", "loss"), ("base", "perplexity"),
                                                         ("fine_tuned", "loss"), ("fine_tuned", "perplexity")}
    messages = live.events(job_id)
    assert any(m.startswith("started by worker e2e-") for m in messages) and "job succeeded" in messages


def test_a_duplicated_message_runs_the_job_once(live):
    job_id = live.submit()
    enqueue(live.settings, job_id)  # two more copies of the same task message
    enqueue(live.settings, job_id)
    assert live.wait(job_id)["status"] == "succeeded"
    # the queue is first in, first out: once a later job has run, both copies have been delivered
    assert live.wait(live.submit())["status"] == "succeeded"
    job = live.job(job_id)
    assert job["attempt"] == 1
    assert sum(m.startswith("started by worker") for m in live.events(job_id)) == 1


def test_cancel_a_running_job(live):
    job_id = live.submit(hyperparameters={**SMALL, "max_steps": 100000, "save_every": None})
    live.wait(job_id, until=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    answer = live.api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()
    assert answer["status"] == "running" and answer["cancel_requested"] is True
    job = live.wait(job_id, timeout=60)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100000
    assert "training process stopped at a step boundary" in live.events(job_id)


def test_a_job_whose_model_folder_is_missing_fails_clearly(live, tmp_path):
    model = tmp_path / "stories-copy"
    shutil.copytree(STORIES, model)
    with database(live.settings.resolved_database_url()).session() as s:
        catalog.register_model(s, live.settings, live.settings.default_user, model.name, str(model))
    with database(live.settings.resolved_database_url()).session() as s:
        job = lifecycle.create_job(s, live.settings, live.settings.default_user,
                                 JobCreate(model=model.name, training_file=live.file_id))
    shutil.rmtree(model)  # removed after submission, before a worker picks the job up
    enqueue(live.settings, job.id)
    done = live.wait(job.id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "model_not_found" and done["error"]["param"] == "model"
    assert "stories-copy" in done["error"]["message"] and str(tmp_path) not in done["error"]["message"]
