"""Fencing and the recovery budget, end to end with real processes: Postgres, Redis, `lomo worker`s and
stories260K training on the CPU.

- A worker frozen mid-job (SIGSTOP of the whole node: the worker's process group and its training
  process's own group) is taken for lost; another worker resumes the job. When the frozen one wakes, its
  attempt is fenced: it writes nothing more, its training process is killed, the worker lives on and takes
  the next job, and the job ends with the weights of an uninterrupted run.
- Past ``LOMO_MAX_RECOVERIES`` (1 here) a job that loses its worker again fails with ``worker_lost``, and
  its events name each lost worker and the recovery.
- A node killed while its training process is writing a checkpoint: the job resumes elsewhere from the
  previous complete checkpoint and ends with the weights of an uninterrupted run.

One cluster serves the three tests (its workers are replaced as they are killed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select, text

from jobs.db import database
from jobs.models import Job, MetricPoint
from jobs.settings import Settings
from tests.conftest import (
    INSTRUCT,
    REDIS_URL,
    STORIES,
    create_postgres_database,
    drop_postgres_database,
    need_shared,
    open_api_client,
)
from tests.e2e.live_service import worker_env
from tests.e2e.test_scheduling import training_pids
from tests.e2e.test_worker_loss import JOB, ROOT, _alive, _claimed_by, wait

TIMEOUT_S = 4  # LOMO_HEARTBEAT_TIMEOUT_S
TERMINAL = ("succeeded", "failed", "cancelled")
STEPS = 40  # checkpoints at 10, 20, 30 and 40 (JOB's save_every)


@dataclass
class Cluster:
    api: TestClient
    settings: Settings
    env: dict[str, str]
    tmp: Path
    file_id: str = ""
    workers: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)
    reference: str | None = None  # the uninterrupted run's job id
    lost: set[str] = field(default_factory=set)  # the workers a test killed

    def spawn(self, name: str) -> None:
        """Start a `lomo worker` named ``name`` (its own session, so a signal to its group is a node's)."""
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                env={**self.env, "LOMO_WORKER_NAME": name}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.workers[name] = (process, log)

    def ready(self, timeout: float = 120) -> None:
        """Wait until every worker not killed by a test has said it is ready (none may have died)."""
        deadline = time.monotonic() + timeout
        for name, (process, log) in self.workers.items():
            while name not in self.lost and " ready." not in log.read_text(errors="replace"):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        assert all(p.poll() is None for n, (p, _log) in self.workers.items() if n not in self.lost), self.workers

    def kill(self, name: str) -> None:
        """The node of worker ``name`` is lost: SIGKILL to its process group (the worker and its pool)."""
        process = self.workers[name][0]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.lost.add(name)

    def alive(self) -> list[str]:
        return [name for name, (process, _log) in self.workers.items() if process.poll() is None]

    def logs(self) -> list[Path]:
        return [log for _process, log in self.workers.values()]

    def body(self, **hyper) -> dict:
        return {"model": STORIES.name, "training_file": self.file_id, "seed": 5,
                "hyperparameters": {**JOB, "max_steps": STEPS, **hyper}}

    def submit(self, body: dict) -> str:
        response = self.api.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def events(self, job_id: str) -> list[str]:
        """The job's event messages, oldest first."""
        data = self.api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return [e["message"] for e in reversed(data)]

    def row(self, job_id: str) -> Job:
        with database(self.settings.resolved_database_url()).session() as s:
            job = s.get(Job, job_id)
            s.expunge(job)
            return job

    def output_dir(self, job_id: str) -> Path:
        return self.settings.data_dir / "jobs" / job_id

    def worker_of(self, job_id: str) -> str:
        """The name of the worker that claimed the job's current attempt."""
        claimed = str(_claimed_by(self.settings, job_id))
        return next(name for name in self.workers if claimed.startswith(f"{name}:"))

    def uninterrupted_weights(self) -> dict[str, torch.Tensor]:
        """The final weights of the job of ``body()`` run once without interruption (shared by the tests)."""
        if self.reference is None:
            self.reference = self.submit(self.body())
        job = wait(self.api, self.reference, lambda j: j["status"] in TERMINAL, logs=self.logs())
        assert job["status"] == "succeeded" and job["attempt"] == 1, job
        return load_file(str(self.output_dir(self.reference) / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_shared(STORIES)
    need_shared(INSTRUCT)
    tmp = tmp_path_factory.mktemp("fencing")
    url = create_postgres_database()
    env, settings = worker_env(tmp / "var", url, "lomo-fence", heartbeat_timeout_s=str(TIMEOUT_S),
                               requeue_delay_s="1", max_recoveries="1")
    api = open_api_client(settings)
    c = Cluster(api, settings, env, tmp)
    try:
        c.spawn("node-a")
        c.spawn("node-b")
        c.file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]
        c.ready()
        yield c
    finally:
        api.__exit__(None, None, None)
        for process, _log in c.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)  # a test that failed may have left it frozen
                    os.killpg(process.pid, signal.SIGTERM)
        for process, _log in c.workers.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in _module_training_pids(settings):  # frozen or orphaned training processes of a failed test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(settings.queue)
        drop_postgres_database(url)


# ------------------------------------------------------------------------------------------------ the tests
def test_a_partitioned_worker_is_fenced_when_it_wakes(cluster):
    c = cluster
    job_id = c.submit(c.body())
    wait(c.api, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 12, logs=c.logs())
    frozen = c.worker_of(job_id)
    old_claim = c.row(job_id).claimed_by
    worker = c.workers[frozen][0]
    [child] = training_pids(job_id)
    # The node freezes: first its worker (the Celery pool and the job's supervisor: the partition), then the
    # training process, which runs in a session of its own and trains on meanwhile, so that the supervisor
    # holds steps it has not written yet when it wakes.
    frozen_groups = [worker.pid, child]
    metrics = c.output_dir(job_id) / "metrics.jsonl"
    try:
        reported = _freeze_outside_a_transaction(c, worker.pid, job_id)  # the last step the database has
        _wait_for(lambda: _last_logged_step(metrics) >= reported + 2, 30, "the training process did not go on")
        _freeze(child)
        unreported = range(reported + 1, _last_logged_step(metrics) + 1)  # in the frozen supervisor's hands
        assert len(unreported) >= 1 and c.row(job_id).step == reported
        wait(c.api, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running",
             timeout=TIMEOUT_S * 3 + 30, logs=c.logs())
        rescuer = c.worker_of(job_id)
        new_claim = c.row(job_id).claimed_by
        assert rescuer != frozen and new_claim != old_claim
        # the new attempt has started training (its start rewound what the lost attempt wrote after its checkpoint)
        _wait_for(lambda: any(m.startswith("training started at step ") and not m.startswith(
            "training started at step 0 ") for m in c.events(job_id)), 60, "the new attempt never started training")
        messages = c.events(job_id)
        resumed = [int(m.rsplit(" ", 1)[1]) for m in messages if m.startswith("resuming from the checkpoint at step")]
        assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] % 10 == 0, messages
        lost = [m for m in messages if m.startswith(f"worker {old_claim} lost: no heartbeat for ")]
        assert len(lost) == 1 and "(attempt 1); back in the queue" in lost[0] \
            and "(recovery 1 of at most 1)" in lost[0], messages
        assert _alive(child), "the frozen training process died while frozen"
    finally:
        for group in frozen_groups:  # the node wakes: both at once
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)

    # The old attempt is fenced: its supervisor's next write finds the job in attempt 2, kills its training
    # process and ends nothing; the worker itself lives on.
    frozen_log = c.workers[frozen][1]
    _wait_for(lambda: not _alive(child), 20, "the fenced attempt's training process outlived the fencing",
              [frozen_log])
    _wait_for(lambda: f"job {job_id}: attempt 1 was recovered elsewhere meanwhile" in frozen_log.read_text(), 20,
              "the woken worker did not report its attempt fenced", [frozen_log])
    assert worker.poll() is None and _alive(worker.pid), frozen_log.read_text()[-3000:]
    row = c.row(job_id)
    assert row.attempt == 2 and row.claimed_by == new_claim and row.status in ("running", "succeeded"), \
        (row.status, row.attempt, row.claimed_by)

    # The woken worker takes work again: the uninterrupted reference run goes to it (the rescuer is busy).
    c.reference = c.submit(c.body())
    wait(c.api, c.reference, lambda j: j["status"] != "queued", timeout=60, logs=c.logs())
    assert c.worker_of(c.reference) == frozen

    job = wait(c.api, job_id, lambda j: j["status"] in TERMINAL, logs=c.logs())
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    row = c.row(job_id)
    assert row.claimed_by == new_claim and row.recoveries == 1
    # Nothing of the old attempt landed: every step has one train point. The steps the frozen supervisor held
    # (``unreported``) were written by the new attempt (done again after its checkpoint, or backfilled from
    # metrics.jsonl up to it), so a write of the old attempt would be a second point of one of them...
    with database(c.settings.resolved_database_url()).session() as s:
        steps = list(s.scalars(select(MetricPoint.step).where(MetricPoint.job_id == job_id,
                                                              MetricPoint.kind == "train").order_by(MetricPoint.step)))
    assert steps == list(range(1, STEPS + 1))
    # ...and after the recovery each checkpoint was recorded once, and one attempt ended the job.
    messages = c.events(job_id)
    after = messages[next(i for i, m in enumerate(messages) if m.startswith(f"worker {old_claim} lost")):]
    saved = [m.split(":")[0] for m in after if m.startswith(("checkpoint saved at step ", "final model saved"))]
    assert len(saved) == len(set(saved)) and saved, after
    assert [m for m in messages if m.startswith("started by worker ")] == [
        f"started by worker {old_claim} (attempt 1)", f"started by worker {new_claim} (attempt 2)"]

    weights = load_file(str(c.output_dir(job_id) / "model" / "model.safetensors"))
    uninterrupted = c.uninterrupted_weights()
    assert weights.keys() == uninterrupted.keys()
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in weights)


