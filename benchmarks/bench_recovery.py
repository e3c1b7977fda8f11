"""How long a job is down when its worker dies, and how much training it loses, by checkpoint interval.

Two real `lomo worker` processes share Postgres and Redis (127.0.0.1, as in the tests). A stories260K job
(../shared) runs on one of them; at a random step after its first checkpoint (uniform over two checkpoint
intervals, seeded) the whole process group of that worker is SIGKILLed, a fresh worker is started in its
place, and the time until the job runs again on the other worker is measured (heartbeat timeout + the
recovery poll + the claim + the child's start). Repeated ``--kills`` times (each on a new job) for each
checkpoint interval of ``--save-every`` and each heartbeat timeout of ``--timeout``; the report gives the
medians, and the training done again after each recovery: the steps between the checkpoint resumed
from and the last step the lost process completed (read from the job's own metrics.jsonl), and their
seconds (the lost steps' own step times).

    .venv/bin/python benchmarks/bench_recovery.py --kills 5 --timeout 4 --save-every 5,10,20 \
        --out docs/benchmarks-recovery.md
    .venv/bin/python benchmarks/bench_recovery.py --kills 2 --timeout 60 --save-every 10   # the default timeout
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def _train_records(metrics: Path) -> dict[int, float]:
    """Step -> its seconds, of every step the training process completed (its own metrics.jsonl, written
    every step; a line cut short by the kill is skipped)."""
    found = {}
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            found[int(record["step"])] = float(record.get("step_seconds") or 0.0)
    return found


def _numbers(kind: type):
    """An argparse type: a comma-separated list of positive numbers of ``kind``."""
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive {kind.__name__}s, got {text!r}")
        return values
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="kills per checkpoint interval and timeout")
    parser.add_argument("--timeout", type=_numbers(float), default=[4.0],
                        help="LOMO_HEARTBEAT_TIMEOUT_S, or a comma-separated list")
    parser.add_argument("--save-every", type=_numbers(int), default=[10],
                        help="the checkpoint interval, or a comma-separated list")
    parser.add_argument("--seed", type=int, default=0, help="of the steps the kills land at")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for timeout in args.timeout:
        for save_every in args.save_every:
            rows += [(timeout, save_every, *row) for row in _trials(args.kills, timeout, save_every, rng)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = [
        "# Recovery after a lost worker", "",
        f"Commit {commit.strip()}; `benchmarks/bench_recovery.py --kills {args.kills} --timeout "
        f"{','.join(f'{t:g}' for t in args.timeout)} --save-every {','.join(map(str, args.save_every))} "
        f"--seed {args.seed}` on 2 CPU cores, Postgres + Redis, two `lomo worker`s, "
        "stories260K; each kill at a random step after the first checkpoint.", "",
        "| heartbeat timeout (s) | checkpoint every | kill | job down (s) | step at the kill | resumed from "
        "| steps done again | seconds done again |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {t:g} | {e} | {i} | {d:.1f} | {s} | {r} | {s - r} | {lost:.2f} |"
          for t, e, i, d, s, r, lost in rows], "",
        "| heartbeat timeout (s) | checkpoint every | median down (s) | median steps done again | mean steps "
        "done again | mean seconds done again |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in dict.fromkeys((t, e) for t, e, *_ in rows):
        chosen = [r for r in rows if (r[0], r[1]) == key]
        again = [r[4] - r[5] for r in chosen]
        report.append(f"| {key[0]:g} | {key[1]} | {statistics.median(r[3] for r in chosen):.1f} | "
                      f"{statistics.median(again):g} | {statistics.mean(again):.1f} | "
                      f"{statistics.mean(r[6] for r in chosen):.2f} |")
    report += ["", "The time down is the heartbeat timeout plus the recovery poll (every quarter of the timeout), "
               "the wake-up, the claim and the training process's start. The training done again is at most one "
               "checkpoint interval, half of one on average for a kill at a random moment; the service's default "
               "for jobs without `save_every` is a checkpoint every `LOMO_RECOVERY_CHECKPOINT_MINUTES` (30).", ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _trials(kills: int, timeout: float, save_every: int, rng: random.Random) -> list[tuple]:
    """``kills`` jobs, each killed once: (kill, seconds down, step at the kill, step resumed from, seconds
    of the steps done again)."""
    tmp = Path(f"/tmp/lomo-bench-recovery-{uuid.uuid4().hex[:6]}")
    url = create_postgres_database()
    env = {**os.environ, "LOMO_DATA_DIR": str(tmp / "var"), "LOMO_QUEUE": f"lomo-bench-{uuid.uuid4().hex[:8]}",
           "LOMO_DATABASE_URL": url, "LOMO_BROKER_URL": REDIS_URL, "LOMO_FLUSH_INTERVAL_S": "0.2",
           "LOMO_DEVICE": "cpu", "LOMO_HEARTBEAT_TIMEOUT_S": str(timeout), "LOMO_REQUEUE_DELAY_S": "1",
           "LOMO_MODEL_DIRS": json.dumps([str(STORIES.parent)])}
    settings = Settings(data_dir=tmp / "var", database_url=url, broker_url=REDIS_URL, queue=env["LOMO_QUEUE"])
    settings.data_dir.mkdir(parents=True)
    workers = {name: start_worker(env, name, tmp / f"{name}.log") for name in ("node-a", "node-b")}
    db = database(url)
    rows = []
    try:
        with TestClient(create_app(settings)) as api:
            api.headers["Authorization"] = f"Bearer {settings.admin_key_file.read_text().strip()}"
            file_id = api.post("/v1/files", files={"file": ("alpaca.json", INSTRUCT.read_bytes())}).json()["id"]
            for kill in range(kills):
                at = rng.randint(save_every + 1, 3 * save_every)
                body = {"model": STORIES.name, "training_file": file_id, "seed": kill,
                        "hyperparameters": {"max_steps": 3 * save_every + 100, "batch_size": 4, "max_seq_len": 64,
                                            "lr": 5e-3, "save_every": save_every}}
                job_id = api.post("/v1/fine_tuning/jobs", json=body).json()["id"]
                while True:
                    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                    if job["status"] == "running" and job["progress"]["step"] >= at:
                        break
                    time.sleep(0.02)
                with db.session() as s:
                    victim = s.get(Job, job_id).claimed_by.split(":")[0]
                killed = time.monotonic()
                os.killpg(workers[victim].pid, signal.SIGKILL)
                workers[victim].wait()
                time.sleep(0.5)  # its training process stops (parent-death signal), before the next attempt
                done = _train_records(settings.data_dir / "jobs" / job_id / "metrics.jsonl")
                step_at_kill = max(done, default=0)
                while True:
                    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                    if job["attempt"] == 2 and job["status"] == "running":
                        break
                    time.sleep(0.05)
                down = time.monotonic() - killed
                deadline = time.monotonic() + 60
                while True:  # the new attempt says where it resumes from just after its claim
                    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                    resumed = [int(e["message"].rsplit(" ", 1)[1]) for e in events
                               if e["message"].startswith("resuming from the checkpoint at step")]
                    if resumed or time.monotonic() > deadline:  # (the kill is after the first checkpoint)
                        break
                    time.sleep(0.05)
                start = resumed[0] if resumed else 0
                lost = sum(seconds for step, seconds in done.items() if step > start)
                rows.append((kill + 1, down, step_at_kill, start, lost))
                print(f"timeout {timeout:g}, checkpoint every {save_every}, kill {kill + 1}: down {down:.1f} s, "
                      f"killed at step {step_at_kill}, resumed from {start}", flush=True)
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
    return rows


if __name__ == "__main__":
    sys.exit(main())
