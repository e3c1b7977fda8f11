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
from pathlib import Path
from typing import Any

from lomo_core.errors import classify


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


def _run_ranks(config: Any, sink: PipeSink, evals: list[dict[str, Any]]) -> int:
    """Several ranks (``lomo_core.zero3.launch``): rank 0 writes metrics.jsonl, which is followed here
    and passed on line by line; SIGTERM stops the ranks (torch.distributed.run ends them all)."""
    import threading
    import time

    from lomo_core.zero3.launch import LaunchError, launch

    metrics = config.output_dir / "metrics.jsonl"
    start = metrics.stat().st_size if metrics.is_file() else 0
    finished = threading.Event()

    def follow() -> None:
        position, partial = start, b""
        while True:
            done = finished.is_set()
            if metrics.is_file():
                with metrics.open("rb") as f:
                    f.seek(position)
                    chunk = f.read()
                position += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    sink.emit(record.pop("kind"), int(record.pop("step")), record)
            if done:
                return
            time.sleep(0.2)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        summary = launch(config)
    except LaunchError as error:
        finished.set()
        follower.join()
        sink.emit("error", 0, {"code": error.code, "message": str(error), "field": error.field})
        return 1
    finished.set()
    follower.join()
    _evaluate(evals, summary.get("model_dir"), "fine_tuned", config, sink)
    sink.emit("done", summary["steps"], {
        "model_dir": summary.get("model_dir"), "steps": summary["steps"], "val_loss": summary.get("val_loss"),
        "trained_tokens": summary.get("trained_tokens"), "seconds": summary.get("seconds"),
    })
    return 0


def _evaluate(requests: list[dict[str, Any]], model_dir: Any, model_ref: str, config: Any, sink: PipeSink) -> None:
    """The job's evaluations (``evals.json`` beside its config) on one model folder: a progress event
    per task and an ``eval`` record per metric. A failed evaluation is a warning; training goes on."""
    if not requests or model_dir is None:
        return
    from lomo_core.evals import EvalRequest, evaluate, load_model

    try:
        import torch

        device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(model_dir, device=device)
        batch = [EvalRequest(r["task"], r["file"], r.get("limit"), r.get("num_fewshot") or 0, r.get("fewshot_file"))
                 for r in requests]

        def progress(task: str, index: int, total: int) -> None:
            sink.emit("event", 0, {"message": f"evaluating the {model_ref.replace('_', '-')} model: {task} "
                                              f"({index + 1} of {total})"})

        scores = evaluate(model, tokenizer, batch, model_ref=model_ref, on_task=progress)
    except Exception as error:  # noqa: BLE001 - reported, and the job goes on
        sink.emit("event", 0, {"message": f"evaluation of the {model_ref} model failed: {type(error).__name__}: "
                                          f"{error}", "level": "warning"})
        traceback.print_exc(file=sys.stderr)
        return
    for score in scores:
        sink.emit("eval", 0, score.to_dict())
    del model


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
        evals_path = Path(args.config).with_name("evals.json")
        evals = json.loads(evals_path.read_text()) if evals_path.is_file() else []
        if evals and config.resume_from is None:
            _evaluate(evals, config.model, "base", config, sink)
        if config.nproc > 1:
            code = _run_ranks(config, sink, evals)
            return code
        result = train(config, sinks=[sink])
        _evaluate(evals, result.model_dir, "fine_tuned", config, sink)
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
