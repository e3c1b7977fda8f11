"""A ZeRO-3 run over several nodes (``launch(config, nodes=Nodes(...))``), for real on this machine: two
"nodes" are two concurrent launches of one rank each (CPU, gloo, 127.0.0.1), which train exactly like one
process; a pause given to one node stops every rank; a node whose partner never comes fails fast."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import INSTRUCT, STORIES, free_port, need_shared
from safetensors.torch import load_file

from lomo_core.config import load_config
from lomo_core.zero3.launch import LaunchError, Nodes, _command, launch


@pytest.fixture(autouse=True)
def one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores: no oversubscription


def settings(out: Path, **changes) -> dict:
    return {**dict(model=need_shared(STORIES), data=need_shared(INSTRUCT), output_dir=out, max_seq_len=96,
                   batch_size=5, lr=5e-3, clip_grad_norm=1.0, device="cpu", max_steps=4, save_every=2, seed=3),
            **changes}


def on_two_nodes(config, pause_files=(None, None), timeout_s: int = 60) -> list[dict]:
    """Node 0 and node 1 (one rank each) launched at once, as two nodes' workers would; their results."""
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(launch, config, pause_file=pause_files[rank],
                               nodes=Nodes(2, rank, 1, "127.0.0.1", port, rendezvous_timeout_s=timeout_s))
                   for rank in (0, 1)]
        return [f.result(timeout=240) for f in futures]


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_two_nodes_train_like_one_process(tmp_path):
    from lomo_core.train import train

    one = train(settings(tmp_path / "one"))
    config = load_config(settings(tmp_path / "nodes", nproc=2))
    launcher, joined = on_two_nodes(config)

    assert joined == {"joined": True, "node_rank": 1, "nodes": 2}
    assert launcher["steps"] == 4 and launcher["model_dir"] == str(config.output_dir / "model")
    a, b = load_file(str(one.model_dir / "model.safetensors")), load_file(str(tmp_path / "nodes" / "model" /
                                                                                "model.safetensors"))
    base = load_file(str(STORIES / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - base[name]).abs().max() > 0  # trained
        assert torch.allclose(b[name], a[name], rtol=1e-4, atol=1e-6), name  # float32 rounding only
    out = config.output_dir
    # global rank 0 alone reports: one line per step, and the whole batch's loss
    assert [r["loss"] for r in records(out, "train")] == pytest.approx(one.losses, rel=1e-5)
    assert sorted(r["rank"] for r in records(out, "memory") if r["step"] == 1) == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000004").glob("zero3-rank-*.pt")) == [
        "zero3-rank-00000.pt", "zero3-rank-00001.pt"]
    # each node its own config and log; no error report
    assert {p.name for p in out.glob("launch*")} == {"launch-config.json", "launch-config-node-1.json",
                                                     "launch.log", "launch-node-1.log"}
    assert not list((out / ".ranks").glob("rank-*.json"))


def test_a_pause_given_to_one_node_stops_every_rank(tmp_path):
    """The joining node alone sees the pause file; the launcher, given none, still votes: both stop after
    the first step with one checkpoint."""
    config = load_config(settings(tmp_path / "nodes", nproc=2, save_every=None))
    pause = tmp_path / "pause-now"
    pause.touch()
    launcher, joined = on_two_nodes(config, pause_files=(None, pause))
    checkpoint = str(config.output_dir / "checkpoints" / "step-000001")
    assert launcher == {"paused": 1, "checkpoint": checkpoint}
    assert joined == {"joined": True, "node_rank": 1, "nodes": 2, "paused": 1, "checkpoint": checkpoint}
    assert len(list(Path(checkpoint).glob("zero3-rank-*.pt"))) == 2


@pytest.mark.parametrize("node_rank", [0, 1])
def test_a_node_whose_partner_never_comes_fails_within_the_timeout(tmp_path, node_rank):
    config = load_config(settings(tmp_path / "alone", nproc=2))
    stale = config.output_dir / ".ranks"
    stale.mkdir(parents=True)  # an earlier attempt's report: not this failure's cause
    (stale / "rank-0.json").write_text(json.dumps({"rank": 0, "message": "old", "code": "old", "time": 0}))
    port = free_port()
    started = time.monotonic()
    with pytest.raises(LaunchError) as failed:
        launch(config, nodes=Nodes(2, node_rank, 1, "127.0.0.1", port, rendezvous_timeout_s=3))
    assert time.monotonic() - started < 45  # the timeout, plus starting torch.distributed.run
    assert failed.value.code == "rendezvous_failed"
    message = str(failed.value)
    assert f"node {node_rank} of 2" in message and f"127.0.0.1:{port} within 3 s" in message
    waited = "the other nodes did not all connect" if node_rank == 0 else "it could not reach node 0"
    assert waited in message
    assert (stale / "rank-0.json").exists() == (node_rank == 1)  # only the launcher clears .ranks


def test_an_impossible_placement_is_refused_before_anything_starts(tmp_path):
    config = load_config(settings(tmp_path / "out", nproc=2))
    with pytest.raises(LaunchError) as wrong:
        launch(config, nodes=Nodes(2, 0, 2, "127.0.0.1", 29500))
    assert wrong.value.code == "invalid_placement" and wrong.value.field == "nproc"
    assert "2 node(s) x 2 rank(s) is 4 ranks, but nproc=2" in str(wrong.value)
    assert not config.output_dir.exists()
    for bad, field in [(dict(count=0, rank=0), "count"), (dict(count=2, rank=2), "rank"),
                       (dict(per_node=0), "per_node"), (dict(master_port=0), "master_port"),
                       (dict(master_addr=""), "master_addr"), (dict(rendezvous_timeout_s=0), "rendezvous_timeout_s")]:
        values = {"count": 2, "rank": 1, "per_node": 1, "master_addr": "10.0.0.1", "master_port": 29500, **bad}
        with pytest.raises(LaunchError) as refused:
            Nodes(**values)
        assert refused.value.code == "invalid_placement" and refused.value.field == field, bad


def test_the_command_lines(tmp_path):
    config = load_config(settings(tmp_path / "out", nproc=4))
    path = tmp_path / "c.json"
    # one node: exactly the standalone launch of before
    assert _command(config, path, False, None) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        "-m", "lomo_core.zero3.launch", str(path)]
    nodes = Nodes(2, 1, 2, "10.0.0.1", 29511, rendezvous_timeout_s=120, run_id="job-7")
    assert _command(config, path, True, nodes) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
        "--nproc_per_node", "2", "--master_addr", "10.0.0.1", "--master_port", "29511", "--rdzv_backend",
        "static", "--rdzv_id", "job-7", "--rdzv_conf", "timeout=120", "-m", "lomo_core.zero3.launch",
        str(path), "--progress"]
