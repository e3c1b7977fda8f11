"""The training process of one job: ``python -m worker.runner CONFIG.json --fd N``.

It runs ``lomo_core.train.train`` (the same loop as the CLI) and reports every record as one JSON line
on file descriptor N; the worker that started it turns those lines into database rows. It never
touches the database itself. The last line says how the run ended: ``done``, ``cancelled``,
``paused`` or ``error`` (with a stable ``code``, a message a person can act on, and the config field concerned),
or ``joined`` for the part of a job spread over several nodes that another node launched (``--nodes``).

SIGTERM asks it to stop: it stops after the step in progress (the worker kills it if it does not).
SIGUSR1 asks it to pause: after the step in progress it saves a checkpoint and ends with ``paused``.
With ``--attempt N`` it stops at once (its process group killed) when the job's folder names a later
attempt in ``.attempt``: the job was recovered elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from jobs import logs
from lomo_core.errors import classify

#: the training process's own lines (its job's train.log; JSON with the job's id when LOMO_LOG_FORMAT=json)
log = logging.getLogger("lomo.train")


class Cancelled(Exception):
    pass


class PipeSink:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self.stop_requested = False
        self.pause_requested = False

    def emit(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        try:
            self._out.write(json.dumps({"kind": kind, "step": step, "payload": payload}, default=str) + "\n")
        except OSError:  # the pipe broke: no worker reads our records any more; stop everything (ranks too)
            log.error("the worker's end of the report pipe is gone: stopping")
            os.killpg(os.getpgrp(), signal.SIGKILL)

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.emit(kind, step, payload)
        if kind == "train" and self.stop_requested:
            raise Cancelled

    def close(self) -> None:  # the loop closes its sinks; the pipe stays open for the final line
        pass


def _run_ranks(config: Any, sink: PipeSink, evals: list[dict[str, Any]], nodes: Any = None) -> int:
    """Several ranks (``lomo_core.zero3.launch``): rank 0 writes metrics.jsonl, which is followed here
    and passed on line by line; SIGTERM stops the ranks (torch.distributed.run ends them all). A pause
    (SIGUSR1) is passed on as the launcher's pause file: the ranks checkpoint together and stop.

    With ``nodes`` (a job spread over several nodes), this node's ranks: on node 0 as above; on a joining
    node nothing is followed (rank 0's records are the launcher's to report) and no pause file is kept
    (the ranks of every node vote on node 0's), and the run ends with a ``joined`` line."""
    import threading
    import time

    from lomo_core.zero3.launch import LaunchError, launch

    if nodes is not None and not nodes.launcher:
        try:
            summary = launch(config, nodes=nodes)
        except LaunchError as error:
            sink.emit("error", 0, {"code": error.code, "message": str(error), "field": error.field})
            return 1
        sink.emit("joined", summary.get("paused") or 0, summary)
        return 0

    metrics = config.output_dir / "metrics.jsonl"
    start = metrics.stat().st_size if metrics.is_file() else 0
    finished = threading.Event()
    pause_file = config.output_dir / ".pause-requested"
    pause_file.unlink(missing_ok=True)  # an earlier attempt's

    def follow() -> None:
        position, partial = start, b""
        while True:
            done = finished.is_set()
            if sink.pause_requested and not pause_file.exists():
                pause_file.touch()
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
        summary = launch(config, pause_file=pause_file, nodes=nodes)
    except LaunchError as error:
        finished.set()
        follower.join()
        pause_file.unlink(missing_ok=True)
        sink.emit("error", 0, {"code": error.code, "message": str(error), "field": error.field})
        return 1
    finished.set()
    follower.join()
    pause_file.unlink(missing_ok=True)
    if summary.get("paused") is not None:
        sink.emit("paused", summary["paused"], {"step": summary["paused"]})
        return 0
    _evaluate(evals, summary.get("model_dir"), "fine_tuned", config, sink)
    sink.emit("done", summary["steps"], {
        "model_dir": summary.get("model_dir"), "steps": summary["steps"], "val_loss": summary.get("val_loss"),
        "trained_tokens": summary.get("trained_tokens"), "seconds": summary.get("seconds"),
    })
    return 0


def _score(requests: list[dict[str, Any]], model_dir: str, model_ref: str, device: str, dtype: str,
           emit: Any, should_stop: Any = lambda: False) -> None:
    """Score ``model_dir`` on ``requests``; ``emit(kind, payload)`` gets a progress event per task and an
    ``eval`` record per metric. The model is loaded in the job's dtype and freed at the end."""
    import gc

    import torch

    from lomo_core.evals import load_model

    gc.collect()  # the training's model and optimizer hold each other (the hooks): free them before loading
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    model, tokenizer = load_model(model_dir, device=device, dtype=torch_dtype)
    try:
        _score_model(model, tokenizer, requests, model_ref, emit, should_stop)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _score_model(model: Any, tokenizer: Any, requests: list[dict[str, Any]], model_ref: str, emit: Any,
                 should_stop: Any = lambda: False) -> None:
    """Score a model in memory; a cancellation (``should_stop``) is honoured before each task."""
    from lomo_core.evals import EvalRequest, evaluate

    batch = [EvalRequest(r["task"], r["file"], r.get("limit"), r.get("num_fewshot") or 0, r.get("fewshot_file"))
             for r in requests]

    def progress(task: str, index: int, total: int) -> None:
        if should_stop():
            raise Cancelled
        emit("event", {"message": f"evaluating the {model_ref.replace('_', '-')} model: {task} "
                                  f"({index + 1} of {total})"})

    for score in evaluate(model, tokenizer, batch, model_ref=model_ref, on_task=progress):
        emit("eval", score.to_dict())


def _checkpoint_scorer(requests: list[dict[str, Any]], sink: PipeSink) -> Any:
    """The training loop's ``on_checkpoint``: the evaluations marked ``at_checkpoints`` on the in-memory
    model (no second copy of the weights), as ``checkpoint-<step>``. A failure is a warning."""
    chosen = [r for r in requests if r.get("at_checkpoints")]
    if not chosen:
        return None

    def score(model: Any, tokenizer: Any, step: int) -> None:
        try:
            _score_model(model, tokenizer, chosen, f"checkpoint-{step}",
                         lambda kind, payload: sink.emit(kind, step, payload), lambda: sink.stop_requested)
        except Cancelled:
            return  # the training loop stops at its next step
        except Exception as error:  # reported, and training goes on
            sink.emit("event", step, {"message": f"evaluation at checkpoint {step} failed: {type(error).__name__}: "
                                                 f"{error}", "level": "warning"})
            log.exception("evaluation at checkpoint %d failed", step)

    return score


def _score_in_child(requests: list[dict[str, Any]], model_dir: str, model_ref: str, device: str, dtype: str,
                    connection: Any) -> None:
    """:func:`_score` in a spawned process: its records go back through ``connection``."""
    logs.configure()
    try:
        _score(requests, model_dir, model_ref, device, dtype, lambda kind, payload: connection.send((kind, payload)))
        connection.send(("ok", {}))
    except BaseException as error:  # reported to the parent, which turns it into a warning
        connection.send(("failed", {"message": f"{type(error).__name__}: {error}"}))
        log.exception("scoring the %s model failed", model_ref)
    finally:
        connection.close()


def _evaluate(requests: list[dict[str, Any]], model_dir: Any, model_ref: str, config: Any, sink: PipeSink) -> None:
    """The job's evaluations (``evals.json`` beside its config) on one model folder. A failed evaluation is
    a warning event; the job goes on.

    With several ranks the scoring runs in a spawned process, so that this process (the ranks' parent)
    never keeps a CUDA context or cached memory on a GPU the ranks train on."""
    if not requests or model_dir is None:
        return
    import torch

    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    args = (requests, str(model_dir), model_ref, device, config.dtype)
    failure = None
    if config.nproc > 1:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_score_in_child, args=(*args, sender), daemon=True)
        child.start()
        sender.close()
        failure = "the evaluation process ended without a result"
        while True:
            if sink.stop_requested:
                child.terminate()
                break
            if not receiver.poll(0.5) and child.is_alive():
                continue
            try:
                kind, payload = receiver.recv()
            except EOFError:
                break
            if kind in ("eval", "event"):
                sink.emit(kind, 0, payload)
            else:
                failure = payload.get("message") if kind == "failed" else None
        child.join()
    else:
        try:
            _score(*args, lambda kind, payload: sink.emit(kind, 0, payload), lambda: sink.stop_requested)
        except Cancelled:
            raise
        except Exception as error:  # reported, and the job goes on
            failure = f"{type(error).__name__}: {error}"
            log.exception("evaluation of the %s model failed", model_ref)
    if sink.stop_requested:  # cancelled while scoring: stop here, before (or instead of) what comes next
        raise Cancelled
    if failure:
        sink.emit("event", 0, {"message": f"evaluation of the {model_ref.replace('_', '-')} model failed: {failure}",
                               "level": "warning"})


