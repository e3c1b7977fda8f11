"""How long a job is down when its worker dies, and how much training it loses.

Two real `lomo worker` processes share Postgres and Redis (127.0.0.1, as in the tests). A stories260K job
(../shared) runs on one of them; after its first checkpoint the whole process group of that worker is
SIGKILLed, a fresh worker is started in its place, and the time until the job runs again on the other
worker is measured (heartbeat timeout + the recovery poll + the claim + the child's start). Repeated
``--kills`` times (each on a new job); the report gives the median, and the steps done again after each
recovery (the steps between the checkpoint resumed from and the last step the lost process completed,
read from the job's own metrics.jsonl).

    .venv/bin/python benchmarks/bench_recovery.py --kills 5 --timeout 4 --out docs/benchmarks-recovery.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from jobs.db import database  # noqa: E402
from jobs.models import Job  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.conftest import INSTRUCT, REDIS_URL, STORIES, create_postgres_database, drop_postgres_database  # noqa: E402


def start_worker(env: dict[str, str], name: str, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                                   env={**env, "LOMO_WORKER_NAME": name}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 90
    while " ready." not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker {name} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process


def _last_step(metrics: Path) -> int:
    """The last step the training process completed (its own metrics.jsonl, written every step)."""
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if line.strip() and json.loads(line).get("kind") == "train"]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=4.0, help="LOMO_HEARTBEAT_TIMEOUT_S")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(f"/tmp/lomo-bench-recovery-{uuid.uuid4().hex[:6]}")
    url = create_postgres_database()
    env = {**os.environ, "LOMO_DATA_DIR": str(tmp / "var"), "LOMO_QUEUE": f"lomo-bench-{uuid.uuid4().hex[:8]}",
           "LOMO_DATABASE_URL": url, "LOMO_BROKER_URL": REDIS_URL, "LOMO_FLUSH_INTERVAL_S": "0.2",
           "LOMO_DEVICE": "cpu", "LOMO_HEARTBEAT_TIMEOUT_S": str(args.timeout), "LOMO_REQUEUE_DELAY_S": "1"}
    settings = Settings(data_dir=tmp / "var", database_url=url, broker_url=REDIS_URL, queue=env["LOMO_QUEUE"])
    settings.data_dir.mkdir(parents=True)
    workers = {name: start_worker(env, name, tmp / f"{name}.log") for name in ("node-a", "node-b")}
    db = database(url)
    rows = []
    try:
        with TestClient(create_app(settings)) as api:
            file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]
            for kill in range(args.kills):
                body = {"model": str(STORIES), "training_file": file_id, "seed": kill,
                        "hyperparameters": {"max_steps": 200, "batch_size": 4, "max_seq_len": 64, "lr": 5e-3,
                                            "save_every": args.save_every}}
                job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
                while True:
                    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                    if job["status"] == "running" and job["progress"]["step"] > args.save_every:
                        break
                    time.sleep(0.05)
                with db.session() as s:
                    victim = s.get(Job, job_id).claimed_by.split(":")[0]
                killed = time.monotonic()
                os.killpg(workers[victim].pid, signal.SIGKILL)
                workers[victim].wait()
                time.sleep(0.5)  # its training process stops (parent-death signal), before the next attempt
                step_at_kill = _last_step(settings.data_dir / "jobs" / job_id / "metrics.jsonl")
                while True:
                    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                    if job["attempt"] == 2 and job["status"] == "running":
                        break
                    time.sleep(0.05)
                down = time.monotonic() - killed
                events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                resumed = [int(e["message"].rsplit(" ", 1)[1]) for e in events
                           if e["message"].startswith("resuming from the checkpoint at step")]
                rows.append((down, step_at_kill, resumed[0] if resumed else 0))
                print(f"kill {kill + 1}: down {down:.1f} s, killed at step {step_at_kill}, resumed from "
                      f"{rows[-1][2]}", flush=True)
                api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
                workers[victim] = start_worker(env, victim, tmp / f"{victim}-{kill + 1}.log")  # a fresh one
    finally:
        for process in workers.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(settings.queue)
        drop_postgres_database(url)
    downs = [r[0] for r in rows]
    lost = [r[1] - r[2] for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = [
        "# Recovery after a lost worker", "",
        f"Commit {commit.strip()}; `benchmarks/bench_recovery.py --kills {args.kills} --timeout {args.timeout:g} "
        f"--save-every {args.save_every}` on 2 CPU cores, Postgres + Redis, two `lomo worker`s, stories260K.", "",
        "| kill | job down (s) | step at the kill | resumed from | steps done again |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {i + 1} | {d:.1f} | {s} | {r} | {s - r} |" for i, (d, s, r) in enumerate(rows)], "",
        f"Median time from the kill to the job running again: **{statistics.median(downs):.1f} s** with a heartbeat "
        f"timeout of {args.timeout:g} s (the rest: the recovery poll, every quarter of the timeout, the wake-up, "
        "the claim and the training process's start). Steps done again: at most the checkpoint interval "
        f"({args.save_every} here); median {statistics.median(lost):g}.", "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
