"""The cluster view on SQLite and Postgres: who holds which GPU of which node, what a CPU node runs, the
queue in the scheduler's order, the lease timeline cut to its window, and the job ids a user may see."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event

from jobs import cluster, nodes, scheduler
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import File, GpuLease, Job, Node, User, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus

SETTINGS = Settings(heartbeat_timeout_s=60)
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def add_job(s, job_id: str, owner: str, n: int, status: str = JobStatus.QUEUED.value, gpus: int = 1,
            priority: int = 0, **fields) -> None:
    """A job of ``owner``, created ``n`` seconds after START."""
    s.add(Job(id=job_id, owner_id=owner, model=fields.pop("model", "m"), training_file_id=f"f-{owner}",
              method="lomo", status=status, gpus=gpus, priority=priority,
              created_at=START + timedelta(seconds=n), **fields))


@pytest.fixture
def lab(database_url):
    """ann and bob; gpu-1 (2 GPUs) runs one job of each, cpu-1 (no GPU) one of bob's, both started by the
    scheduler; old-1 (1 GPU) was last seen two hours ago; five jobs queued; three leases of ended jobs:
    one gone before the last day, one across its start, one inside it."""
    upgrade(database_url)
    db = database(database_url)
    now = utcnow()
    with db.session() as s:
        s.add_all([User(id="u-ann", name="ann"), User(id="u-bob", name="bob")])
        s.flush()
        s.add_all([File(id=f"f-{u}", owner_id=u, filename="d.jsonl", purpose="fine-tune", bytes=1, storage_path="x")
                   for u in ("u-ann", "u-bob")])
        s.flush()
        nodes.register_node(s, "gpu-1", [24.0, 24.0])
        nodes.register_node(s, "cpu-1", [])
        s.add(Node(name="old-1", gpu_memory_gib=[80.0], seen_at=now - timedelta(hours=2)))
        for n, (job_id, owner) in enumerate([("ann-run", "u-ann"), ("bob-run", "u-bob"), ("bob-cpu", "u-bob")]):
            add_job(s, job_id, owner, n, priority=99)  # ahead of everything: the scheduler starts them first
    # workers claim as <node>:<pid>, as worker.supervisor does
    started = [scheduler.start_next(db, "gpu-1", 2, "gpu-1:101", 4),
               scheduler.start_next(db, "gpu-1", 2, "gpu-1:102", 4),
               scheduler.start_next(db, "cpu-1", None, "cpu-1:7", 4)]
    assert [(x.job_id, x.devices) for x in started] == [("ann-run", [0]), ("bob-run", [1]), ("bob-cpu", None)]
    with db.session() as s:
        add_job(s, "ann-q1", "u-ann", 10)
        add_job(s, "bob-q2", "u-bob", 11, gpus=2, priority=5, model="ft:base260K:x:bob-secret")
        add_job(s, "ann-q3", "u-ann", 12, priority=5)
        add_job(s, "bob-q4", "u-bob", 13)
        # preempted after it started: it came first, so it still waits ahead of the priority-5 jobs after it
        add_job(s, "bob-back", "u-bob", 5, priority=5, preemptions=1, attempt=1)
        for job_id, owner, device, hours in [("ann-gone", "u-ann", 0, (30, 26)), ("bob-across", "u-bob", 1, (30, 20)),
                                             ("ann-inside", "u-ann", 0, (3, 2))]:
            add_job(s, job_id, owner, 1, status=JobStatus.SUCCEEDED.value)
            s.flush()
            s.add(GpuLease(node="gpu-1", device_index=device, job_id=job_id, attempt=1,
                           leased_at=now - timedelta(hours=hours[0]), released_at=now - timedelta(hours=hours[1])))
    return db


def view(db, viewer, **options):
    with db.session() as s:
        return cluster.cluster_view(s, SETTINGS, viewer, **options)


def by_name(found: dict) -> dict[str, dict]:
    return {node["name"]: node for node in found["nodes"]}


def test_nodes_show_who_holds_each_gpu_and_what_a_cpu_node_runs(lab):
    found = view(lab, None, me="u-ann")
    assert [n["name"] for n in found["nodes"]] == ["cpu-1", "gpu-1", "old-1"]
    gpu, cpu, old = by_name(found)["gpu-1"], by_name(found)["cpu-1"], by_name(found)["old-1"]
    assert [(g["index"], g["memory_gib"], g["job"], g["user"], g["mine"]) for g in gpu["gpus"]] == [
        (0, 24.0, "ann-run", "ann", True), (1, 24.0, "bob-run", "bob", False)]
    assert all(g["since"] is not None and g["since"].tzinfo for g in gpu["gpus"])
    assert [(r["job"], r["user"], r["devices"], r["status"]) for r in gpu["running"]] == [
        ("ann-run", "ann", [0], "running"), ("bob-run", "bob", [1], "running")]
    assert cpu["gpus"] == [] and [(r["job"], r["user"], r["devices"], r["gpus"]) for r in cpu["running"]] == [
        ("bob-cpu", "bob", [], 1)]
    assert old["gpus"] == [{"index": 0, "memory_gib": 80.0, "job": None, "mine": False, "user": None, "since": None}]
    assert old["running"] == []
    assert gpu["alive"] and cpu["alive"] and not old["alive"]


def test_a_node_is_alive_while_the_jobs_it_runs_write_heartbeats(lab):
    later = utcnow() + timedelta(minutes=5)  # past the heartbeat timeout since the workers started
    assert [n["alive"] for n in view(lab, None, now=later)["nodes"]] == [False, False, False]
    with lab.session() as s:
        s.get(Job, "bob-cpu").heartbeat_at = later - timedelta(seconds=5)
    cpu = by_name(view(lab, None, now=later))["cpu-1"]
    assert cpu["alive"] and cpu["seen_at"] == later - timedelta(seconds=5)


def test_an_idle_node_is_alive_while_its_workers_watch_the_queue(lab):
    with lab.session() as s:
        s.get(Node, "old-1").seen_at = utcnow() - timedelta(hours=2)
    assert not by_name(view(lab, None))["old-1"]["alive"]
    with lab.session() as s:
        nodes.node_seen(s, "old-1")  # what each pass of worker.app.watch_the_queue writes
    assert by_name(view(lab, None))["old-1"]["alive"]


def test_the_queue_is_in_the_schedulers_order(lab):
    found = view(lab, None)
    with lab.session() as s:
        order = [w.id for w in scheduler.queue_snapshot(s)]
    assert [q["job"] for q in found["queue"]] == order == ["bob-back", "bob-q2", "ann-q3", "ann-q1", "bob-q4"]
    assert [q["position"] for q in found["queue"]] == [1, 2, 3, 4, 5]
    first, second = found["queue"][:2]
    assert first["preempted"] and not any(q["preempted"] for q in found["queue"][1:])
    assert (second["user"], second["gpus"], second["priority"], second["model"]) == (
        "bob", 2, 5, "ft:base260K:x:bob-secret")
    assert second["created_at"] == START + timedelta(seconds=11)
    assert not any(q["held_by_quota"] for q in found["queue"])


def test_the_queue_marks_the_jobs_the_running_quota_holds_back(lab):
    with lab.session() as s:
        found = cluster.cluster_view(s, Settings(quota_running_jobs=2), None)
    assert {q["job"]: q["held_by_quota"] for q in found["queue"]} == {
        "bob-back": True, "bob-q2": True, "ann-q3": False, "ann-q1": False, "bob-q4": True}


def test_a_user_sees_who_holds_the_gpus_but_only_their_own_job_ids(lab):
    found = view(lab, "u-ann")
    gpu, cpu = by_name(found)["gpu-1"], by_name(found)["cpu-1"]
    assert [(g["job"], g["user"], g["mine"]) for g in gpu["gpus"]] == [("ann-run", "ann", True), (None, "bob", False)]
    assert [(r["job"], r["user"]) for r in cpu["running"]] == [(None, "bob")]
    assert [(q["job"], q["user"], q["mine"]) for q in found["queue"]] == [
        (None, "bob", False), (None, "bob", False), ("ann-q3", "ann", True), ("ann-q1", "ann", True),
        (None, "bob", False)]
    hidden = found["queue"][1]
    assert hidden["model"] == "base260K" and hidden["gpus"] == 2 and hidden["priority"] == 5
    assert [(lease["job"], lease["user"], lease["mine"]) for lease in found["leases"]] == [
        (None, "bob", False), ("ann-inside", "ann", True), ("ann-run", "ann", True), (None, "bob", False)]
    for bobs in ("bob-run", "bob-cpu", "bob-q2", "bob-q4", "bob-back", "bob-across", "bob-secret"):
        assert bobs not in repr(found), bobs

    admin = view(lab, None)  # an admin's view: every id; nothing is "mine" without ``me``
    assert [lease["job"] for lease in admin["leases"]] == ["bob-across", "ann-inside", "ann-run", "bob-run"]
    assert [r["job"] for r in by_name(admin)["cpu-1"]["running"]] == ["bob-cpu"]
    assert [q["job"] for q in admin["queue"]] == ["bob-back", "bob-q2", "ann-q3", "ann-q1", "bob-q4"]
    assert not any(q["mine"] for q in admin["queue"]) and admin["queue"][1]["model"] == "ft:base260K:x:bob-secret"


def test_the_lease_timeline_is_cut_to_its_window_and_bounded(lab, monkeypatch):
    day = view(lab, None)
    assert [(lease["job"], lease["device_index"]) for lease in day["leases"]] == [
        ("bob-across", 1), ("ann-inside", 0), ("ann-run", 0), ("bob-run", 1)]
    assert day["leases"][-1]["released_at"] is None and day["leases"][0]["released_at"] is not None
    assert day["since"] == day["now"] - timedelta(hours=24) and not day["leases_truncated"]
    assert [lease["job"] for lease in view(lab, None, hours=1)["leases"]] == ["ann-run", "bob-run"]
    assert [lease["job"] for lease in view(lab, None, hours=40)["leases"]] == [
        "ann-gone", "bob-across", "ann-inside", "ann-run", "bob-run"]
    # a lease taken after ``now`` is not in its past
    assert [lease["job"] for lease in view(lab, None, now=utcnow() - timedelta(minutes=30))["leases"]] == [
        "bob-across", "ann-inside"]
    monkeypatch.setattr(cluster, "MAX_LEASES", 2)
    cut = view(lab, None)
    assert [lease["job"] for lease in cut["leases"]] == ["ann-run", "bob-run"] and cut["leases_truncated"]


def test_the_number_of_queries_does_not_grow_with_the_rows(lab):
    statements: list[str] = []
    event.listen(lab.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    view(lab, "u-ann")
    few = len(statements)
    hour_ago = utcnow() - timedelta(hours=1)
    with lab.session() as s:
        for n in range(40):
            add_job(s, f"more-{n}", "u-bob" if n % 2 else "u-ann", 100 + n, priority=n % 3)
            s.flush()
            s.add(GpuLease(node="gpu-1", device_index=n % 2, job_id=f"more-{n}", leased_at=hour_ago,
                           released_at=hour_ago + timedelta(minutes=30)))
    statements.clear()
    found = view(lab, "u-ann")
    assert len(found["queue"]) == 45 and len(found["leases"]) == 44
    assert len(statements) == few <= 10
