"""A real service for end-to-end tests: `lomo serve` on the zero-configuration default (SQLite, the SQLite
broker, a worker beside the API), or `lomo serve` + `lomo worker` on Postgres and Redis, as separate
processes on a free port of 127.0.0.1. Modules start one per backend (module-scoped fixtures)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jobs.settings import Settings
from tests.conftest import REDIS_URL, STORIES, create_postgres_database, drop_postgres_database

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["embedded", "postgres+redis"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveService:
    backend: str
    url: str  # http://127.0.0.1:PORT
    data_dir: Path
    env: dict[str, str]
    logs: list[Path]
    processes: list[subprocess.Popen] = field(default_factory=list)
    database_url: str | None = None

    @property
    def api_key(self) -> str:
        """The local admin's key, which `lomo serve` wrote at its first start."""
        return (self.data_dir / "admin-key").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self.backend == "postgres+redis":
            import redis

            redis.Redis.from_url(REDIS_URL).delete(self.env["LOMO_QUEUE"])
            drop_postgres_database(self.database_url)


def worker_env(data_dir: Path, database_url: str, queue_prefix: str, **lomo: str) -> tuple[dict[str, str], Settings]:
    """For tests that run `lomo worker` processes on Postgres (``database_url``) and Redis beside an API in
    this process: the workers' environment (this one's, stories260K's folder registered, the CPU, records
    flushed every 0.2 s, a queue of its own, and ``lomo`` as further LOMO_* values) and the Settings of the
    same service (its data folder made)."""
    env = {**os.environ, "LOMO_DATA_DIR": str(data_dir), "LOMO_QUEUE": f"{queue_prefix}-{uuid.uuid4().hex[:8]}",
           "LOMO_DATABASE_URL": database_url, "LOMO_BROKER_URL": REDIS_URL, "LOMO_FLUSH_INTERVAL_S": "0.2",
           "LOMO_DEVICE": "cpu", "LOMO_MODEL_DIRS": json.dumps([str(STORIES.parent)]),
           **{f"LOMO_{key.upper()}": value for key, value in lomo.items()}}
    settings = Settings(data_dir=data_dir, model_dirs=[STORIES.parent], database_url=database_url,
                        broker_url=REDIS_URL, queue=env["LOMO_QUEUE"])
    data_dir.mkdir(parents=True)
    return env, settings


def processes(*parts: bytes, containing: bytes | None = None, ending: bytes | None = None,
              without: bytes | None = None) -> list[int]:
    """The pids of this machine's processes whose command line has all of ``parts`` as words, and, when
    given, a word containing ``containing``, a word ending with ``ending``, and no word ``without``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(part in words for part in parts) and without not in words \
                    and (containing is None or any(containing in word for word in words)) \
                    and (ending is None or any(word.endswith(ending) for word in words)):
                found.append(int(entry.name))
    return found


def _spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "client.cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_service(backend: str, tmp: Path, **settings: str) -> LiveService:
    """Start the service, wait until it answers and a worker is ready; ``settings`` are LOMO_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update(LOMO_DATA_DIR=str(tmp / "var"), LOMO_QUEUE=f"lomo-test-{uuid.uuid4().hex[:8]}",
               LOMO_FLUSH_INTERVAL_S="0.3", LOMO_DEVICE="cpu", LOMO_REQUEUE_DELAY_S="1",
               LOMO_MODEL_DIRS=f'["{STORIES.parent}"]', LOMO_WORKER_NAME=f"e2e-{uuid.uuid4().hex[:6]}",
               **{f"LOMO_{k.upper()}": v for k, v in settings.items()})
    port = free_port()
    service = LiveService(backend, f"http://127.0.0.1:{port}", tmp / "var", env, [])
    if backend == "postgres+redis":
        service.database_url = create_postgres_database()
        env.update(LOMO_DATABASE_URL=service.database_url, LOMO_BROKER_URL=REDIS_URL)
        worker_log = tmp / "worker.log"
        service.logs.append(worker_log)
        service.processes.append(_spawn(["worker", "--loglevel", "info"], env, worker_log, ROOT))
    serve_log = tmp / "serve.log"
    service.logs.append(serve_log)
    service.processes.append(_spawn(["serve", "--port", str(port)], env, serve_log, ROOT))
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(service.url + "/health", timeout=5).status_code == 200 and any(
                    " ready." in p.read_text(errors="replace") for p in service.logs):
                return service
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in service.processes):
            tail = service.log_tail()
            service.stop()
            raise AssertionError(f"the service did not start:\n{tail}")
        time.sleep(0.3)


@contextlib.contextmanager
def api_in_thread(settings) -> Iterator[str]:
    """The API of ``settings`` served by uvicorn in a thread of this process, on a free port of 127.0.0.1
    (for tests that need real HTTP but no worker); yields its URL."""
    import threading

    import uvicorn

    from api.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