def test_past_the_recovery_budget_a_job_fails_with_its_history(cluster):
    c = cluster
    c.ready()
    assert len(c.alive()) >= 2, c.alive()
    job_id = c.submit({**c.body(max_steps=5000, save_every=1000), "seed": 6})  # runs far longer than the test
    claims = []
    for attempt in (1, 2):
        wait(c.api, job_id, lambda j, a=attempt: j["attempt"] == a and j["status"] == "running",
             timeout=TIMEOUT_S * 3 + 60, logs=c.logs())
        # this attempt's training process has started and reported (its "training started" event)
        _wait_for(lambda a=attempt: sum(m.startswith("training started at step ") for m in c.events(job_id)) == a,
                  60, f"attempt {attempt} never started training", c.logs())
        victim = c.worker_of(job_id)
        claims.append(c.row(job_id).claimed_by)
        children = training_pids(job_id)
        assert children, f"no training process of {job_id} (attempt {attempt})"
        c.kill(victim)
        c.spawn(f"node-{len(c.workers) + 1}")  # a replacement, so that a worker is always there to take it
        # the training process goes with its worker (parent-death signal)
        _wait_for(lambda ch=children: not any(_alive(p) for p in ch), 20,
                  "the training process outlived its worker", c.logs())

    job = wait(c.api, job_id, lambda j: j["status"] in TERMINAL, timeout=TIMEOUT_S * 3 + 30, logs=c.logs())
    assert job["status"] == "failed" and job["attempt"] == 2, job
    assert job["error"]["code"] == "worker_lost", job["error"]
    assert f"lost its worker 2 times (the last: {claims[1]})" in job["error"]["message"], job["error"]
    assert "after 1 recoveries (LOMO_MAX_RECOVERIES)" in job["error"]["message"], job["error"]
    messages = c.events(job_id)
    lost = [m for m in messages if " lost: no heartbeat for " in m]
    assert len(lost) == 2, messages
    for message, claim, attempt in zip(lost, claims, (1, 2), strict=True):
        assert message.startswith(f"worker {claim} lost: no heartbeat for "), (message, claim)
        silent = int(message.split(" lost: no heartbeat for ", 1)[1].split(" ", 1)[0])
        assert silent >= TIMEOUT_S, message
        assert f" s (attempt {attempt})" in message, message
    assert lost[0].endswith("; back in the queue, to resume from its latest checkpoint (recovery 1 of at most 1)")
    assert lost[1].endswith("; no recovery left: the job fails")
    # the history in order: started, lost, recovered and started again, lost, failed
    history = [m for m in messages if m.startswith("started by worker ") or " lost: no heartbeat for " in m]
    assert history == [f"started by worker {claims[0]} (attempt 1)", lost[0],
                       f"started by worker {claims[1]} (attempt 2)", lost[1]], messages
    assert c.row(job_id).recoveries == 1
    assert not training_pids(job_id)


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(cluster):
    c = cluster
    c.ready()
    assert len(c.alive()) >= 2, c.alive()
    job_id = c.submit(c.body())
    wait(c.api, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 11, logs=c.logs())
    victim = c.worker_of(job_id)
    worker = c.workers[victim][0]
    [child] = training_pids(job_id)
    root = c.output_dir(job_id) / "checkpoints"

    # Watch for the temporary folder save_checkpoint writes a checkpoint into (after the first checkpoint,
    # so that there is a previous one), and freeze the training process as soon as it is there. If the write
    # is half done (files in the folder, but not yet the trainer state, which is written last, and the folder
    # not yet renamed), kill the node; if nothing is written yet, let it go on a moment and look again; if
    # the checkpoint is complete, let it go on to the next one.
    hit, missed, written = None, [], []
    deadline = time.monotonic() + 240
    while hit is None:
        assert time.monotonic() < deadline and _alive(child), f"no checkpoint write caught (missed: {missed})"
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            names = []
        partial = next((n for n in names if n.startswith(".partial-step-") and int(n[14:]) >= 20
                        and int(n[14:]) not in missed), None)
        if partial is None:
            time.sleep(0.002)
            continue
        step = int(partial[14:])
        _freeze(child)
        try:
            written = sorted(os.listdir(root / partial))
        except FileNotFoundError:  # renamed: complete
            written = None
        if written and "trainer_state.pt" not in written and not (root / f"step-{step:06d}").exists():
            hit = step
            os.killpg(child, signal.SIGKILL)  # the training process, in its own session, and the worker
            c.kill(victim)
            continue
        if written is None or "trainer_state.pt" in written:
            missed.append(step)
        os.killpg(child, signal.SIGCONT)
        time.sleep(0.001)
    _wait_for(lambda: not _alive(child), 20, "the killed training process is still there")
    # what the kill left: the half-written folder, and the previous checkpoint as the latest complete one
    assert sorted(os.listdir(root / f".partial-step-{hit:06d}")) == written
    assert not (root / f"step-{hit:06d}").exists()
    complete = sorted(p.name for p in root.glob("step-*") if (p / "trainer_state.pt").is_file())
    assert complete[-1] == f"step-{hit - 10:06d}", complete  # the previous checkpoint, complete

    job = wait(c.api, job_id, lambda j: j["status"] in TERMINAL, logs=c.logs())
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert c.worker_of(job_id) != victim and worker.poll() is not None
    messages = c.events(job_id)
    resumed = [m for m in messages if m.startswith("resuming from the checkpoint at step")]
    assert resumed == [f"resuming from the checkpoint at step {hit - 10}"], (hit, messages)
    assert any(m.startswith(f"training started at step {hit - 10} of {STEPS}") for m in messages), messages
    with database(c.settings.resolved_database_url()).session() as s:
        steps = list(s.scalars(select(MetricPoint.step).where(MetricPoint.job_id == job_id,
                                                              MetricPoint.kind == "train").order_by(MetricPoint.step)))
    assert steps == list(range(1, STEPS + 1))
    assert not (root / f".partial-step-{hit:06d}").exists()  # the new attempt wrote that checkpoint over it

    resumed_weights = load_file(str(c.output_dir(job_id) / "model" / "model.safetensors"))
    uninterrupted = c.uninterrupted_weights()
    assert resumed_weights.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed_weights[k], uninterrupted[k]) for k in resumed_weights)