def _watch_the_fence(attempt_file: Path, attempt: int, interval_s: float = 0.5) -> None:
    """Kill this process group (the ranks too) as soon as the job's folder names a later attempt than
    ``attempt``: the job was recovered elsewhere, and this attempt must write nothing more (its database
    writes are fenced by the worker; this stops its writes to the folder: checkpoints, the model)."""
    import threading
    import time

    def watch() -> None:
        while True:
            try:
                owner = int(attempt_file.read_text().strip() or attempt)
            except (OSError, ValueError):
                owner = attempt
            if owner > attempt:
                log.error("attempt %d stops: attempt %d of this job runs elsewhere", attempt, owner)
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="lomo-fence", daemon=True).start()


def _term_when_parent_dies() -> None:
    """SIGTERM to this process when its parent (the worker) dies, however it dies (Linux' PR_SET_PDEATHSIG)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="JSON file of TrainConfig values")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor to report on")
    parser.add_argument("--parent", type=int, help="pid of the worker: when it is gone, everything stops at once")
    parser.add_argument("--attempt", type=int, help="the job's attempt: it stops when the job's folder names "
                                                    "a later one (in .attempt)")
    parser.add_argument("--nodes", help="JSON of lomo_core.zero3.launch.Nodes: this node's part of a job spread "
                                        "over several nodes")
    args = parser.parse_args(argv)
    logs.configure()  # JSON lines with the job's id (LOMO_JOB_ID) when LOMO_LOG_FORMAT=json
    logs.wrap_standard_streams()  # and so is anything else the training code prints
    sink = PipeSink(args.fd)

    def orphaned() -> bool:
        return args.parent is not None and os.getppid() != args.parent

    def request_stop(_signum: int, _frame: Any) -> None:
        if orphaned():  # the worker died (parent-death signal): no one reads our records; stop all ranks now
            os.killpg(os.getpgrp(), signal.SIGKILL)
        sink.stop_requested = True

    def request_pause(_signum: int, _frame: Any) -> None:
        sink.pause_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_pause)  # checkpoint at the next step, then stop (``paused``)
    _term_when_parent_dies()
    if orphaned():  # the worker died before the parent-death signal was asked for
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if args.attempt is not None:
        _watch_the_fence(Path(args.config).with_name(".attempt"), args.attempt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from lomo_core.config import load_config
        from lomo_core.train import Paused, train
        from lomo_core.zero3.launch import Nodes

        with open(args.config, encoding="utf-8") as f:
            config = load_config(json.load(f))
        nodes = Nodes(**json.loads(args.nodes)) if args.nodes else None
        log.info("training starts: %s on %d rank(s)%s, attempt %s", config.optimizer, config.nproc,
                 f" (node {nodes.rank} of {nodes.count})" if nodes else "", args.attempt)
        evals_path = Path(args.config).with_name("evals.json")
        evals = json.loads(evals_path.read_text()) if evals_path.is_file() and not (nodes and nodes.rank) else []
        if evals and config.resume_from is None:
            _evaluate(evals, config.model, "base", config, sink)
        if config.nproc > 1 or nodes is not None:
            return _run_ranks(config, sink, evals, nodes)
        try:
            result = train(config, sinks=[sink], on_checkpoint=_checkpoint_scorer(evals, sink),
                           should_pause=lambda: sink.pause_requested)
        except Paused as paused:
            sink.emit("paused", paused.step, {"step": paused.step})
            return 0
        _evaluate(evals, result.model_dir, "fine_tuned", config, sink)
        log.info("training done: %d steps, %d tokens in %.1f s", result.steps, result.trained_tokens, result.seconds)
        sink.emit("done", result.steps, {
            "model_dir": str(result.model_dir) if result.model_dir else None, "steps": result.steps,
            "val_loss": result.val_loss, "trained_tokens": result.trained_tokens, "seconds": result.seconds,
        })
        return 0
    except Cancelled:
        sink.emit("cancelled", 0, {})
        return 3
    except BaseException as error:  # every failure is reported, then its traceback goes to the log
        failure = classify(error)
        sink.emit("error", 0, failure)
        log.exception("the run failed (%s)", failure["code"])
        return 1


if __name__ == "__main__":
    sys.exit(main())
