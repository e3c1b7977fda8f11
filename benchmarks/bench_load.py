"""How much load the API holds: a short asyncio script (httpx), not locust, against real `lomo serve` processes
on Postgres and Redis (127.0.0.1, as in the tests), with no worker, so the jobs stay queued.

For each API process count of ``--processes`` (default 1 and 2), on a fresh database: ``--jobs`` jobs (default
1,000) are queued through the API, then for ``--seconds`` (60) ``--pollers`` clients (50) read in a loop, each
a random queued job, its events or its metrics (3 : 2 : 1), while ``--submitters`` (10) create jobs and one
Prometheus scrapes ``/metrics`` every 15 s. Each client has its own connection (keep-alive), as a polling
script or a browser tab does; with ``--interval S`` each sends one request every S seconds on its own timer,
from a random phase (``Pace``). The first ``--warmup`` seconds (5), while the clients connect, are load but
not counted in the latencies (their errors are). Reported per route: requests, throughput, p50 / p95 / p99
latency (client side, to the end of the body) and errors (anything but a 2xx, or no answer). The load
generator runs on the same machine as the API, so on 2 cores the figures are what both together leave.

    .venv/bin/python benchmarks/bench_load.py --out docs/benchmarks-load.md
    .venv/bin/python benchmarks/bench_load.py --processes 1 --seconds 10 --jobs 100   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import REDIS_URL, STORIES, create_postgres_database, drop_postgres_database  # noqa: E402

TOKEN = "load-" + "m" * 27
ROWS = "".join(json.dumps({"prompt": f"tell me a story {n}", "response": "once upon a time"}) + "\n"
               for n in range(16)).encode()
BODY = {"hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_len": 64}}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(processes: int, folder: Path) -> tuple[subprocess.Popen, str, dict[str, str], str]:
    database_url = create_postgres_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update(LOMO_DATABASE_URL=database_url, LOMO_BROKER_URL=REDIS_URL,
               LOMO_QUEUE=f"lomo-load-{uuid.uuid4().hex[:8]}",
               LOMO_DATA_DIR=str(folder / "var"), LOMO_MODEL_DIRS=json.dumps([str(STORIES.parent)]),
               LOMO_METRICS_TOKEN=TOKEN, LOMO_QUOTA_QUEUED_JOBS="1000000", LOMO_DEVICE="cpu")
    port = free_port()
    log = (folder / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--no-worker",
                               "--workers", str(processes)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the API did not start:\n{(folder / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.3)
    return server, url, env, database_url


def stop_api(server: subprocess.Popen, env: dict[str, str], database_url: str) -> None:
    import redis

    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    redis.Redis.from_url(REDIS_URL).delete(env["LOMO_QUEUE"])
    drop_postgres_database(database_url)


class Record:
    """Each route's latencies from ``counted_from`` (time.monotonic) on, and its errors from the start."""

    def __init__(self, counted_from: float = 0.0) -> None:
        self.counted_from = counted_from
        self.latency: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def note(self, route: str, seconds: float, ok: bool, what: str = "") -> None:
        if time.monotonic() - seconds >= self.counted_from:  # sent after the warm-up
            self.latency.setdefault(route, []).append(seconds)
        if not ok:
            self.errors[route] = self.errors.get(route, 0) + 1
            self.examples.setdefault(route, what[:200])


async def timed(record: Record, route: str, request) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        answer = await request
    except httpx.HTTPError as e:
        record.note(route, time.perf_counter() - started, False, f"{type(e).__name__}: {e}")
        return None
    record.note(route, time.perf_counter() - started, 200 <= answer.status_code < 300,
                f"{answer.status_code}: {answer.text}")
    return answer


