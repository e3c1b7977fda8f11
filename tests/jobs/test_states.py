from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from jobs.states import ALLOWED, IllegalTransition, JobStatus, check_transition, transition


def test_the_normal_path_sets_timestamps():
    job = SimpleNamespace(status="queued", started_at=None, finished_at=None)
    t0, t1 = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
    transition(job, JobStatus.RUNNING, now=t0)
    transition(job, "succeeded", now=t1)
    assert (job.status, job.started_at, job.finished_at) == ("succeeded", t0, t1)


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
@pytest.mark.parametrize("new", [s.value for s in JobStatus])
def test_a_final_status_never_changes(final, new):
    with pytest.raises(IllegalTransition, match=f"a {final} job cannot become {new}"):
        check_transition(final, new)


@pytest.mark.parametrize("current, new", [("queued", "succeeded"), ("validating_files", "running"),
                                          ("queued", "queued"), ("running", "validating_files")])
def test_illegal_transitions_are_refused(current, new):
    job = SimpleNamespace(status=current, started_at=None, finished_at=None)
    with pytest.raises(IllegalTransition):
        transition(job, new)
    assert job.status == current and job.started_at is None


def test_every_status_has_a_rule():
    assert set(ALLOWED) == set(JobStatus)
    assert JobStatus.QUEUED in ALLOWED[JobStatus.RUNNING]  # a crashed worker's job can be re-queued