# ------------------------------------------------------------------------------------------------ helpers
def _freeze_outside_a_transaction(c: Cluster, pgid: int, job_id: str) -> int:
    """SIGSTOP a worker's process group at a moment it holds no lock on the jobs table, and return the job's
    step in the database then. (Frozen inside its heartbeat's transaction, ``SELECT ... FOR UPDATE`` of the
    job's row, it would hold that row's lock until it wakes, and the recovery's UPDATE would wait for it:
    no recovery while the worker is away.)"""
    for _ in range(50):
        _freeze(pgid)
        with database(c.settings.resolved_database_url()).session() as s:
            locked = s.scalar(text(
                "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation WHERE r.relname = 'jobs' "
                "AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.pid <> pg_backend_pid() "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
        if not locked:
            return c.row(job_id).step
        os.killpg(pgid, signal.SIGCONT)
        time.sleep(0.03)
    raise AssertionError("the worker was always inside a transaction")


def _last_logged_step(metrics: Path) -> int:
    """The last train step a job's training process logged (its metrics.jsonl, one line per record)."""
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # being written
        if record.get("kind") == "train":
            steps.append(int(record["step"]))
    return max(steps)


def _freeze(pgid: int) -> None:
    """SIGSTOP a process group and wait until every thread of it has stopped."""
    os.killpg(pgid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(_stopped(p) for p in _group(pgid)):
        assert time.monotonic() < deadline, f"process group {pgid} did not stop"
        time.sleep(0.001)


def _wait_for(condition, timeout: float, message: str, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message + "\n" + "\n".join(Path(p).read_text()[-2000:] for p in logs))
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group(pgid: int) -> list[int]:
    """The live processes of a process group."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and (s := _stat(int(e.name))) is not None and int(s[2]) == pgid]


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or it is gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _module_training_pids(settings: Settings) -> list[int]:
    """Training processes started by this module's cluster (their config lies under its data folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.runner" in cmdline and str(settings.data_dir).encode() in cmdline:
                found.append(int(entry.name))
    return found

