"""GPU leases, SQLite and Postgres: the database refuses a device leased twice, and the GPUs of a job
that ended without releasing them come back. (Leasing under concurrency: tests/jobs/test_scheduler.py.)"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from jobs import leases
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job
from jobs.states import JobStatus
from tests.conftest import seed_jobs


def make_jobs(db, sizes: list[int]) -> list[tuple[str, int]]:
    ids = seed_jobs(db, [(size, 0) for size in sizes], JobStatus.RUNNING.value)
    return list(zip(ids, sizes, strict=True))


def test_the_database_refuses_a_device_leased_twice_and_keeps_nodes_apart(database_url):
    upgrade(database_url)
    db = database(database_url)
    (a, _), (b, _) = make_jobs(db, [1, 1])
    with db.session() as s:
        s.add(GpuLease(node="node-a", device_index=0, job_id=a))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(GpuLease(node="node-a", device_index=0, job_id=b))
        s.flush()
    with db.session() as s:
        s.add(GpuLease(node="node-b", device_index=0, job_id=b))  # another node's device 0
    with db.session() as s:
        assert leases.release(s, a) == 1
        s.add(GpuLease(node="node-a", device_index=0, job_id=b))  # free again once released
    with db.session() as s:
        assert leases.leased_devices(s, "node-a") == {0: b}


def test_the_gpus_of_an_ended_job_come_back(database_url):
    upgrade(database_url)
    db = database(database_url)
    (crashed, _), (alive, _) = make_jobs(db, [2, 1])
    with db.session() as s:
        s.add_all([GpuLease(node="node-a", device_index=i, job_id=crashed) for i in (0, 1)]
                  + [GpuLease(node="node-a", device_index=2, job_id=alive)])
    with db.session() as s:  # its worker died; the job was marked failed, the leases stayed
        s.get(Job, crashed).status = JobStatus.FAILED.value
    with db.session() as s:
        assert leases.release_orphans(s, "node-a") == [crashed]
        assert leases.leased_devices(s, "node-a") == {2: alive}
