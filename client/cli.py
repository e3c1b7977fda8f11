"""`lomo`: the command line.

`lomo train` runs a local training job with a progress bar; `lomo serve` starts the REST API (and, on
the zero-configuration default, one worker beside it); `lomo worker` starts a worker on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Full-parameter fine-tuning with LOMO.")
err = Console(stderr=True)
out = Console()


def _fail(lines: list[str], code: int = 2) -> None:
    from rich.markup import escape  # messages quote paths and errors: "[...]" is text, not markup

    err.print("[bold red]error:[/] " + escape(lines[0]))
    for line in lines[1:]:
        err.print("  " + escape(line))
    raise typer.Exit(code)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        _fail([f"--config: file {str(path)!r} does not exist"])
    except json.JSONDecodeError as e:
        _fail([f"--config: {path}:{e.lineno}: invalid JSON: {e.msg}"])
    if not isinstance(values, dict):
        _fail([f"--config: {path} must hold a JSON object of training settings"])
    return values


@app.command()
def train(
    model: Path | None = typer.Option(None, help="Hugging Face model folder"),
    data: Path | None = typer.Option(None, help="training data (.jsonl, .json or .txt)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="output folder"),
    optimizer: str | None = typer.Option(None, help="lomo | adalomo | sgd | adamw"),
    lr: float | None = typer.Option(None, help="learning rate"),
    epochs: int | None = typer.Option(None),
    max_steps: int | None = typer.Option(None),
    batch_size: int | None = typer.Option(None),
    max_seq_len: int | None = typer.Option(None),
    packing: bool | None = typer.Option(None, "--packing/--no-packing"),
    lr_schedule: str | None = typer.Option(None, help="constant | linear | cosine"),
    warmup_steps: int | None = typer.Option(None),
    weight_decay: float | None = typer.Option(None),
    clip_grad_norm: float | None = typer.Option(None),
    clip_grad_value: float | None = typer.Option(None),
    gradient_accumulation_steps: int | None = typer.Option(None),
    dtype: str | None = typer.Option(None, help="fp32 | bf16 | fp16"),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    loss_chunk_size: int | None = typer.Option(None, help="loss in chunks of N tokens (no full logits)"),
    validation_data: Path | None = typer.Option(None),
    validation_split: float | None = typer.Option(None),
    eval_every: int | None = typer.Option(None),
    save_every: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    nproc: int | None = typer.Option(None, help="ranks (GPUs, or CPU processes) sharing the model with ZeRO-3"),
    resume_from: Path | None = typer.Option(None, help="checkpoint folder, or 'latest' in the output folder"),
    config: Path | None = typer.Option(None, help="JSON file of settings; options given here override it"),
) -> None:
    """Fine-tune a causal LM on a data file; writes the model, metrics.jsonl and memory.json."""
    from lomo_core.config import ConfigError, load_config
    from lomo_core.data import DataError
    from lomo_core.metrics import ProgressBarSink
    from lomo_core.train import TrainingError, latest_checkpoint
    from lomo_core.train import train as run_training

    values = _read_config_file(config) if config is not None else {}
    given = dict(
        model=model, data=data, output_dir=output, optimizer=optimizer, lr=lr, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, max_seq_len=max_seq_len, packing=packing,
        lr_schedule=lr_schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
        clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
        gradient_accumulation_steps=gradient_accumulation_steps, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, loss_chunk_size=loss_chunk_size,
        validation_data=validation_data,
        validation_split=validation_split, eval_every=eval_every, save_every=save_every, seed=seed,
        device=device, resume_from=resume_from, nproc=nproc,
    )
    values.update({k: v for k, v in given.items() if v is not None})
    if str(values.get("resume_from")) == "latest":
        found = latest_checkpoint(values.get("output_dir", "."))
        if found is None:
            _fail([f"resume_from: no checkpoint under {values.get('output_dir')}/checkpoints"])
        values["resume_from"] = found
    try:
        cfg = load_config(values)
    except ConfigError as e:
        _fail(["invalid training configuration", *e.problems])
    if cfg.nproc > 1:
        from lomo_core.zero3.launch import LaunchError, launch

        try:
            summary = launch(cfg, progress=True)
        except LaunchError as e:
            _fail([f"training stopped: {e}"], code=1)
        out.print(f"trained {summary['steps']} steps on {cfg.nproc} ranks, {summary['trained_tokens']} tokens in "
                  f"{summary['seconds']:.1f}s" + (f", validation loss {summary['val_loss']:.4f}"
                                                  if summary["val_loss"] is not None else ""))
        out.print(f"output: {cfg.output_dir}")
        return
    bar = ProgressBarSink(console=err)
    try:
        result = run_training(cfg, sinks=[bar])
    except (DataError, TrainingError) as e:
        bar.close()
        _fail([str(e)], code=1)
    except Exception as e:  # an unexpected failure: say what it was; the traceback only on request
        bar.close()
        if os.environ.get("LOMO_DEBUG"):
            raise
        _fail([f"training stopped: {type(e).__name__}: {e}",
               f"checkpoints written so far are kept in {cfg.output_dir}/checkpoints; "
               "set LOMO_DEBUG=1 for the traceback"], code=1)
    bar.close()
    out.print(f"trained {result.steps} steps, {result.trained_tokens} tokens in {result.seconds:.1f}s")
    if result.losses:
        out.print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
                  + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
    if result.memory:
        import dataclasses

        from lomo_core.memory import MemoryReport

        fields = {f.name for f in dataclasses.fields(MemoryReport)}
        out.print("memory: " + MemoryReport(**{k: v for k, v in result.memory.items() if k in fields}).summary())
    out.print(f"output: {result.output_dir}")


def _settings():
    """The service settings, or a clear error naming the LOMO_* variable that is wrong."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from jobs.settings import get_settings

    try:
        return get_settings()
    except SettingsError as e:  # a value that is not even parseable (e.g. bad JSON for a list)
        field = str(e).split('"')[1] if '"' in str(e) else "?"
        _fail([f"LOMO_{field.upper()}: cannot read this value ({e.__cause__ or e})",
               "lists are JSON, e.g. LOMO_GPU_MEMORY_GIB='[24, 24]'"])
    except ValidationError as e:
        _fail(["invalid service settings"] + [f"LOMO_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                                             for err in e.errors()])


def _stop_with_parent() -> None:
    """In a child: receive SIGTERM when the parent dies, however it dies (uvicorn re-raises the signal
    that stopped it, so the parent's own clean-up may never run)."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's clean-up has to do
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    worker: bool | None = typer.Option(
        None, "--worker/--no-worker",
        help="start a worker process beside the API (default: only on the embedded broker)"),
) -> None:
    """Start the REST API; with no LOMO_BROKER_URL also one worker, so jobs run with no other setup."""
    import subprocess
    import sys

    import uvicorn

    from api.app import create_app
    from jobs.migrate import upgrade

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if settings.auto_migrate:
            upgrade(settings.resolved_database_url())
    except Exception as e:
        _fail([f"cannot prepare the database {settings.resolved_database_url()}: {type(e).__name__}: {e}",
               "check LOMO_DATABASE_URL (or LOMO_DATA_DIR for the default SQLite file)"], code=1)
    child = None
    if worker if worker is not None else settings.embedded:
        child = subprocess.Popen([sys.executable, "-m", "client.cli", "worker"], preexec_fn=_stop_with_parent)
    where = "embedded SQLite + SQLite broker" if settings.embedded else "configured database + broker"
    err.print(f"API on http://{host}:{port} (docs at /docs), {where}, data in {settings.data_dir.resolve()}"
              + (", one worker beside it" if child else ""))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


@app.command()
def worker(
    concurrency: int | None = typer.Option(
        None, min=1, help="jobs run at once by this worker (default: one per GPU of the node, 1 on a CPU node)"),
    loglevel: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    """Start a Celery worker that runs fine-tuning jobs (reads LOMO_DATABASE_URL / LOMO_BROKER_URL)."""
    settings = _settings()
    from worker.app import celery_app
    from worker.app import settings as node  # with the GPUs found on this node

    slots = concurrency or max(1, len(node.gpu_memory_gib))
    celery_app.worker_main([
        "worker", "--concurrency", str(slots), "--queues", settings.queue, "--loglevel", loglevel,
        "--hostname", f"lomo@{settings.worker_name}", "--without-gossip", "--without-mingle",
    ])


@app.command("eval")
def eval_(
    model: Path = typer.Option(..., help="Hugging Face model folder (config, weights, tokenizer)"),
    task: str = typer.Option(..., help="boolq | cb | copa | rte | wic | wsc | multirc | perplexity | lambada"),
    file: Path = typer.Option(..., help="evaluation file (SuperGLUE jsonl; .txt/.jsonl text; lambada jsonl)"),
    limit: int | None = typer.Option(None, help="score the first N documents only"),
    num_fewshot: int = typer.Option(0, help="labelled examples in front of each prompt (needs --fewshot-file)"),
    fewshot_file: Path | None = typer.Option(None, help="file the few-shot examples are drawn from"),
    batch_size: int = typer.Option(8, help="requests per forward pass"),
    max_length: int | None = typer.Option(None, help="tokens per input (default: the model's context length)"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON"),
) -> None:
    """Evaluate a model folder on one task with lm-evaluation-harness, offline, and print the metrics."""
    from lomo_core.evals import TASKS, EvalInputError, EvalRequest, UnknownTaskError, check_eval_file, check_request

    if not (model / "config.json").is_file():
        _fail([f"--model: {str(model)!r} is not a Hugging Face model folder (no config.json)"])
    try:
        check_eval_file(task, file)
    except UnknownTaskError as e:
        _fail([f"--task: unknown task {e.task!r}", f"known tasks: {', '.join(TASKS)}"])
    except EvalInputError as e:
        _fail([f"--file: {e.problems[0]}", *e.problems[1:]])
    if fewshot_file is not None:
        try:
            check_eval_file(task, fewshot_file)
        except EvalInputError as e:
            _fail([f"--fewshot-file: {e.problems[0]}", *e.problems[1:]])
    request = EvalRequest(task=task, file=file, limit=limit, num_fewshot=num_fewshot, fewshot_file=fewshot_file)
    try:
        check_request(request)
    except EvalInputError as e:  # the options: "limit: ...", "num_fewshot: ...", or too few few-shot examples
        options = {"limit": "--limit", "num_fewshot": "--num-fewshot"}
        name, _, rest = e.problems[0].partition(": ")
        _fail([f"{options[name]}: {rest}" if name in options else f"--fewshot-file: {e.problems[0]}",
               *e.problems[1:]])
    if batch_size < 1:
        _fail([f"--batch-size: expected a positive integer, got {batch_size}"])
    if max_length is not None and max_length < 2:
        _fail([f"--max-length: expected an integer >= 2, got {max_length}"])

    from lomo_core.evals import evaluate, load_model

    try:
        lm, tokenizer = load_model(model)
    except EvalInputError as e:
        _fail([f"--model: {e.problems[0].removeprefix('model: ')}"])
    except Exception as e:  # an unreadable checkpoint: say what it was; the traceback only on request
        if os.environ.get("LOMO_DEBUG"):
            raise
        _fail([f"--model: cannot load {model}: {type(e).__name__}: {e}"], code=1)
    try:
        scores = evaluate(lm, tokenizer, [request], model_ref=str(model), max_length=max_length,
                          batch_size=batch_size)
    except Exception as e:
        if os.environ.get("LOMO_DEBUG"):
            raise
        _fail([f"evaluation stopped: {type(e).__name__}: {e}", "set LOMO_DEBUG=1 for the traceback"], code=1)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in scores], indent=2))
        return
    from rich.table import Table

    table = Table()
    for column in ("task", "metric", "value", "examples", "truncated"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for s in scores:
        value = f"{s.value:.4f}" if abs(s.value) < 1e6 else f"{s.value:.4g}"
        table.add_row(s.task, s.metric, value, str(s.examples), str(s.truncated))
    out.print(table)


@app.command()
def version() -> None:
    """Print the version."""
    from lomo_core import __version__

    out.print(__version__)


if __name__ == "__main__":
    app()
