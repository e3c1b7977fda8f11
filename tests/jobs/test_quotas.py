"""Quotas in the jobs layer, on SQLite and Postgres: the running-jobs quota holds a user's further jobs in
the queue (others' jobs start meanwhile) until one ends; GPU-hours are summed from the leases, the part
inside the window; admins' overrides are validated."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs import leases, quotas, scheduler
from jobs.db import database
from jobs.errors import InvalidRequest
from jobs.lifecycle import Outcome, finish_job
from jobs.migrate import upgrade
from jobs.models import GpuLease, Job, JobEvent, User, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus
from tests.conftest import seed_jobs


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    return database(database_url)


def test_a_user_at_the_running_quota_waits_and_a_finished_job_frees_it(db, tmp_path):
    ann = seed_jobs(db, [(1, 0), (1, 0), (1, 0)])  # three 1-GPU jobs of ann, in this order
    with db.session() as s:
        s.add(User(id="bob", name="bob"))
        s.flush()
        s.add(Job(id="job-bob", owner_id="bob", model="m", training_file_id="f", method="lomo", status="queued",
                  gpus=1, created_at=utcnow() + timedelta(days=1)))  # after all of ann's
        s.get(User, "ann").quotas = {"running_jobs": 2}
    settings = Settings(data_dir=tmp_path, quota_running_jobs=None)

    def start():
        started = scheduler.start_next(db, "node-a", 8, "w", 4, quota_settings=settings)
        return started.job_id if started else None

    assert [start(), start()] == ann[:2]
    assert start() == "job-bob"  # ann's third waits; bob's job, behind it, is not held up
    assert start() is None
    with db.session() as s:
        assert s.get(Job, ann[2]).status == "queued"
        waits = [e.message for e in s.query(JobEvent).filter_by(job_id=ann[2])]
        assert any("quota running_jobs: 2 of its owner's jobs run and the limit is 2" in m for m in waits), waits
        assert quotas.usage(s, settings, "ann")["running_jobs"] == 2
    with db.session() as s:
        finish_job(s, ann[0], Outcome(JobStatus.SUCCEEDED))
        leases.release(s, ann[0])
    assert start() == ann[2]
    # without quota settings (or with the override gone) the scheduler counts nothing
    with db.session() as s:
        assert quotas.running_limits(s, settings, {"ann"}) != {}
        s.get(User, "ann").quotas = {"running_jobs": None}  # an admin lifts it for ann
    with db.session() as s:
        assert quotas.running_limits(s, settings, {"ann", "bob"}) == {}
        assert quotas.running_limits(s, Settings(data_dir=tmp_path, quota_running_jobs=1), {"bob"}) == {
            "bob": "waiting: quota running_jobs: 1 of its owner's jobs run and the limit is 1; it starts when one "
                   "of them ends"}


def test_gpu_hours_are_summed_from_the_leases_inside_the_window(db, tmp_path):
    ids = seed_jobs(db, [(2, 0), (1, 0)])
    now = utcnow()
    with db.session() as s:
        s.add_all([
            # job 0: two GPUs for 3 hours, ended an hour ago
            GpuLease(node="n", device_index=0, job_id=ids[0], leased_at=now - timedelta(hours=4),
                     released_at=now - timedelta(hours=1)),
            GpuLease(node="n", device_index=1, job_id=ids[0], leased_at=now - timedelta(hours=4),
                     released_at=now - timedelta(hours=1)),
            # job 1: one GPU held for 30 minutes, still held
            GpuLease(node="n", device_index=2, job_id=ids[1], leased_at=now - timedelta(minutes=30)),
            # long before the window: not counted
            GpuLease(node="n", device_index=3, job_id=ids[1], leased_at=now - timedelta(days=30),
                     released_at=now - timedelta(days=29)),
        ])
    with db.session() as s:
        assert quotas.gpu_hours(s, "ann", now - timedelta(days=7), now) == pytest.approx(6.5)
        # a window of 2 hours takes the last hour of job 0's two leases and job 1's half hour
        assert quotas.gpu_hours(s, "ann", now - timedelta(hours=2), now) == pytest.approx(2.5)
        assert quotas.gpu_hours(s, "bob", now - timedelta(days=7), now) == 0
        usage = quotas.usage(s, Settings(data_dir=tmp_path, quota_window_hours=2), "ann")
        assert usage["gpu_hours"] == pytest.approx(2.5, abs=0.01)


def test_the_leases_the_scheduler_takes_count_as_gpu_hours(db, tmp_path):
    ids = seed_jobs(db, [(4, 0)])
    assert scheduler.start_next(db, "node-a", 8, "w", 4).job_id == ids[0]
    with db.session() as s:  # an hour later, the job ends
        for lease in s.query(GpuLease).filter_by(job_id=ids[0]):
            lease.leased_at = utcnow() - timedelta(hours=1)
        leases.release(s, ids[0])
    with db.session() as s:
        assert quotas.usage(s, Settings(data_dir=tmp_path), "ann")["gpu_hours"] == pytest.approx(4.0, abs=0.01)


def test_overrides_are_checked_naming_the_quota():
    assert quotas.checked_overrides({"running_jobs": 2.0, "gpu_hours": 1.5, "upload_bytes": None}) == {
        "running_jobs": 2, "gpu_hours": 1.5, "upload_bytes": None}
    for wrong, param in (({"gpus": 2}, "quotas.gpus"), ({"running_jobs": 0}, "quotas.running_jobs"),
                         ({"queued_jobs": 1.5}, "quotas.queued_jobs"), ({"gpu_hours": -1}, "quotas.gpu_hours"),
                         ({"upload_bytes": True}, "quotas.upload_bytes"), ({"gpu_hours": "many"}, "quotas.gpu_hours")):
        with pytest.raises(InvalidRequest) as refused:
            quotas.checked_overrides(wrong)
        assert refused.value.problems[0].param == param, wrong
