"""LOMO_LOG_FORMAT=json: `lomo serve` (the API and the worker beside it) and the job's training process write
one JSON object per line; the lines name the job they are about, the API's access lines the request id
and the caller, and the request id a client sends comes back and is kept in the events of the job it made."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import STORIES, need_shared
from tests.e2e.live_service import start_service

ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time there was a cat"}\n' % n
                for n in range(8))


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line[:300]!r}") from None
    return parsed


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    need_shared(STORIES)
    live = start_service("embedded", tmp_path_factory.mktemp("json-logs"), log_format="json")
    yield live
    live.stop()


def test_every_line_is_json_and_names_its_job_and_request(service):
    with httpx.Client(base_url=service.url, headers=service.headers, timeout=30) as client:
        file_id = client.post("/v1/files", files={"file": ("d.jsonl", ROWS)},
                              data={"purpose": "fine-tune"}).json()["id"]
        created = client.post("/v1/fine_tuning/jobs", headers={"X-Request-Id": "req-from-the-client-1"},
                              json={"model": STORIES.name, "training_file": file_id,
                                    "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_len": 64}})
        assert created.headers["x-request-id"] == "req-from-the-client-1"
        job_id = created.json()["id"]
        assert client.get("/v1/files").headers["x-request-id"].startswith("req_")  # a new one when none is sent
        deadline = time.monotonic() + 180
        while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.3)
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    made = [e for e in events if e["message"].startswith("job created")]
    assert made and made[0]["data"]["request_id"] == "req-from-the-client-1"

    time.sleep(1)  # the last lines reach the log
    lines = json_lines((service.data_dir.parent / "serve.log").read_text())
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "lomo.access"]
    posted = [line for line in access if line.get("request_id") == "req-from-the-client-1"]
    assert posted and posted[0]["user"] == "local" and "POST /v1/fine_tuning/jobs 200" in posted[0]["message"]
    assert all("lomo-key_" not in line["message"] for line in lines)  # the key itself is never logged
    worker = [line for line in lines if line["logger"] == "lomo.worker" and line.get("job_id") == job_id]
    assert any("starts" in line["message"] for line in worker) and any("ended" in line["message"] for line in worker)

    training = json_lines((service.data_dir / "jobs" / job_id / "train.log").read_text())
    assert training and all(line["job_id"] == job_id for line in training)
    assert any(line["logger"] == "lomo.train" and "training done" in line["message"] for line in training)
