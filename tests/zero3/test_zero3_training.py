"""`lomo train --nproc 2` on real CPU ranks: it equals one process, its gathered save reloads to the same
validation loss, a partitioned checkpoint resumes exactly, and a dying rank fails the launch fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import INSTRUCT, STORIES, need_shared

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max-seq-len", "96", "--batch-size", "5", "--lr", "5e-3", "--validation-split", "0.01",
          "--clip-grad-norm", "1.0", "--device", "cpu"]


def lomo_train(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(need_shared(STORIES)),
           "--data", str(need_shared(INSTRUCT)), "-o", str(out), *COMMON, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3-train")
    done = {}
    for name, args in {
        "two_ranks": ["--nproc", "2", "--max-steps", "6", "--save-every", "3"],
        "one_process": ["--max-steps", "6"],
        "two_ranks_chunked_loss": ["--nproc", "2", "--max-steps", "6", "--loss-chunk-size", "50"],
        "first_half": ["--nproc", "2", "--max-steps", "3", "--save-every", "3"],
    }.items():
        result = lomo_train(root / name, *args)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        done[name] = root / name
    return done


def test_two_ranks_train_like_one_process(runs):
    two, one = weights(runs["two_ranks"] / "model"), weights(runs["one_process"] / "model")
    assert set(two) == set(one)
    base = weights(need_shared(STORIES))
    for name in one:
        assert (one[name] - base[name]).abs().max() > 0  # trained
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name  # float32 rounding only
    losses = [json.loads(line) for line in (runs["two_ranks"] / "metrics.jsonl").read_text().splitlines()]
    losses_one = [json.loads(line) for line in (runs["one_process"] / "metrics.jsonl").read_text().splitlines()]
    train_two = [r["loss"] for r in losses if r["kind"] == "train"]
    train_one = [r["loss"] for r in losses_one if r["kind"] == "train"]
    assert train_two == pytest.approx(train_one, rel=1e-5)  # the reported loss is the whole batch's


def test_the_chunked_loss_on_two_ranks_trains_like_one_process(runs):
    """The chunked loss gathers the partitioned output layer itself; the result is the same training."""
    two, one = weights(runs["two_ranks_chunked_loss"] / "model"), weights(runs["one_process"] / "model")
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name
    records = [json.loads(line) for line in (runs["two_ranks_chunked_loss"] / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_chunk_size ignored" in json.dumps(r) for r in records)
    train_one = [json.loads(line)["loss"] for line in (runs["one_process"] / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
    assert [r["loss"] for r in records if r["kind"] == "train"] == pytest.approx(train_one, rel=1e-5)


def test_every_rank_reports_its_memory_and_traffic(runs):
    records = [json.loads(line) for line in (runs["two_ranks"] / "metrics.jsonl").read_text().splitlines()]
    memory = [r for r in records if r["kind"] == "memory"]
    assert sorted(r["rank"] for r in memory if r["step"] == 1) == [0, 1]
    one = next(r for r in (json.loads(line) for line in (runs["one_process"] / "metrics.jsonl").read_text()
                           .splitlines()) if r["kind"] == "memory")
    for report in memory:
        # each rank holds about half of the parameters
        assert report["parameters_bytes"] == pytest.approx(one["parameters_bytes"] / 2, rel=0.01)
        assert report["bytes_sent_per_step"] > 0


def test_the_gathered_save_reloads_to_the_same_validation_loss(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_core.config import TrainConfig
    from lomo_core.train import setup, validation_loss

    out = runs["two_ranks"]
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "launch-config.json").read_text())
    # the same validation rows, evaluated in one process on the reloaded folder
    config.update(model=str(out / "model"), nproc=1, output_dir=str(out / "reload"), resume_from=None)
    run = setup(TrainConfig(**config))
    reloaded = validation_loss(run)
    assert reloaded == pytest.approx(summary["val_loss"], rel=1e-6, abs=1e-7)
    assert AutoTokenizer.from_pretrained(out / "model") is not None
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.vocab_size == 512


def test_resume_from_a_partitioned_checkpoint_equals_an_uninterrupted_run(runs, tmp_path):
    checkpoint = runs["first_half"] / "checkpoints" / "step-000003"
    assert sorted(p.name for p in checkpoint.glob("zero3-rank-*.pt")) == ["zero3-rank-00000.pt",
                                                                          "zero3-rank-00001.pt"]
    resumed = lomo_train(tmp_path / "resumed", "--nproc", "2", "--max-steps", "6", "--resume-from", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = weights(tmp_path / "resumed" / "model"), weights(runs["two_ranks"] / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    wrong = lomo_train(tmp_path / "wrong", "--max-steps", "6", "--resume-from", str(checkpoint))
    assert wrong.returncode == 1 and "resume it with nproc=2" in wrong.stderr


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _ranks_of(launcher_pid: int) -> dict[int, int]:
    """pid of each rank started by this launcher (its grandchildren, under torch.distributed.run)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"lomo_core.zero3.launch" not in cmdline or _parent(_parent(int(entry.name))) != launcher_pid:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def test_a_rank_that_dies_fails_the_launch_fast(tmp_path):
    out = tmp_path / "dies"
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(need_shared(STORIES)), "--data",
           str(need_shared(INSTRUCT)), "-o", str(out), *COMMON, "--nproc", "2", "--max-steps", "100000"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training runs
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            break
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    ranks = _ranks_of(launcher.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert time.monotonic() - killed_at < 60  # no rank waits for the dead one
    assert "rank 1 was killed by signal 9" in " ".join(stderr.split())


def test_two_nodes_started_by_hand_train_like_one_process(runs, tmp_path):
    """`lomo train --nnodes 2 --node-rank R` on each "node" (two processes here, one rank each, gloo on
    127.0.0.1), the output folder shared: the weights of one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(need_shared(STORIES)), "--data",
           str(need_shared(INSTRUCT)), "-o", str(out), *COMMON, "--nproc", "2", "--max-steps", "6", "--nnodes", "2",
           "--master-addr", "127.0.0.1", "--master-port", port, "--rendezvous-timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*cmd, "--node-rank", str(rank)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    answers = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [a[1][-3000:] for a in answers]
    assert "trained 6 steps on 2 ranks" in answers[0][0] and "node 1 of 2" in answers[1][0]
    two, one = weights(out / "model"), weights(runs["one_process"] / "model")
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("args, says", [
    (["--nproc", "3", "--nnodes", "2"], "nnodes: 3 ranks (--nproc) cannot be spread evenly over 2 nodes"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2"], "node-rank: 2 is not one of the 2 node(s)"),
])
def test_a_placement_that_cannot_be_is_refused_with_the_option_named(tmp_path, args, says):
    result = lomo_train(tmp_path / "bad", *args, "--max-steps", "1")
    assert result.returncode == 2 and says in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
