"""The operator's view of a live service (`lomo serve` + `lomo worker` on Postgres and Redis): `/metrics`
parses and its counters move when a real job runs; `/readyz` fails with Postgres stopped, naming the
database, while `/healthz` still answers, and recovers once Postgres is back."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import STORIES, need_shared
from tests.e2e.live_service import start_service
from tests.worker.test_outages import postgres

TOKEN = "scrape-" + "x" * 24
ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time there was a cat"}\n' % n
                for n in range(8))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    need_shared(STORIES)
    service = start_service("postgres+redis", tmp_path_factory.mktemp("operations"), metrics_token=TOKEN)
    client = httpx.Client(base_url=service.url, headers=service.headers, timeout=30)
    yield service, client
    client.close()
    service.stop()


def figures(client: httpx.Client, token: str | None = None) -> dict[tuple[str, tuple], float]:
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {token}"} if token else None)
    assert answer.status_code == 200, answer.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def test_metrics_move_when_a_job_runs(live):
    service, client = live
    before = figures(client)
    file_id = client.post("/v1/files", files={"file": ("d.jsonl", ROWS)}, data={"purpose": "fine-tune"}).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": STORIES.name, "training_file": file_id,
                                                    "hyperparameters": {"max_steps": 3, "batch_size": 2,
                                                                        "max_seq_len": 64}}).json()
    deadline = time.monotonic() + 180
    while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.3)
    after = figures(client)
    succeeded = ("lomo_jobs_finished_total", (("status", "succeeded"),))
    assert after[succeeded] == before.get(succeeded, 0) + 1
    assert after[("lomo_trained_tokens_total", ())] > before[("lomo_trained_tokens_total", ())]
    assert after[("lomo_job_duration_seconds_count", (("status", "succeeded"),))] >= 1
    node = service.env["LOMO_WORKER_NAME"]
    assert after[("lomo_node_up", (("node", node),))] == 1
    reads = ("lomo_http_requests_total", (("method", "GET"), ("route", "/v1/fine_tuning/jobs/{job_id}"),
                                          ("status", "200")))
    assert after[reads] >= 2


def test_readyz_fails_with_postgres_stopped_and_recovers(live):
    service, client = live
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:  # the worker has registered its node
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.3)
    postgres("stop")
    try:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert not checks["database"]["ok"] and checks["broker"]["detail"].startswith("not checked")
        assert client.get("/healthz").status_code == 200  # alive: the process answers
        # the scrape answers too, with the token (no database needed to check it), and says so
        assert figures(client, TOKEN)[("lomo_database_up", ())] == 0
    finally:
        postgres("start")
    deadline = time.monotonic() + 60
    while (answer := client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    assert answer.json()["status"] == "ready"
