"""CPU nodes tell the truth about bf16: a worker's start probes the CPU's bf16 matmul against fp32 and records
the ratio with its node; an estimate and the submission of a bf16 job warn, with fp32 as the advice, when no
CPU node of the deployment multiplies bf16 natively."""

from __future__ import annotations

import math

import pytest

from jobs import nodes
from jobs.db import database
from jobs.models import Node
from lomo_core.cpu_probe import SLOW_FACTOR, probe_bf16_matmul

ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time"}\n' % n for n in range(6))


@pytest.fixture
def env(admin_env):
    return admin_env


def test_the_probe_times_both_dtypes_on_one_thread():
    import torch

    threads = torch.get_num_threads()
    probe = probe_bf16_matmul(rows=64, inner=128, cols=32, repeat=2)
    assert probe.fp32_ms > 0 and probe.bf16_ms > 0 and math.isfinite(probe.slowdown)
    assert probe.slowdown == pytest.approx(probe.bf16_ms / probe.fp32_ms)
    assert probe.native is (probe.slowdown <= SLOW_FACTOR)
    assert torch.get_num_threads() == threads  # put back as it was


def test_a_workers_start_records_its_cpu_nodes_probe(tmp_path):
    from jobs.migrate import upgrade
    from jobs.settings import Settings
    from worker.app import start_node

    url = f"sqlite:///{tmp_path / 'lomo.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, worker_name="cpu-node", device="cpu")
    start_node(settings, slots=1)
    with database(url).session() as session:
        node = session.get(Node, "cpu-node")
        assert node.gpu_memory_gib == [] and node.cpu_bf16_slowdown is not None and node.cpu_bf16_slowdown > 0


def estimate(client, file_id: str, model: str, dtype: str) -> dict:
    answer = client.post("/v1/estimates", json={"model": model, "training_file": file_id,
                                                 "hyperparameters": {"dtype": dtype, "max_steps": 2}})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_bf16_on_cpu_nodes_that_emulate_it_is_warned_with_fp32_as_the_advice(env):
    client, settings, model = env
    file_id = client.post("/v1/files", files={"file": ("d.jsonl", ROWS)}, data={"purpose": "fine-tune"}).json()["id"]
    assert estimate(client, file_id, model, "bf16")["warnings"] == []  # no node probed yet: nothing to say
    db = database(settings.resolved_database_url())
    with db.session() as session:
        nodes.register_node(session, "epyc-1", [], cpu_bf16_slowdown=67.0)
    warned = estimate(client, file_id, model, "bf16")["warnings"]
    assert len(warned) == 1 and "67x" in warned[0] and "epyc-1" in warned[0] and "fp32" in warned[0]
    assert estimate(client, file_id, model, "fp32")["warnings"] == []
    job = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id,
                                                    "hyperparameters": {"dtype": "bf16", "max_steps": 2}}).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert any(e["level"] == "warn" and "set dtype fp32" in e["message"] for e in events)
    with db.session() as session:  # a node that multiplies bf16 natively joins: bf16 jobs can go there
        nodes.register_node(session, "xeon-1", [], cpu_bf16_slowdown=0.3)
    assert estimate(client, file_id, model, "bf16")["warnings"] == []