async def queue_jobs(url: str, key: str, file_id: str, count: int) -> list[str]:
    ids: list[str] = []

    async def make(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            for _ in range(n):
                answer = await c.post("/v1/fine_tuning/jobs", json={"model": STORIES.name, "training_file": file_id,
                                                                   **BODY})
                answer.raise_for_status()
                ids.append(answer.json()["id"])

    per = [count // 10 + (1 if i < count % 10 else 0) for i in range(10)]
    await asyncio.gather(*(make(n) for n in per))
    return ids


class Pace:
    """When a paced client sends: every ``interval`` seconds on its own schedule, from a random phase, as
    independent pollers do (a timer, not "a second after the last answer": after a slow answer or a
    stall of the load generator the clients would otherwise all send together from then on, and the
    benchmark would measure the bursts it made). A slot missed while waiting for an answer is skipped,
    not sent late in a burst. Without an interval: at once (the most load the clients can make)."""

    def __init__(self, interval: float, chooser: random.Random) -> None:
        self.interval = interval
        self.start = time.monotonic() + chooser.uniform(0, interval)
        self.slot = 0

    async def next(self) -> float:
        now = time.monotonic()
        if not self.interval:
            return now
        due = self.start + self.slot * self.interval
        if due < now:  # behind: the next slot still to come
            self.slot = int((now - self.start) // self.interval) + 1
            due = self.start + self.slot * self.interval
        self.slot += 1
        await asyncio.sleep(due - now)
        return due


async def load(url: str, key: str, file_id: str, ids: list[str], pollers: int, submitters: int,
               seconds: float, interval: float = 0.0, warmup: float = 0.0) -> tuple[Record, float]:
    """``seconds`` of load, after ``warmup`` seconds whose latencies are not counted (its errors are)."""
    record = Record(time.monotonic() + warmup)
    stop_at = record.counted_from + seconds
    auth = {"Authorization": f"Bearer {key}"}
    scrape = {"Authorization": f"Bearer {TOKEN}"}

    async def poll(seed: int) -> None:
        chooser = random.Random(seed)
        pace = Pace(interval, chooser)
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as c:
            while await pace.next() < stop_at:
                job = chooser.choice(ids)
                kind = chooser.choices(("job", "events", "metrics"), weights=(3, 2, 1))[0]
                if kind == "job":
                    await timed(record, "GET /v1/fine_tuning/jobs/{id}", c.get(f"/v1/fine_tuning/jobs/{job}"))
                elif kind == "events":
                    await timed(record, "GET /v1/fine_tuning/jobs/{id}/events",
                                c.get(f"/v1/fine_tuning/jobs/{job}/events"))
                else:
                    await timed(record, "GET /v1/fine_tuning/jobs/{id}/metrics",
                                c.get(f"/v1/fine_tuning/jobs/{job}/metrics"))

    async def submit(seed: int) -> None:
        pace = Pace(interval, random.Random(seed))
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as c:
            while await pace.next() < stop_at:
                await timed(record, "POST /v1/fine_tuning/jobs",
                            c.post("/v1/fine_tuning/jobs", json={"model": STORIES.name, "training_file": file_id,
                                                                 **BODY}))

    async def prometheus() -> None:  # one scraper, as Prometheus does (every 15 s)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                await timed(record, "GET /metrics", c.get("/metrics", headers=scrape))
                await asyncio.sleep(max(0.0, min(15.0 - (time.monotonic() - began), stop_at - time.monotonic())))

    await asyncio.gather(*(poll(n) for n in range(pollers)), *(submit(10_000 + n) for n in range(submitters)),
                         prometheus())
    return record, seconds  # the window the counted requests were sent in


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(processes: int, record: Record, elapsed: float, queued: int) -> list[str]:
    lines = [f"### {processes} API process{'es' if processes > 1 else ''}", "",
             f"{queued} jobs queued before the run; {elapsed:.0f} s of load.", "",
             "| route | requests | per second | p50 ms | p95 ms | p99 ms | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    total = 0
    for route in sorted(record.latency):
        values = record.latency[route]
        total += len(values)
        lines.append(f"| `{route}` | {len(values)} | {len(values) / elapsed:.1f} | "
                     f"{percentile(values, 50) * 1000:.1f} | {percentile(values, 95) * 1000:.1f} | "
                     f"{percentile(values, 99) * 1000:.1f} | "
                     f"{record.errors.get(route, 0)} |")
    lines.append(f"| all | {total} | {total / elapsed:.1f} | | | | {sum(record.errors.values())} |")
    for route, example in record.examples.items():
        lines.append(f"\nFirst error of `{route}`: `{example}`")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="API process counts to measure, comma-separated")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--submitters", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of load before the measured ones, while the clients connect (errors count)")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between one client's requests (0: each sends the next as soon as it has an "
                             "answer, the most load the clients can make)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not STORIES.is_dir():
        raise SystemExit(f"the benchmark reads {STORIES}: put ../shared beside the project")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = ["# API under load", "",
           f"`benchmarks/bench_load.py` at commit {commit}, on {os.cpu_count()} CPU cores (the load generator on the "
           f"same machine): Postgres + Redis, {args.pollers} clients polling (a job 3 : its events 2 : its metrics 1), "
           f"one scraping /metrics every 15 s "
           f"and {args.submitters} submitting, for {args.seconds:.0f} s after {args.warmup:g} s of warm-up, over "
           f"{args.jobs} queued jobs; "
           + (f"each client sends a request every {args.interval:g} s on its own timer." if args.interval else
              "each client sends its next request as soon as it has an answer (the most load they can make)."), ""]
    for processes in (int(p) for p in args.processes.split(",")):
        with tempfile.TemporaryDirectory(prefix="lomo-load-") as folder:
            server, url, env, database_url = start_api(processes, Path(folder))
            try:
                key = (Path(folder) / "var" / "admin-key").read_text().strip()
                file_id = httpx.post(url + "/v1/files", headers={"Authorization": f"Bearer {key}"},
                                     files={"file": ("stories.jsonl", ROWS)}, data={"purpose": "fine-tune"},
                                     timeout=60).json()["id"]
                started = time.monotonic()
                ids = asyncio.run(queue_jobs(url, key, file_id, args.jobs))
                print(f"{processes} process(es): {len(ids)} jobs queued in {time.monotonic() - started:.0f} s",
                      file=sys.stderr)
                record, elapsed = asyncio.run(load(url, key, file_id, ids, args.pollers, args.submitters,
                                                   args.seconds, args.interval, args.warmup))
                out += report(processes, record, elapsed, len(ids))
            except Exception:
                print((Path(folder) / "serve.log").read_text()[-6000:], file=sys.stderr)
                raise
            finally:
                stop_api(server, env, database_url)
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
