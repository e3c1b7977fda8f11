"""The scheduler: which queued job starts on which GPUs. The rule on its own, then many worker threads
sharing simulated devices through SQLite and Postgres: no device leased twice, every job runs once,
queue order kept among jobs of one size, backfill bounded, the GPUs of a crashed job coming back."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from jobs import leases, nodes, scheduler
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job, JobEvent, Node
from jobs.scheduler import Running, Waiting, choose, preemption_victims
from jobs.states import JobStatus
from tests.conftest import seed_jobs


# ------------------------------------------------------------------------------------------ the rule
def test_the_first_job_that_fits_starts():
    queue = [Waiting("a", 2), Waiting("b", 1)]
    assert choose(queue, free=4, node_size=8, backfill_limit=4).job_id == "a"


def test_a_small_job_starts_on_free_gpus_while_a_big_one_waits():
    queue = [Waiting("big", 8), Waiting("mid", 4), Waiting("small", 1)]
    choice = choose(queue, free=2, node_size=8, backfill_limit=4)
    assert choice.job_id == "small" and choice.skipped == ["big", "mid"] and choice.held_for is None


def test_at_the_backfill_limit_the_free_gpus_are_held_for_the_waiting_job():
    queue = [Waiting("big", 8, bypassed=4), Waiting("small", 1)]
    choice = choose(queue, free=2, node_size=8, backfill_limit=4)
    assert choice.job_id is None and choice.held_for == "big"
    assert choose(queue, free=8, node_size=8, backfill_limit=4).job_id == "big"
    # strict order: no backfill at all
    assert choose([Waiting("big", 8), Waiting("small", 1)], free=2, node_size=8, backfill_limit=0).job_id is None


def test_a_job_at_the_limit_held_on_another_node_lets_this_one_backfill():
    queue = [Waiting("big", 4, bypassed=1, held_on="node-b"), Waiting("small", 1)]
    assert choose(queue, free=2, node_size=4, backfill_limit=1, node="node-a").job_id == "small"
    held = choose(queue, free=2, node_size=4, backfill_limit=1, node="node-b")
    assert held.job_id is None and held.held_for == "big"
    unheld = [Waiting("big", 4, bypassed=1), Waiting("small", 1)]  # no node holds yet: this one does
    assert choose(unheld, free=2, node_size=4, backfill_limit=1, node="node-a").held_for == "big"


def test_a_job_larger_than_the_node_is_left_to_larger_nodes():
    queue = [Waiting("huge", 16), Waiting("small", 1)]
    choice = choose(queue, free=8, node_size=8, backfill_limit=0)
    assert choice.job_id == "small" and choice.skipped == []


def test_a_job_predicted_larger_than_this_nodes_gpus_is_left_to_nodes_with_larger_ones():
    gib = 1024**3
    queue = [Waiting("for-80gib-cards", 1, need_bytes=60 * gib), Waiting("small", 1, need_bytes=10 * gib)]
    on_24 = choose(queue, free=8, node_size=8, backfill_limit=0, device_bytes=24 * gib)
    assert on_24.job_id == "small" and on_24.skipped == []  # not blocked by a job that can never run here
    assert choose(queue, free=8, node_size=8, backfill_limit=0, device_bytes=80 * gib).job_id == "for-80gib-cards"


def test_a_cpu_node_takes_the_queue_in_order():
    assert choose([Waiting("a", 2), Waiting("b", 1)], free=None, node_size=None, backfill_limit=0).job_id == "a"


def test_preemption_takes_lower_priority_jobs_that_ran_long_enough_lowest_first():
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)

    def ran(minutes: float) -> datetime:
        return now - timedelta(minutes=minutes)

    running = [Running("p1-old", 1, 1, ran(60)), Running("p0-old", 0, 1, ran(60)), Running("p0-new", 0, 2, ran(15)),
               Running("p0-fresh", 0, 4, ran(1)), Running("p5", 5, 2, ran(60))]
    high = Waiting("high", 2, priority=5)
    # lowest priority first, then the most recently started (of those that ran 10 minutes): p0-new frees 2
    assert preemption_victims(high, 0, running, now, min_run_s=600) == ["p0-new"]
    assert preemption_victims(Waiting("high", 4, priority=5), 0, running, now, 600) == ["p0-new", "p0-old", "p1-old"]
    # too few GPUs even with every eligible job (p0-fresh is protected, p5 is not of lower priority): none
    assert preemption_victims(Waiting("high", 5, priority=5), 0, running, now, 600) == []
    assert preemption_victims(Waiting("high", 5, priority=5), 0, running, now, 0) == ["p0-fresh", "p0-new"]
    assert preemption_victims(Waiting("eq", 1, priority=1), 0, running, now, 600) == ["p0-new"]
    assert preemption_victims(Waiting("low", 1, priority=0), 0, running, now, 600) == []  # none below it
    assert preemption_victims(high, 2, running, now, 600) == []  # it fits the free GPUs: nothing to preempt


def test_no_backfill_takes_the_gpus_freed_for_a_preempting_job():
    queue = [Waiting("high", 2, priority=5), Waiting("small", 1)]
    assert choose(queue, free=1, node_size=2, backfill_limit=4).job_id == "small"
    held = choose(queue, free=1, node_size=2, backfill_limit=4, reserved=frozenset({"high"}))
    assert held.job_id is None and held.held_for == "high"


# ------------------------------------------------------------------------------------------ on a database
def queue_jobs(db, specs: list[tuple[int, int]]) -> list[str]:
    """Queued jobs of (GPUs, priority), created one second apart in this order."""
    return seed_jobs(db, specs, JobStatus.QUEUED.value)


def finish(db, job_id: str, status: JobStatus = JobStatus.SUCCEEDED, release: bool = True) -> None:
    with db.session() as s:
        s.get(Job, job_id).status = status.value
        if release:
            leases.release(s, job_id)


@pytest.mark.parametrize("limit", [0, 3])
def test_many_workers_share_the_gpus_of_a_node(database_url, limit):
    upgrade(database_url)
    db = database(database_url)
    rng = random.Random(7)
    specs = [(rng.choice([1, 1, 1, 2, 2, 4, 8]), rng.choice([0, 0, 5])) for _ in range(30)]
    ids = queue_jobs(db, specs)
    need = dict(zip(ids, (g for g, _ in specs), strict=True))
    order = sorted(ids, key=lambda j: (-specs[ids.index(j)][1], ids.index(j)))  # the queue's order
    crashed = next(j for j in order if need[j] == 2)
    holder: dict[int, str] = {}
    guard = threading.Lock()
    violations: list[str] = []
    starts: list[str] = []

    window: dict[str, tuple[float, float]] = {}  # each start's call and return: its commit lies between

    def worker(n: int) -> None:
        idle = 0
        while idle < 400:
            called = time.monotonic()
            started = scheduler.start_next(db, "node-a", 8, f"w{n}", limit)
            if started is None:
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            with guard:
                window[started.job_id] = (called, time.monotonic())
                starts.append(started.job_id)
                if len(started.devices) != need[started.job_id]:
                    violations.append(f"{started.job_id} got {started.devices}")
                for device in started.devices:
                    if device in holder:
                        violations.append(f"device {device} held by {holder[device]} and {started.job_id}")
                    holder[device] = started.job_id
            time.sleep(rng.uniform(0.005, 0.03))
            with guard:
                for device in started.devices:
                    del holder[device]
            if started.job_id == crashed:  # its worker dies: the job is failed, its leases stay behind
                finish(db, crashed, JobStatus.FAILED, release=False)
                with db.session() as s:
                    assert sorted(leases.leased_devices(s, "node-a")).count(started.devices[0]) == 1
                    assert leases.release_orphans(s, "node-a") == [crashed]  # what a starting worker does
            else:
                finish(db, started.job_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not violations
    assert sorted(starts) == sorted(ids)  # every job ran, once

    # Two starts whose calls overlapped may have committed in either order; one that returned before
    # another was called committed first.
    def before(a: str, b: str) -> bool:
        return window[a][1] < window[b][0]

    for size in set(need.values()):  # among jobs of one size, the queue's order
        same = [j for j in order if need[j] == size]
        assert not [(j, k) for i, j in enumerate(same) for k in same[i + 1:] if before(k, j)], size
    with db.session() as s:
        assert leases.leased_devices(s, "node-a") == {}
        bypassed = {j.id: j.bypassed for j in s.query(Job)}
    for j in ids:  # the count of jobs that started ahead of it, as far as the calls' times tell
        behind = order[order.index(j) + 1:]
        surely = sum(1 for k in behind if before(k, j))
        maybe = sum(1 for k in behind if not before(j, k))
        assert surely <= bypassed[j] <= maybe, (j, surely, bypassed[j], maybe)
    assert max(bypassed.values()) <= limit  # backfill is bounded: nothing starves
    if limit:
        assert max(bypassed.values()) > 0  # and it happened: small jobs used GPUs a big one could not


def test_a_waiting_job_says_so_once_and_a_backfilled_one_says_ahead_of_what(database_url):
    upgrade(database_url)
    db = database(database_url)
    big, small, other = queue_jobs(db, [(4, 0), (1, 0), (1, 0)])
    with db.session() as s:  # 2 of the 4 GPUs are busy with a job of another queue
        s.add(Job(id="busy", owner_id="ann", model="m", training_file_id="f", method="lomo",
                  status=JobStatus.RUNNING.value, gpus=2))
    with db.session() as s:
        s.add_all([GpuLease(node="node-a", device_index=i, job_id="busy") for i in (0, 1)])
    first = scheduler.start_next(db, "node-a", 4, "w", 1)
    assert first.job_id == small and first.devices == [2] and first.ahead_of == [big]
    assert scheduler.start_next(db, "node-a", 4, "w", 1) is None  # the limit (1) is reached: held for big
    finish(db, "busy")
    finish(db, small)
    started = scheduler.start_next(db, "node-a", 4, "w", 1)
    assert started.job_id == big and started.devices == [0, 1, 2, 3]
    with db.session() as s:
        said = [e.message for e in s.query(JobEvent).filter_by(job_id=big).order_by(JobEvent.id)]
        ahead = [e.message for e in s.query(JobEvent).filter_by(job_id=small)]
    waiting = [m for m in said if m.startswith("waiting:")]  # said once, then once when the GPUs are held
    assert len(waiting) == 2 and "2 of 4 free" in waiting[0] and "held for it" in waiting[1]
    assert any(m.startswith("started ahead of " + big) for m in ahead)
    with db.session() as s:
        assert s.get(Job, other).status == JobStatus.QUEUED.value  # behind big, it waits its turn


def test_one_node_holds_for_a_job_at_the_limit_the_others_backfill_and_a_lost_one_is_replaced(database_url):
    upgrade(database_url)
    db = database(database_url)
    big, *small = queue_jobs(db, [(4, 0), (1, 0), (1, 0), (1, 0)])
    with db.session() as s:
        for name in ("node-a", "node-b"):
            nodes.register_node(s, name, [24.0] * 4)
        for name in ("a1", "b1"):  # 2 of each node's 4 GPUs are busy
            s.add(Job(id=name, owner_id="ann", model="m", training_file_id="f", method="lomo",
                      status=JobStatus.RUNNING.value, gpus=2))
    with db.session() as s:
        s.add_all([GpuLease(node=f"node-{n[0]}", device_index=i, job_id=n) for n in ("a1", "b1") for i in (0, 1)])
    first = scheduler.start_next(db, "node-a", 4, "wa", 1)
    assert first.job_id == small[0] and first.ahead_of == [big]  # big's count reaches the limit (1)
    assert scheduler.start_next(db, "node-b", 4, "wb", 1) is None  # node-b holds its GPUs for big
    with db.session() as s:
        assert s.get(Job, big).held_on == "node-b"
    # node-a goes on backfilling (before, every node where big fits drained for it)
    assert scheduler.start_next(db, "node-a", 4, "wa", 1).job_id == small[1]
    assert scheduler.start_next(db, "node-b", 4, "wb", 1) is None
    with db.session() as s:  # node-b is lost: node-a, the next to decide, holds for big instead
        s.get(Node, "node-b").seen_at = datetime.now(timezone.utc) - timedelta(minutes=5)
    finish(db, small[0])
    assert scheduler.start_next(db, "node-a", 4, "wa", 1) is None  # 1 GPU free, and small[2] does not take it
    with db.session() as s:
        assert s.get(Job, big).held_on == "node-a"
    finish(db, "a1")
    finish(db, small[1])
    started = scheduler.start_next(db, "node-a", 4, "wa", 1)
    assert started.job_id == big and started.devices == [0, 1, 2, 3]
    with db.session() as s:
        assert s.get(Job, small[2]).status == JobStatus.QUEUED.value


def test_a_waiting_job_of_higher_priority_preempts_once_and_the_preempted_one_requeues(database_url):
    from jobs import lifecycle

    upgrade(database_url)
    db = database(database_url)
    low, other = queue_jobs(db, [(1, 0), (1, 1)])
    # low and other run on the 2 GPUs; high, submitted then, waits for both
    started = [scheduler.start_next(db, "node-a", 2, "w", 4) for _ in range(2)]
    assert {s.job_id for s in started} == {low, other}
    high = "job-high"
    with db.session() as s:
        s.add(Job(id=high, owner_id="ann", model="m", training_file_id="f", method="lomo", gpus=2, priority=5,
                  status=JobStatus.QUEUED.value))
    assert scheduler.start_next(db, "node-a", 2, "w", 4) is None
    with db.session() as s:
        assert s.get(Job, low).status == s.get(Job, other).status == JobStatus.RUNNING.value  # preemption is off

    # on, with a minimum run time not reached yet: nothing is preempted
    assert scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=3600) is None
    with db.session() as s:
        assert s.get(Job, low).status == JobStatus.RUNNING.value
    assert scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=0) is None
    with db.session() as s:
        assert [(s.get(Job, j).status, s.get(Job, j).preempted_by) for j in (low, other)] == [
            (JobStatus.PAUSING.value, high), (JobStatus.PAUSING.value, high)]
        said = [e.message for e in s.query(JobEvent).filter_by(job_id=low)]
    assert any(m.startswith(f"preempted by {high} (priority 5 over 0)") for m in said)
    assert scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=0) is None  # under way: no more
    with db.session() as s:  # the GPUs held for high are node-a's, whose jobs pause for it; not another node's
        assert scheduler.preemptions_under_way(s, "node-a") == {high} == scheduler.preemptions_under_way(s)
        assert scheduler.preemptions_under_way(s, "node-b") == frozenset()

    # low pauses: back in the queue, not paused; its GPU is held for high (no backfill by low itself)
    with db.session() as s:
        assert lifecycle.finish_job(s, low, lifecycle.Outcome(JobStatus.PAUSED)) is JobStatus.QUEUED
        leases.release(s, low)
        row = s.get(Job, low)
        assert (row.status, row.preempted_by, row.preemptions, row.claimed_by) == (JobStatus.QUEUED.value, None, 1,
                                                                                 None)
    assert scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=0) is None
    with db.session() as s:  # other was asked to pause by hand meanwhile: it ends paused, not queued
        assert lifecycle.pause_job(s, "ann", other).preempted_by is None
        assert lifecycle.finish_job(s, other, lifecycle.Outcome(JobStatus.PAUSED)) is JobStatus.PAUSED
        leases.release(s, other)
    first = scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=0)
    assert (first.job_id, first.devices) == (high, [0, 1])
    finish(db, high)
    assert scheduler.start_next(db, "node-a", 2, "w", 4, preempt_min_run_s=0).job_id == low


def test_a_job_cancelled_while_it_pauses_for_a_preemption_ends_cancelled(database_url):
    from jobs import lifecycle

    upgrade(database_url)
    db = database(database_url)
    [low] = queue_jobs(db, [(1, 0)])
    assert scheduler.start_next(db, "node-a", 1, "w", 4).job_id == low
    with db.session() as s:
        s.add(Job(id="job-high", owner_id="ann", model="m", training_file_id="f", method="lomo", gpus=1, priority=5,
                  status=JobStatus.QUEUED.value))
    assert scheduler.start_next(db, "node-a", 1, "w", 4, preempt_min_run_s=0) is None
    with db.session() as s:
        assert lifecycle.cancel_job(s, "ann", low).cancel_requested
        # its training process checkpointed and reported "paused": it does not go back to the queue
        assert lifecycle.finish_job(s, low, lifecycle.Outcome(JobStatus.PAUSED)) is JobStatus.CANCELLED
        assert s.get(Job, low).status == JobStatus.CANCELLED.value
