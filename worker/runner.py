"""The training process of one job: ``python -m worker.runner CONFIG.json --fd N``.

It runs ``lomo_core.train.train`` (the same loop as the CLI) and reports every record as one JSON line
on file descriptor N; the worker that started it turns those lines into database rows. It never
touches the database itself. The last line says how the run ended: ``done``, ``cancelled`` or
``error`` (with a stable ``code``, a message a person can act on, and the config field concerned).

SIGTERM asks it to stop: it stops after the step in progress (the worker kills it if it does not).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import Any


class Cancelled(Exception):
    pass


class PipeSink:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self.stop_requested = False

    def emit(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self._out.write(json.dumps({"kind": kind, "step": step, "payload": payload}, default=str) + "\n")

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.emit(kind, step, payload)
        if kind == "train" and self.stop_requested:
            raise Cancelled

    def close(self) -> None:  # the loop closes its sinks; the pipe stays open for the final line
        pass


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="JSON file of TrainConfig values")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor to report on")
    args = parser.parse_args(argv)
    sink = PipeSink(args.fd)

    def request_stop(_signum: int, _frame: Any) -> None:
        sink.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from lomo_core.config import load_config
        from lomo_core.train import train

        with open(args.config, encoding="utf-8") as f:
            config = load_config(json.load(f))
        result = train(config, sinks=[sink])
        sink.emit("done", result.steps, {
            "model_dir": str(result.model_dir) if result.model_dir else None, "steps": result.steps,
            "val_loss": result.val_loss, "trained_tokens": result.trained_tokens, "seconds": result.seconds,
        })
        return 0
    except Cancelled:
        sink.emit("cancelled", 0, {})
        return 3
    except BaseException as error:  # every failure is reported, then its traceback goes to the log
        sink.emit("error", 0, classify(error))
        traceback.print_exc(file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
