"""The training process's failure report: a stable code, a message to act on, and the field concerned."""

from __future__ import annotations

import pytest
import torch

from lomo_core.config import ConfigError
from lomo_core.data import DataError
from lomo_core.errors import classify
from lomo_core.train import TrainingError


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
