"""`lomo serve` with no configuration: SQLite, the SQLite broker and a worker beside the API, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.rest import ApiError, LomoClient
from tests.conftest import INSTRUCT, STORIES, need_shared

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_a_job_with_zero_configuration(tmp_path):
    need_shared(STORIES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update(LOMO_FLUSH_INTERVAL_S="0.3", LOMO_DEVICE="cpu")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:  # the working folder is the only thing given: data goes to ./var
        server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port)], cwd=tmp_path,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        anonymous = LomoClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if anonymous._http.get("/health").json()["embedded"]:
                    break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        # nothing is open without a key: the first start made the local admin's, for its owner only
        with pytest.raises(ApiError) as refused:
            anonymous.list_jobs()
        assert refused.value.status == 401
        key_file = tmp_path / "var" / "admin-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert str(key_file) in log.read_text() and key_file.read_text().strip() not in log.read_text()
        client = LomoClient(f"http://127.0.0.1:{port}", api_key=key_file.read_text().strip())
        with pytest.raises(ApiError) as refused:
            client.create_job("stories260K", "file-none")
        assert refused.value.status == 422 and refused.value.param == "training_file"
        file = client.upload_file(need_shared(INSTRUCT))
        with pytest.raises(ApiError) as refused:  # jobs name models, never paths
            client.create_job(str(STORIES), file["id"])
        assert refused.value.status == 422 and refused.value.param == "model"
        assert client.register_model("stories260K", STORIES)["id"] == "stories260K"  # the admin registers it
        assert client.me()["is_admin"] is True

        job = client.create_job("stories260K", file["id"], hyperparameters={"max_steps": 3, "max_seq_len": 128})
        job = client.wait(job["id"], timeout=180, poll=0.3)
        assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
        assert [m["step"] for m in client.metrics(job["id"], kind="train")] == [1, 2, 3]
        assert (tmp_path / "var" / "lomo.db").is_file() and (tmp_path / "var" / "broker.db").is_file()
        assert job["id"] in [j["id"] for j in client.iter_jobs()]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    # the worker started beside the API stops with it (a warm shutdown takes a moment)
    deadline = time.monotonic() + 30
    while True:
        leftover = subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True, text=True).stdout.split()
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leftover == [], f"processes left behind: {leftover}"


@pytest.mark.parametrize("name, value, needle", [
    ("LOMO_GPU_MEMORY_GIB", "abc", "LOMO_GPU_MEMORY_GIB: cannot read this value"),
    ("LOMO_GPU_MEMORY_GIB", "[24, -1]", "LOMO_GPU_MEMORY_GIB_1: Input should be greater than 0"),
    ("LOMO_FLUSH_INTERVAL_S", "soon", "LOMO_FLUSH_INTERVAL_S: Input should be a valid number"),
    ("LOMO_CPU_RANKS", "0", "LOMO_CPU_RANKS: Input should be greater than or equal to 1"),
])
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_bad_settings_stop_the_service_with_the_variable_named(tmp_path, command, name, value, needle):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update({name: value, "LOMO_DATA_DIR": str(tmp_path / "var")})
    done = subprocess.run([sys.executable, "-m", "client.cli", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert needle in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_several_api_processes_share_the_port_and_metrics_sum_their_requests(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update(LOMO_DEVICE="cpu", LOMO_METRICS_TOKEN="t" * 32)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--workers", "2",
                                   "--no-worker"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    figures = tmp_path / "var" / "prometheus"
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        keys = tmp_path / "var" / "admin-key"
        assert len(keys.read_text().split()) == 1  # made once, before the processes started
        sent = 1
        # until both processes have served some (each connection goes to whichever accepts it first)
        while len({p.stem.rsplit("_", 1)[-1] for p in figures.glob("counter_*.db")}) < 2:
            assert sent < 2000 and time.monotonic() < deadline + 60, "only one API process answered"
            httpx.get(url + "/healthz", timeout=5)
            sent += 1
        for _ in range(3):  # any process answers for all of them
            answer = httpx.get(url + "/metrics", headers={"Authorization": "Bearer " + "t" * 32}, timeout=10)
            assert answer.status_code == 200, answer.text
            counted = sum(s.value for family in text_string_to_metric_families(answer.text) for s in family.samples
                          if s.name == "lomo_http_requests_total" and s.labels["route"] == "/healthz")
            assert counted == sent
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
