"""What an operator scrapes and probes, through the app: ``/metrics`` parses with Prometheus' own parser and
its figures follow the database (a job queued, started, ended); requests are counted by route template;
``/healthz`` answers without the database, ``/readyz`` names the check that fails (the database, the
migrations, the broker, the workers). With the real Postgres stopped: tests/e2e/test_live_operations.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from jobs import lifecycle, nodes
from jobs.db import database
from jobs.models import Job
from jobs.settings import Settings
from jobs.states import JobStatus
from tests.conftest import api_client, free_port

ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time"}\n' % n for n in range(6))


@pytest.fixture
def env(admin_env):
    return admin_env


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``, by (name, sorted labels)."""
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def create_job(client, model: str) -> str:
    file_id = client.post("/v1/files", files={"file": ("d.jsonl", ROWS)}, data={"purpose": "fine-tune"}).json()["id"]
    answer = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id, "hyperparameters":
                                                       {"max_steps": 2, "batch_size": 2}})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def test_metrics_follow_a_job_from_queued_to_succeeded(env):
    admin, settings, model = env
    before = scrape(admin)
    assert before[("lomo_database_up", ())] == 1
    assert before[("lomo_jobs", (("status", "queued"),))] == 0
    job_id = create_job(admin, model)
    queued = scrape(admin)
    assert queued[("lomo_jobs", (("status", "queued"),))] == 1
    assert queued[("lomo_queue_depth", (("priority", "0"),))] == 1
    predicted = ("lomo_job_peak_memory_bytes", (("job", job_id), ("kind", "predicted")))
    assert predicted not in queued  # per-job series only for running jobs: bounded by the GPUs, not the queue
    posted = (("method", "POST"), ("route", "/v1/fine_tuning/jobs"), ("status", "200"))
    assert queued[("lomo_http_requests_total", posted)] == before.get(("lomo_http_requests_total", posted), 0) + 1

    db = database(settings.resolved_database_url())
    with db.session() as session:
        nodes.register_node(session, "node-a", [24.0, 24.0])
        assert lifecycle.claim(session, job_id, "node-a:1")
        session.get(Job, job_id).trained_tokens = 1234
    running = scrape(admin)
    assert running[("lomo_jobs", (("status", "running"),))] == 1 and ("lomo_queue_depth", (("priority", "0"),)) \
        not in running
    assert running[("lomo_gpus", (("node", "node-a"), ("state", "free")))] == 2
    assert running[("lomo_node_up", (("node", "node-a"),))] == 1
    assert running[predicted] > 0
    with db.session() as session:
        lifecycle.finish_job(session, job_id, lifecycle.Outcome(JobStatus.SUCCEEDED, fine_tuned_model="ft:x"))
        job = session.get(Job, job_id)
        job.finished_at = job.started_at + timedelta(seconds=1000)  # bucketed by the database: 1000 s exactly
    done = scrape(admin)
    assert done[("lomo_jobs_finished_total", (("status", "succeeded"),))] == 1
    succeeded = (("status", "succeeded"),)
    assert done[("lomo_job_duration_seconds_count", succeeded)] == 1
    assert done[("lomo_job_duration_seconds_sum", succeeded)] == pytest.approx(1000, abs=0.01)
    assert done[("lomo_job_duration_seconds_bucket", (("le", "900"), *succeeded))] == 0
    assert done[("lomo_job_duration_seconds_bucket", (("le", "1800"), *succeeded))] == 1
    assert done[("lomo_job_duration_seconds_bucket", (("le", "+Inf"), *succeeded))] == 1
    assert done[("lomo_job_duration_seconds_count", (("status", "failed"),))] == 0
    assert done[("lomo_trained_tokens_total", ())] == 1234
    assert predicted not in done  # ended


def test_requests_are_counted_by_route_template_and_metrics_need_an_admin(env):
    admin, settings, _model = env
    template = (("method", "GET"), ("route", "/v1/fine_tuning/jobs/{job_id}"), ("status", "404"))
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    timed = (("method", "GET"), ("route", "/v1/fine_tuning/jobs/{job_id}"))
    before = scrape(admin)  # the counters are the process's: what this test adds is the difference
    admin.get("/v1/fine_tuning/jobs/ftjob-nope")
    admin.get("/no/such/path/12345")
    figures = scrape(admin)
    assert figures[("lomo_http_requests_total", template)] == before.get(("lomo_http_requests_total", template), 0) + 1
    assert figures[("lomo_http_requests_total", unmatched)] == \
        before.get(("lomo_http_requests_total", unmatched), 0) + 1
    assert not any("12345" in str(labels) or "ftjob-nope" in str(labels) for _name, labels in figures)
    count = ("lomo_http_request_duration_seconds_count", timed)
    assert figures[count] == before.get(count, 0) + 1
    with api_client(settings, "ann") as user:
        assert user.get("/metrics").status_code == 403
        del user.headers["Authorization"]
        assert user.get("/metrics").status_code == 401


def test_readyz_names_each_failing_check_and_healthz_needs_nothing(env):
    admin, settings, _model = env
    probe = admin.get("/readyz")
    assert probe.status_code == 503
    body = probe.json()
    assert body["status"] == "not_ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True, "migrations": True, "broker": True, "workers": False}
    assert "lomo worker" in body["checks"]["workers"]["detail"]
    db = database(settings.resolved_database_url())
    with db.session() as session:
        nodes.register_node(session, "node-a", [])
    ready = admin.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.json()
    assert all(check["ms"] < 1000 for check in ready.json()["checks"].values())
    with db.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '0013'"))
    behind = admin.get("/readyz").json()["checks"]["migrations"]
    assert not behind["ok"] and "jobs.migrate" in behind["detail"]
    assert admin.get("/healthz").json() == {"status": "alive"}


def test_an_unreachable_broker_is_named_without_its_address(tmp_path):
    port = free_port()  # nothing listens there
    settings = Settings(data_dir=tmp_path / "var", broker_url=f"redis://:secret@127.0.0.1:{port}/0")
    with api_client(settings) as admin:
        answer = admin.get("/readyz")
        broker = answer.json()["checks"]["broker"]
        assert answer.status_code == 503 and not broker["ok"]
        assert "secret" not in answer.text and str(port) not in answer.text


def test_the_metrics_token_is_enough_to_scrape(tmp_path):
    token = "t" * 32
    settings = Settings(data_dir=tmp_path / "var", metrics_token=token)
    with api_client(settings) as client:
        del client.headers["Authorization"]
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer " + "u" * 32}).status_code == 401
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and "lomo_database_up 1.0" in answer.text
        # the token is for scraping only: it is no API key
        assert client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
