"""``GET /v1/cluster`` on SQLite and Postgres: a key is needed; a user sees who holds the GPUs and waits in
the queue but only their own job ids, an admin every id; ``hours`` is checked; times are unix seconds.
And `lomo cluster` prints it (through the app, no server)."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from jobs.models import File, GpuLease, Job, Node, User, utcnow
from jobs.settings import Settings
from tests.conftest import api_client, user_key


@pytest.fixture
def env(tmp_path, database_url):
    """The admin ("local") and ann: on gpu-1 (2 GPUs) a job of each runs; one job of each is queued,
    the admin's first (priority 3)."""
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, device="cpu")
    with api_client(settings) as admin:
        ann = {"Authorization": f"Bearer {user_key(settings, 'ann')}"}
        now = utcnow()
        with admin.app.state.db.session() as s:
            ann_id = s.scalar(select(User.id).where(User.name == "ann"))
            s.add(Node(name="gpu-1", gpu_memory_gib=[24.0, 24.0], seen_at=now))
            for owner in (ann_id, "local"):
                s.add(File(id=f"f-{owner}", owner_id=owner, filename="d.jsonl", purpose="fine-tune", bytes=1,
                           storage_path="x"))
            s.flush()
            for n, (job_id, owner, status, priority) in enumerate([
                    ("ann-run", ann_id, "running", 0), ("local-run", "local", "running", 0),
                    ("ann-queued", ann_id, "queued", 0), ("local-queued", "local", "queued", 3)]):
                s.add(Job(id=job_id, owner_id=owner, model="m", training_file_id=f"f-{owner}", method="lomo",
                          status=status, priority=priority, created_at=now - timedelta(minutes=10 - n),
                          **({"claimed_by": f"gpu-1:{n}", "started_at": now, "heartbeat_at": now, "attempt": 1}
                             if status == "running" else {})))
            s.flush()
            s.add_all([GpuLease(node="gpu-1", device_index=0, job_id="ann-run", attempt=1, leased_at=now),
                       GpuLease(node="gpu-1", device_index=1, job_id="local-run", attempt=1, leased_at=now),
                       GpuLease(node="gpu-1", device_index=1, job_id="ann-queued", attempt=1,  # ran 2 days ago
                                leased_at=now - timedelta(hours=50), released_at=now - timedelta(hours=49))])
        yield admin, ann, settings


def test_a_key_is_needed(env):
    admin, _ann, _settings = env
    answer = TestClient(admin.app).get("/v1/cluster")
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "missing_api_key"


def test_a_user_sees_who_holds_the_gpus_but_only_their_own_job_ids(env):
    admin, ann, _settings = env
    mine = admin.get("/v1/cluster", headers=ann)
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["object"] == "cluster" and body["hours"] == 24
    [node] = body["nodes"]
    assert node["name"] == "gpu-1" and node["alive"] is True and isinstance(node["seen_at"], int)
    assert [(g["index"], g["job"], g["user"], g["mine"]) for g in node["gpus"]] == [
        (0, "ann-run", "ann", True), (1, None, "local", False)]
    assert [(r["job"], r["user"], r["devices"]) for r in node["running"]] == [
        ("ann-run", "ann", [0]), (None, "local", [1])]
    assert [(q["position"], q["job"], q["user"], q["mine"]) for q in body["queue"]] == [
        (1, None, "local", False), (2, "ann-queued", "ann", True)]
    assert [(lease["job"], lease["user"]) for lease in body["leases"]] == [("ann-run", "ann"), (None, "local")]
    assert "local-run" not in mine.text and "local-queued" not in mine.text
    assert body["now"] - body["since"] == 24 * 3600 and isinstance(body["leases"][0]["started_at"], int)

    everyone = admin.get("/v1/cluster", params={"hours": 72}).json()
    assert [(g["job"], g["mine"]) for g in everyone["nodes"][0]["gpus"]] == [("ann-run", False), ("local-run", True)]
    assert [(q["job"], q["mine"]) for q in everyone["queue"]] == [("local-queued", True), ("ann-queued", False)]
    assert [lease["job"] for lease in everyone["leases"]] == ["ann-queued", "ann-run", "local-run"]  # 72 h: 3


@pytest.mark.parametrize("hours", ["0", "-1", "745", "nan", "inf", "a day"])
def test_hours_is_checked(env, hours):
    admin, _ann, _settings = env
    answer = admin.get("/v1/cluster", params={"hours": hours})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == "hours" and "hours" in answer.json()["error"]["message"]


def test_lomo_cluster_prints_the_nodes_the_queue_and_the_leases(env, monkeypatch, tmp_path):
    admin, ann, _settings = env
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    import client.rest

    class ThroughTheApp(httpx.BaseTransport):
        """The CLI's requests, answered by the app of this test (no server)."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            answer = admin.request(request.method, request.url.raw_path.decode(), headers=request.headers,
                                   content=request.read())
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    class Client(client.rest.LomoClient):
        def __init__(self, base_url: str, api_key: str | None = None) -> None:
            super().__init__(base_url, api_key=api_key, transport=ThroughTheApp())

    monkeypatch.setattr(client.rest, "LomoClient", Client)
    from client.cli import app

    key = ann["Authorization"].removeprefix("Bearer ")
    env_vars = {"LOMO_URL": "http://testserver", "LOMO_API_KEY": key, "LOMO_CONFIG": str(empty)}
    shown = CliRunner().invoke(app, ["cluster", "--hours", "72"], env=env_vars)
    assert shown.exit_code == 0, shown.output
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert [row[:6] for row in rows if row[:1] == ["gpu-1"]] == [["gpu-1", "yes", "0", "24", "ann-run", "ann"],
                                                                ["gpu-1", "yes", "1", "24", "-", "local"]]
    assert [row[:5] for row in rows if row[:1] in (["1"], ["2"])] == [["1", "-", "local", "1", "3"],
                                                                      ["2", "ann-queued", "ann", "1", "0"]]
    assert "3 GPU lease(s) in the last 72 hours" in shown.stdout and "local-run" not in shown.stdout

    as_json = CliRunner().invoke(app, ["cluster", "--json"], env=env_vars)
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["queue"][1]["job"] == "ann-queued"
    refused = CliRunner().invoke(app, ["cluster", "--hours", "0"], env=env_vars)
    assert refused.exit_code == 2 and "hours" in refused.stderr
