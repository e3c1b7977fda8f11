"""Jobs larger than a node: how they are spread (the rule), then on SQLite and Postgres how the scheduler
leases all their parts in one transaction or none, how a joining node finds its part and takes it once,
and what the launcher learns of a failed or lost node."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from jobs import leases, nodes, placement, scheduler
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job, JobEvent, Node
from jobs.placement import WAIT, Peer, can_spread, plan, splits
from jobs.scheduler import Waiting, choose
from tests.conftest import seed_jobs


# ------------------------------------------------------------------------------------------ the rule
def test_a_job_is_spread_over_the_fewest_nodes_with_the_same_share_each():
    assert splits(16, [8, 8, 8]) == [(2, 8)]
    assert splits(12, [8, 8, 8]) == [(2, 6), (3, 4)]
    assert splits(6, [4, 4]) == [(2, 3)]
    assert splits(5, [4, 4, 4]) == []  # 5 ranks: no even share over 2..3 nodes
    assert splits(16, [4, 8, 8]) == []  # this node (4) cannot take a share of 8, and 4 nodes are not there


def test_the_plan_takes_this_node_and_the_fullest_peers_that_fit():
    peers = [Peer("b", 8, 8), Peer("c", 8, 3), Peer("d", 8, 5)]
    assert plan(16, "a", 8, 8, peers) == [("a", 8), ("b", 8)]
    assert plan(12, "a", 8, 8, peers) == [("a", 6), ("b", 6)]  # 2 nodes of 6: only b has 6 free
    assert plan(12, "a", 8, 4, peers) == [("a", 4), ("d", 4), ("b", 4)]  # this node has 4: 3 nodes of 4
    assert plan(16, "a", 8, 7, peers) == WAIT  # could run over a and b, not now
    assert plan(16, "a", 4, 4, peers[:2]) is None  # this node can never take a share: another launches it
    assert plan(4, "a", 2, 2, []) is None  # no other node: never


def test_admission_accepts_what_some_nodes_can_hold():
    assert can_spread(8, [8]) and can_spread(16, [8, 8]) and can_spread(12, [8, 4, 4, 4])
    assert not can_spread(16, [8]) and not can_spread(3, [2, 2]) and not can_spread(1, [])


def test_choose_starts_a_spread_job_in_its_turn_and_holds_for_it_at_the_limit():
    queue = [Waiting("big", 4), Waiting("small", 1)]
    here = choose(queue, free=2, node_size=2, backfill_limit=1, node="a", spread=lambda job: [("a", 2), ("b", 2)])
    assert here.job_id == "big" and here.placement == [("a", 2), ("b", 2)]
    waits = choose(queue, free=2, node_size=2, backfill_limit=1, node="a", spread=lambda job: WAIT)
    assert waits.job_id == "small" and waits.skipped == ["big"]  # backfill as for any waiting job
    held = [Waiting("big", 4, bypassed=1, held_on="b"), Waiting("small", 1)]
    # at the limit every node it could use holds (it needs several), whatever node held it before
    assert choose(held, free=2, node_size=2, backfill_limit=1, node="a", spread=lambda job: WAIT).held_for == "big"
    never = choose(queue, free=2, node_size=2, backfill_limit=1, node="a", spread=lambda job: None)
    assert never.job_id == "small" and never.skipped == []  # another node's job: it does not wait here


# ------------------------------------------------------------------------------------------ in the database
def _cluster(database_url: str, specs: list[tuple[int, int]], sizes: dict[str, int]):
    upgrade(database_url)
    db = database(database_url)
    ids = seed_jobs(db, specs)
    with db.session() as s:
        for name, size in sizes.items():
            nodes.register_node(s, name, [24.0] * size)
    return db, ids


def test_a_job_larger_than_a_node_leases_its_parts_on_two_nodes_in_one_transaction(database_url):
    db, (big,) = _cluster(database_url, [(4, 0)], {"node-a": 2, "node-b": 2})
    started = scheduler.start_next(db, "node-a", 2, "node-a:1", 4, device_bytes=24 * 1024**3)
    assert started.job_id == big and started.devices == [0, 1] and started.placement == [("node-a", 2), ("node-b", 2)]
    with db.session() as s:
        rows = s.execute(select(GpuLease.node, GpuLease.device_index, GpuLease.node_rank, GpuLease.attempt)
                         .where(GpuLease.job_id == big).order_by(GpuLease.node, GpuLease.device_index)).all()
        job = s.get(Job, big)
        assert [tuple(r) for r in rows] == [("node-a", 0, 0, 1), ("node-a", 1, 0, 1),
                                           ("node-b", 0, 1, 1), ("node-b", 1, 1, 1)]
        assert job.placement == {"attempt": 1, "nodes": ["node-a", "node-b"], "per_node": 2}
        said = s.scalars(select(JobEvent.message).where(JobEvent.job_id == big)).all()
        assert any("across nodes node-a (2), node-b (2); node-a launches" in m for m in said)
        # node-b's worker finds its part, and one of its processes takes it
        owed = placement.joins_owed(s, "node-b")
        assert owed == [placement.Join(big, 1, 1)] and placement.joins_owed(s, "node-a") == []
        assert placement.claim_join(s, owed[0], "node-b", "node-b:1")
        assert not placement.claim_join(s, owed[0], "node-b", "node-b:2")
        assert placement.joins_owed(s, "node-b") == []
        assert placement.rendezvous(s, big, 1) is None  # the launcher has not written it yet
    with db.session() as s:
        placement.mark_ready(s, big, 1, "10.0.0.1", 29411, 300, {"output_dir": "/x"})
    with db.session() as s:
        ready = placement.rendezvous(s, big, 1)
        assert (ready["master_addr"], ready["master_port"]) == ("10.0.0.1", 29411)
        assert ready["config"] == {"output_dir": "/x"}
        with pytest.raises(LookupError):
            placement.rendezvous(s, big, 2)  # not this attempt's: nothing to join
        # node-b is full: its worker starts nothing else on it
        assert len(leases.leased_devices(s, "node-b")) == 2
        leases.release(s, big, 1, "node-b")  # a joining node frees its own part only
        assert len(leases.leased_devices(s, "node-b")) == 0 and len(leases.leased_devices(s, "node-a")) == 2


def test_a_spread_job_starts_only_when_every_part_is_free_and_small_jobs_backfill_meanwhile(database_url):
    db, (busy, big, small) = _cluster(database_url, [(1, 0), (4, 0), (1, 0)], {"node-a": 2, "node-b": 2})
    first = scheduler.start_next(db, "node-b", 2, "node-b:1", 4, device_bytes=24 * 1024**3)
    assert first.job_id == busy and first.placement is None  # node-b: 1 of 2 GPUs busy
    second = scheduler.start_next(db, "node-a", 2, "node-a:1", 4, device_bytes=24 * 1024**3)
    assert second.job_id == small and second.ahead_of == [big]  # big waits for node-b: all or none
    with db.session() as s:
        assert s.scalar(select(GpuLease.id).where(GpuLease.job_id == big)) is None  # no part leased
        said = s.scalars(select(JobEvent.message).where(JobEvent.job_id == big)).all()
        assert said == ["waiting: 4 GPU(s) needed, more than a node has: it starts when enough nodes have their "
                        "share free at once"]
    for done in (busy, small):
        with db.session() as s:
            s.get(Job, done).status = "succeeded"
            leases.release(s, done)
    started = scheduler.start_next(db, "node-b", 2, "node-b:1", 4, device_bytes=24 * 1024**3)
    assert started.job_id == big and started.placement == [("node-b", 2), ("node-a", 2)]  # node-b launches


def test_a_lost_node_takes_no_part_and_the_job_waits(database_url):
    db, (big,) = _cluster(database_url, [(4, 0)], {"node-a": 2, "node-b": 2})
    with db.session() as s:
        s.get(Node, "node-b").seen_at = datetime.now(timezone.utc) - timedelta(minutes=5)
    assert scheduler.start_next(db, "node-a", 2, "node-a:1", 4, device_bytes=24 * 1024**3) is None
    with db.session() as s:
        assert s.get(Job, big).status == "queued"


def test_the_launcher_learns_of_a_failed_or_lost_node(database_url):
    db, (big,) = _cluster(database_url, [(4, 0)], {"node-a": 2, "node-b": 2})
    scheduler.start_next(db, "node-a", 2, "node-a:1", 4, device_bytes=24 * 1024**3)
    recent = datetime.now(timezone.utc) - timedelta(seconds=60)
    with db.session() as s:
        assert placement.problem(s, big, recent) is None
        s.get(Node, "node-b").seen_at = recent - timedelta(seconds=1)
    with db.session() as s:
        lost = placement.problem(s, big, recent)
        assert (lost["node"], lost["node_rank"], lost["code"]) == ("node-b", 1, "node_lost")
        nodes.node_seen(s, "node-b")
    with db.session() as s:
        assert placement.report_failure(s, big, 1, "node-b", 1, "out_of_memory", "CUDA out of memory")
        assert not placement.report_failure(s, big, 1, "node-b", 1, "training_failed", "later")  # the first only
        assert not placement.report_failure(s, big, 2, "node-b", 1, "training_failed", "another attempt")
    with db.session() as s:
        failure = placement.problem(s, big, recent)
        assert (failure["code"], failure["message"]) == ("out_of_memory", "CUDA out of memory")
        said = s.scalars(select(JobEvent.message).where(JobEvent.job_id == big, JobEvent.level == "error")).all()
        assert said == ["node node-b (node rank 1) failed: CUDA out of memory"]


def test_cpu_nodes_with_counted_ranks_spread_jobs_too(database_url):
    upgrade(database_url)
    db = database(database_url)
    (job,) = seed_jobs(db, [(2, 0)])
    with db.session() as s:
        nodes.register_node(s, "cpu-a", [], cpu_ranks=1)
        nodes.register_node(s, "cpu-b", [], cpu_ranks=1)
        nodes.register_node(s, "uncounted", [])  # no LOMO_CPU_RANKS: never part of a spread job
    started = scheduler.start_next(db, "cpu-a", 1, "cpu-a:1", 4)
    assert started.job_id == job and started.placement == [("cpu-a", 1), ("cpu-b", 1)]


# ------------------------------------------------------------------------------------------ at submission
ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time"}\n' % n for n in range(6))


def test_submission_takes_a_job_some_nodes_can_share_and_refuses_one_none_can(admin_env):
    admin, settings, model = admin_env
    file_id = admin.post("/v1/files", files={"file": ("d.jsonl", ROWS)}, data={"purpose": "fine-tune"}).json()["id"]

    def submit(gpus: int):
        return admin.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id, "gpus": gpus,
                                                        "hyperparameters": {"max_steps": 2, "batch_size": 2}})

    assert submit(2).status_code == 200  # a CPU node that does not count its ranks: nothing to check against
    db = database(settings.resolved_database_url())
    with db.session() as s:
        nodes.register_node(s, "cpu-a", [], cpu_ranks=2)
        nodes.register_node(s, "cpu-b", [], cpu_ranks=2)
    assert submit(4).status_code == 200  # 2 nodes x 2 ranks
    refused = submit(3)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "gpus" and error["message"] == (
        "gpus: 3 GPUs asked for; the nodes of this deployment have 2, 2 CPU ranks (LOMO_CPU_RANKS), and a job "
        "larger than a node needs nodes that each take the same share of it")
    assert submit(6).status_code == 422
