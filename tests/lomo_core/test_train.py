"""The training loop on the real stories260K model: learning, resume, schedules, sinks, errors, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import INSTRUCT, STORIES, need_shared

from lomo_core.config import ConfigError, TrainConfig, load_config
from lomo_core.data import DataError
from lomo_core.metrics import ListSink
from lomo_core.train import TrainingError, latest_checkpoint, lr_at, setup, train, validation_loss

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def base(tmp_path):
    return dict(model=need_shared(STORIES), data=need_shared(INSTRUCT), output_dir=tmp_path / "out",
                batch_size=8, max_seq_len=96, lr=5e-3, seed=3)


def params_of(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_stories260k_fine_tunes_and_validation_loss_falls(base):
    config = load_config({**base, "max_steps": 25, "validation_split": 0.05, "clip_grad_norm": 1.0,
                          "lr_schedule": "cosine", "warmup_steps": 3})
    before = validation_loss(setup(config))
    sink = ListSink()
    result = train(config, sinks=[sink])
    assert result.steps == 25
    assert result.val_loss < before - 0.1
    train_records = sink.of("train")
    assert len(train_records) == 25
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_records)
    assert train_records[0]["lr"] == pytest.approx(5e-3 / 3)
    memory = sink.of("memory")[0]
    assert memory["source"] == "cpu_tracker" and memory["optimizer_state_bytes"] == 0
    assert memory["peak_bytes"] >= memory["parameters_bytes"] + memory["activations_bytes"]
    # the outputs: a loadable model, metrics, memory report, summary
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert sum(p.numel() for p in reloaded.parameters()) == 260_032
    lines = (config.output_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["kind"] == "train" for x in lines) == 25
    assert json.loads((config.output_dir / "memory.json").read_text())["peak_bytes"] > 0


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo", "adamw"])
def test_resume_from_checkpoint_equals_uninterrupted_run(base, tmp_path, optimizer):
    settings = {**base, "optimizer": optimizer, "max_steps": 6, "lr_schedule": "cosine", "warmup_steps": 2,
                "save_every": 3, "keep_checkpoints": 5, "lr": 1e-2 if optimizer == "adalomo" else 5e-3}
    if optimizer == "adamw":
        settings["lr"] = 1e-3
    straight = train({**settings, "output_dir": tmp_path / "straight"})
    interrupted = train({**settings, "output_dir": tmp_path / "part", "max_steps": 3})
    checkpoint = latest_checkpoint(tmp_path / "part")
    assert checkpoint is not None and checkpoint.name == "step-000003"
    resumed = train({**settings, "output_dir": tmp_path / "part", "resume_from": checkpoint})
    assert resumed.steps == 6 and interrupted.steps == 3
    assert resumed.losses == straight.losses[3:]
    a, b = params_of(straight.model_dir), params_of(resumed.model_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], params_of(STORIES)[k]) for k in a)  # it trained


def test_lr_schedules():
    config = TrainConfig.model_construct(lr=1.0, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(config, s, 6) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    config = TrainConfig.model_construct(lr=1.0, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(config, 0, 10) == pytest.approx(1.0)
    assert lr_at(config, 5, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(config, 10, 10) == pytest.approx(0.1)
    config = TrainConfig.model_construct(lr=0.3, warmup_steps=0, lr_schedule="constant", min_lr_ratio=0.0)
    assert lr_at(config, 7, 10) == 0.3


def test_packing_trains_full_rows(base):
    sink = ListSink()
    train({**base, "packing": True, "max_steps": 2, "max_seq_len": 64}, sinks=[sink])
    assert all(r["tokens"] == 8 * 64 for r in sink.of("train"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: 4 cannot work with lomo"),
        ({"lr": 0}, "lr: Input should be greater than 0"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm: Input should be greater than 0"),
        ({"clip_grad_value": 0}, "clip_grad_value: Input should be greater than 0"),
        ({"optimizer": "adam"}, "optimizer: Input should be 'lomo', 'adalomo', 'sgd' or 'adamw'"),
        ({"model": "/no/such/model"}, "model: folder '/no/such/model' does not exist"),
        ({"dtype": "fp16", "optimizer": "sgd"}, "dtype: fp16 needs loss scaling"),
        ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
        ({"epoch": 3}, "epoch: Extra inputs are not permitted"),
    ],
)
def test_bad_configuration_names_the_field(base, change, message):
    with pytest.raises(ConfigError) as info:
        load_config({**base, **change})
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_malformed_data_line_fails_before_training(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        train({**base, "data": bad, "max_steps": 1})


def test_non_finite_loss_stops_with_an_actionable_error(base):
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf).*lower lr"):
        train({**base, "optimizer": "sgd", "lr": 1e12, "max_steps": 20})


def test_memory_breakdown_lomo_vs_sgd(base):
    reports = {}
    for optimizer in ("lomo", "sgd"):
        sink = ListSink()
        train({**base, "optimizer": optimizer, "max_steps": 1, "output_dir": base["output_dir"] / optimizer,
               "save_final_model": False}, sinks=[sink])
        reports[optimizer] = sink.of("memory")[0]
    model_bytes = reports["sgd"]["parameters_bytes"]
    assert reports["sgd"]["gradients_bytes"] == model_bytes  # every gradient alive at once
    assert reports["lomo"]["gradients_bytes"] == 512 * 64 * 4  # one gradient: the (tied) embedding
    # here activations (logits) dominate and peak before most gradients exist, so the peaks may tie
    assert reports["lomo"]["peak_bytes"] <= reports["sgd"]["peak_bytes"]


def test_cli_trains_and_reports(base, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(base["model"]), "--data", str(base["data"]),
           "-o", str(out), "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "64", "--optimizer", "adalomo",
           "--validation-split", "0.02", "--loss-chunk-size", "64"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps" in done.stdout and "validation loss" in done.stdout
    assert (out / "model" / "model.safetensors").is_file() and (out / "memory.json").is_file()


def test_cli_rejects_bad_options_with_field_names(base, tmp_path):
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", "/no/model", "--data", str(base["data"]),
           "-o", str(tmp_path / "x"), "--lr", "-1", "--optimizer", "lomo"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "model: folder '/no/model' does not exist" in done.stderr
    assert "lr: Input should be greater than 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_prints_messages_with_brackets_as_they_are(base, tmp_path):
    data = tmp_path / "p[" / "x].jsonl"  # the path holds "[/x]", a closing tag to rich unless escaped
    data.parent.mkdir()
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": [1]}\n')
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(base["model"]), "--data", str(data),
           "-o", str(tmp_path / "x"), "--max-steps", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "p[/x].jsonl:2" in "".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_gradient_checkpointing_gives_the_same_run(base, tmp_path):
    settings = {**base, "max_steps": 3, "clip_grad_norm": 1.0, "save_final_model": False}
    plain = train({**settings, "output_dir": tmp_path / "a"})
    checkpointed = train({**settings, "output_dir": tmp_path / "b", "gradient_checkpointing": True})
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    run = setup(load_config({**settings, "output_dir": tmp_path / "c", "gradient_checkpointing": True}))
    assert run.model.is_gradient_checkpointing


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_runs(base, dtype):
    sink = ListSink()
    result = train({**base, "dtype": dtype, "max_steps": 3, "save_final_model": False}, sinks=[sink])
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    records = sink.of("train")
    if dtype == "bf16":
        assert [r["loss_scale"] for r in records] == [1.0] * 3 and not any(r["skipped"] for r in records)
        return
    scale = 65536.0  # fp16: each overflowed (skipped) step halves the scale, a clean one keeps it
    for r in records:
        scale = scale / 2 if r["skipped"] else scale
        assert r["loss_scale"] == scale
    assert not records[-1]["skipped"]


def test_chunked_loss_gives_the_same_run_with_a_lower_peak(base, tmp_path):
    settings = {**base, "max_steps": 3, "save_final_model": False, "validation_split": 0.02}
    runs = {}
    for chunk in (None, 64):
        sink = ListSink()
        result = train({**settings, "output_dir": tmp_path / str(chunk), "loss_chunk_size": chunk}, sinks=[sink])
        runs[chunk] = (result, sink.of("memory")[0]["peak_bytes"], sink.of("event"))
    (plain, plain_peak, _), (chunked, chunked_peak, events) = runs[None], runs[64]
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-4)
    assert chunked.val_loss == pytest.approx(plain.val_loss, rel=1e-4)
    assert chunked_peak < plain_peak
    assert events == []  # stories260K's logits are a plain projection: the chunked loss was used


def test_cli_reports_an_unexpected_failure_without_a_traceback(base, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": -5}')
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(broken), "--data", str(base["data"]),
           "-o", str(tmp_path / "x"), "--max-steps", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error:" in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_callback_sees_the_saved_model_and_leaves_training_unchanged(base, tmp_path, monkeypatch):
    """With dropout on, training depends on the RNG and on the training mode: a callback that draws random
    numbers and switches the model to eval mode must leave the run exactly as it was without it."""
    import random
    import shutil

    folder = tmp_path / "dropout-model"
    shutil.copytree(need_shared(STORIES), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    settings = {**base, "model": folder, "max_steps": 4, "save_every": 2}
    plain = train({**settings, "output_dir": tmp_path / "plain"})
    calls = []

    def callback(model, tokenizer, step):
        assert not torch.is_grad_enabled()
        calls.append((step, model.training, tokenizer is not None))
        torch.rand(1000), random.random()
        model.eval()

    watched = train({**settings, "output_dir": tmp_path / "watched"}, on_checkpoint=callback)
    assert calls == [(2, True, True), (4, True, True)]
    assert watched.losses == plain.losses
    for name, value in params_of(plain.model_dir).items():
        assert torch.equal(value, params_of(watched.model_dir)[name]), name
    # and the dropout really draws from the RNG: a callback that does not restore it changes the run
    monkeypatch.setattr("lomo_core.train._set_rng_state", lambda rng: None)
    changed = train({**settings, "output_dir": tmp_path / "changed"}, on_checkpoint=callback)
    assert changed.losses[:2] == plain.losses[:2] and changed.losses[2:] != plain.losses[2:]


def test_epoch_end_checkpoints_resume_like_an_uninterrupted_run(base, tmp_path):
    """save_every_epoch: a checkpoint after each epoch but the last, at the start of the next epoch."""
    data = tmp_path / "twelve.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about {n}.", "response": f"{n} is a number."}) + "\n"
                            for n in range(12)))
    settings = {**base, "data": data, "batch_size": 4, "epochs": 3, "save_every_epoch": True, "keep_checkpoints": 5}
    sink = ListSink()
    straight = train({**settings, "output_dir": tmp_path / "straight"}, sinks=[sink])
    assert [r["step"] for r in sink.of("checkpoint")] == [3, 6]  # 3 steps an epoch; the final model is the last
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["step-000003",
                                                                                          "step-000006"]
    resumed = train({**settings, "output_dir": tmp_path / "straight-copy",
                     "resume_from": tmp_path / "straight" / "checkpoints" / "step-000006"})
    assert resumed.losses == straight.losses[6:]
    a, b = params_of(straight.model_dir), params_of(resumed.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with_steps = train({**settings, "output_dir": tmp_path / "steps", "save_every": 5}, sinks=[steps := ListSink()])
    assert [r["step"] for r in steps.of("checkpoint")] == [5] and with_steps.steps == 9  # save_every wins


def test_save_every_minutes_checkpoints_by_wall_time(base, tmp_path):
    sink = ListSink()
    train({**base, "max_steps": 3, "save_every_minutes": 1e-9, "keep_checkpoints": 5}, sinks=[sink])
    assert [r["step"] for r in sink.of("checkpoint")] == [1, 2, 3]  # each step took longer than the interval
    hourly = ListSink()
    train({**base, "output_dir": tmp_path / "hourly", "max_steps": 3, "save_every_minutes": 60}, sinks=[hourly])
    assert hourly.of("checkpoint") == []
