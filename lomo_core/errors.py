"""A failed run, described for people and programs: a stable code, a message, and the field concerned."""

from __future__ import annotations

from typing import Any

OOM_ADVICE = ("lower batch_size or max_seq_len, turn on gradient_checkpointing, or set loss_chunk_size "
              "(the logits of a large vocabulary are often the peak)")


def classify(error: BaseException) -> dict[str, Any]:
    """A stable code, a message, and the config field concerned (if any) for a failed run."""
    from lomo_core.config import ConfigError
    from lomo_core.data import DataError
    from lomo_core.train import TrainingError

    if isinstance(error, ConfigError):
        field, _, message = error.problems[0].partition(": ")
        code = {"model": "model_not_found", "data": "training_file_not_found",
                "validation_data": "validation_file_not_found"}.get(field, "invalid_hyperparameters")
        return {"code": code, "message": "; ".join(error.problems), "field": field}
    if isinstance(error, DataError):
        return {"code": "invalid_training_file", "message": str(error), "field": "data"}
    if isinstance(error, TrainingError):
        field = "model" if error.code == "invalid_model" else None
        return {"code": error.code, "message": str(error), "field": field}
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        device = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {"code": "out_of_memory", "message": f"out of {device} memory: {first}; {OOM_ADVICE}", "field": None}
    return {"code": "internal_error", "message": f"{type(error).__name__}: {error}", "field": None}
