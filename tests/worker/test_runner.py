"""The training process: its failure report (a stable code, a message to act on, the field concerned), and
its fence on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lomo_core.config import ConfigError
from lomo_core.data import DataError
from lomo_core.errors import classify
from lomo_core.train import TrainingError
from tests.conftest import INSTRUCT, STORIES, need_shared


@pytest.mark.parametrize("error, code, field, needle", [
    (ConfigError(["model: folder '/m' does not exist"]), "model_not_found", "model", "/m"),
    (ConfigError(["data: file '/d.jsonl' does not exist"]), "training_file_not_found", "data", "/d.jsonl"),
    (ConfigError(["lr: Input should be greater than 0"]), "invalid_hyperparameters", "lr", "greater than 0"),
    (DataError("/d.jsonl:3: field 'response' is empty"), "invalid_training_file", "data", ":3:"),
    (TrainingError("the loss became nan at step 4: lower lr", code="nan_loss"), "nan_loss", None, "lower lr"),
    (TrainingError("cannot load a causal LM from /m: bad", code="invalid_model"), "invalid_model", "model", "/m"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory", None, "2.00 GiB"),
    (MemoryError(), "out_of_memory", None, "host memory"),
    (KeyError("surprise"), "internal_error", None, "KeyError"),
])
def test_failures_are_classified(error, code, field, needle):
    report = classify(error)
    assert report["code"] == code and report["field"] == field
    assert needle in report["message"]
    if code == "out_of_memory":
        assert "gradient_checkpointing" in report["message"]  # says what to change


def training_process(tmp_path, *args: str):
    """A real training process (``worker.runner``) of a long stories260K job in a session of its own, once
    it has reported its first step; (the process, the read end of its report pipe)."""
    config = tmp_path / "job-config.json"
    config.write_text(json.dumps({"model": str(need_shared(STORIES)), "data": str(need_shared(INSTRUCT)),
                                  "output_dir": str(tmp_path), "max_steps": 100000, "batch_size": 4,
                                  "max_seq_len": 64, "save_every": 1000, "device": "cpu"}))
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "worker.runner", str(config), "--fd", str(write_fd), *args],
                             pass_fds=(write_fd,), stderr=subprocess.PIPE, start_new_session=True)
    os.close(write_fd)
    reports = os.fdopen(read_fd, "rb")
    while b'"kind": "train"' not in reports.readline():  # it trains
        assert child.poll() is None, child.stderr.read().decode()
    return child, reports


def test_a_training_process_stops_when_its_job_folder_names_another_attempt(tmp_path):
    """Fencing on disk: a training process whose job was recovered elsewhere (its worker frozen or cut off)
    kills its process group at once instead of writing more checkpoints into the job's folder."""
    (tmp_path / ".attempt").write_text("1")
    child, reports = training_process(tmp_path, "--attempt", "1")
    try:
        (tmp_path / ".attempt").write_text("2")  # recovered elsewhere: attempt 2 owns the folder now
        moment = time.monotonic()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert time.monotonic() - moment < 3
        assert "attempt 1 stops: attempt 2 of this job runs elsewhere" in child.stderr.read().decode()
        assert not (tmp_path / "checkpoints").exists()
    finally:
        reports.close()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


def test_a_training_process_whose_report_pipe_breaks_stops(tmp_path):
    """Nobody reads its records any more (the worker's end of the pipe is closed): it stops, ranks and all,
    rather than train on unobserved."""
    child, reports = training_process(tmp_path)
    try:
        reports.close()
        assert child.wait(timeout=20) == -signal.SIGKILL
        assert "the worker's end of the report pipe is gone" in child.stderr.read().decode()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
