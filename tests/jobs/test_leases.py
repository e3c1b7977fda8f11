"""GPU leases on simulated devices, SQLite and Postgres: never a device leased twice, every job served,
the GPUs of a job that ended without releasing them come back."""

from __future__ import annotations

import random
import threading
import time

from jobs import leases
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import File, Job, User
from jobs.states import JobStatus


def make_jobs(db, sizes: list[int]) -> list[tuple[str, int]]:
    with db.session() as s:
        s.add(User(id="ann", name="ann"))
        s.flush()
        s.add(File(id="f", owner_id="ann", filename="d.jsonl", purpose="fine-tune", bytes=1, storage_path="x"))
        s.flush()
        jobs = []
        for n, size in enumerate(sizes):
            s.add(Job(id=f"job-{n:03d}", owner_id="ann", model="m", training_file_id="f", method="lomo",
                      status=JobStatus.RUNNING.value, gpus=size))
            jobs.append((f"job-{n:03d}", size))
    return jobs


def test_concurrent_workers_never_share_a_device(database_url):
    upgrade(database_url)
    db = database(database_url)
    sizes = [random.Random(n).choice([1, 1, 2, 4, 8]) for n in range(24)]
    jobs = make_jobs(db, sizes)
    devices = list(range(8))
    holder: dict[int, str] = {}
    guard = threading.Lock()
    violations: list[str] = []
    served: list[str] = []
    queue = list(jobs)

    def worker() -> None:
        while True:
            with guard:
                if not queue:
                    return
                job_id, size = queue.pop(0)
            while True:  # wait until enough devices are free
                chosen = leases.acquire(db.sessions, "node-a", devices, job_id, size)
                if chosen is not None:
                    break
                time.sleep(0.01)
            with guard:
                if len(chosen) != size:
                    violations.append(f"{job_id} got {chosen} for {size}")
                for device in chosen:
                    if device in holder:
                        violations.append(f"device {device} held by {holder[device]} and {job_id}")
                    holder[device] = job_id
            time.sleep(0.005)
            with guard:
                for device in chosen:
                    del holder[device]
            with db.session() as s:
                assert leases.release(s, job_id) == size
            with guard:
                served.append(job_id)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not violations
    assert sorted(served) == sorted(j for j, _ in jobs)  # every job was served
    with db.session() as s:
        assert leases.leased_devices(s, "node-a") == {}


def test_a_second_worker_cannot_take_a_leased_device_and_nodes_are_separate(database_url):
    upgrade(database_url)
    db = database(database_url)
    (a, _), (b, _), (c, _) = make_jobs(db, [2, 2, 1])
    assert leases.acquire(db.sessions, "node-a", [0, 1], a, 2) == [0, 1]
    assert leases.acquire(db.sessions, "node-a", [0, 1], b, 1) is None  # none free on node-a
    assert leases.acquire(db.sessions, "node-a", [0, 1], a, 2) == [0, 1]  # a re-delivered task gets its own
    assert leases.acquire(db.sessions, "node-b", [0, 1], b, 2) == [0, 1]  # another node's devices
    with db.session() as s:
        leases.release(s, a)
    assert leases.acquire(db.sessions, "node-a", [0, 1], c, 1) == [0]


def test_the_gpus_of_an_ended_job_come_back(database_url):
    upgrade(database_url)
    db = database(database_url)
    (crashed, _), (alive, _) = make_jobs(db, [2, 1])
    assert leases.acquire(db.sessions, "node-a", list(range(4)), crashed, 2) == [0, 1]
    assert leases.acquire(db.sessions, "node-a", list(range(4)), alive, 1) == [2]
    with db.session() as s:  # its worker died; the job was marked failed, the leases stayed
        s.get(Job, crashed).status = JobStatus.FAILED.value
    with db.session() as s:
        assert leases.release_orphans(s, "node-a") == [crashed]
        assert leases.leased_devices(s, "node-a") == {2: alive}
