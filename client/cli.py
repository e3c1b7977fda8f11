"""`lomo`: the command line.

`lomo train` runs a local training job with a progress bar; `lomo serve` starts the REST API (and, on
the zero-configuration default, one worker beside it); `lomo worker` starts a worker on its own;
`lomo eval` scores a model folder. The rest is the service's client, on ``client.rest.LomoClient``:
`lomo files ...`, `lomo submit`, `lomo sweep`, `lomo jobs`, `lomo status`, `lomo events`, `lomo cancel`,
`lomo pause`, `lomo resume`, `lomo estimate`, `lomo evals`, `lomo models ...`, `lomo cluster`; each takes
--url, --api-key (else LOMO_URL / LOMO_API_KEY, else the config file of ``client.config``) and --json.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Annotated, Any

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
    nnodes: int = typer.Option(1, min=1, help="nodes the --nproc ranks span (as many on each); run this command on "
                               "every node, with its --node-rank, the same output folder (shared storage) and "
                               "node 0's --master-addr"),
    node_rank: int = typer.Option(0, min=0, help="this node's rank, 0 to --nnodes - 1 (0: the launcher)"),
    master_addr: str = typer.Option("127.0.0.1", help="the address of node 0 the other nodes reach"),
    master_port: int = typer.Option(29500, min=1, max=65535, help="the port on node 0 the nodes meet at"),
    rendezvous_timeout: int = typer.Option(300, min=1, help="seconds the nodes wait for each other"),
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
    if node_rank >= nnodes:
        _fail([f"node-rank: {node_rank} is not one of the {nnodes} node(s) (0 to {nnodes - 1})"])
    if nnodes > 1 and cfg.nproc % nnodes:
        _fail([f"nnodes: {cfg.nproc} ranks (--nproc) cannot be spread evenly over {nnodes} nodes"])
    if cfg.nproc > 1:
        from lomo_core.zero3.launch import LaunchError, Nodes, launch

        try:
            nodes = Nodes(nnodes, node_rank, cfg.nproc // nnodes, master_addr, master_port,
                          rendezvous_timeout_s=rendezvous_timeout) if nnodes > 1 else None
            summary = launch(cfg, progress=node_rank == 0, nodes=nodes)
        except LaunchError as e:
            _fail([f"training stopped: {e}"], code=1)
        if summary.get("joined"):
            out.print(f"node {node_rank} of {nnodes}: its {cfg.nproc // nnodes} rank(s) trained with node 0's; "
                      f"output: {cfg.output_dir}")
            return
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
    workers: int = typer.Option(1, "--workers", min=1, max=64,
                                help="API processes sharing the port (their request figures are summed in /metrics)"),
) -> None:
    """Start the REST API; with no LOMO_BROKER_URL also one worker, so jobs run with no other setup."""
    import logging
    import os
    import shutil
    import subprocess
    import sys

    import uvicorn

    from api.app import bootstrap_admin_key, create_app
    from jobs import logs
    from jobs.migrate import upgrade

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if settings.auto_migrate:
            upgrade(settings.resolved_database_url())
    except Exception as e:
        _fail([f"cannot prepare the database {settings.resolved_database_url()}: {type(e).__name__}: {e}",
               "check LOMO_DATABASE_URL (or LOMO_DATA_DIR for the default SQLite file)"], code=1)
    if workers > 1:
        # Made here, once, before the processes start: each would otherwise make the first admin key itself.
        bootstrap_admin_key(settings, settings.api_database())
        # Each process counts its requests in files of this folder and /metrics sums them (prometheus-client's
        # multiprocess mode); the folder is emptied at each start, as the library requires.
        figures = settings.data_dir / "prometheus"
        shutil.rmtree(figures, ignore_errors=True)
        figures.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(figures.resolve())
    child = None
    if worker if worker is not None else settings.embedded:
        child = subprocess.Popen([sys.executable, "-m", "client.cli", "worker"], preexec_fn=_stop_with_parent)
    where = "embedded SQLite + SQLite broker" if settings.embedded else "configured database + broker"
    started = (f"API on http://{host}:{port} (docs at /docs), {where}, data in {settings.data_dir.resolve()}"
               + (f", {workers} API processes" if workers > 1 else "") + (", one worker beside it" if child else ""))
    json_logs = logs.configure(settings.log_format)  # JSON lines: one access line per request, with its id
    if json_logs:
        logging.getLogger("lomo.api").info(started)
    else:
        err.print(started)
    # several processes build the app themselves (api.app:create_app, from the same LOMO_* environment)
    app_of = "api.app:create_app" if workers > 1 else create_app(settings)
    logging_options = ({"log_level": "info", "log_config": None, "access_log": False} if json_logs
                       else {"log_level": "warning"})
    try:
        uvicorn.run(app_of, host=host, port=port, factory=workers > 1, workers=workers if workers > 1 else None,
                    **logging_options)
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
        None, min=1, help="jobs run at once by this worker (default: one per GPU of the node; on a CPU node one "
                          "per rank of LOMO_CPU_RANKS, or 1)"),
    loglevel: str = typer.Option("info", help="debug | info | warning | error"),
    webhooks: bool = typer.Option(True, "--webhooks/--no-webhooks",
                                  help="also deliver webhooks (a child process with a few threads, on the "
                                       "webhooks queue)"),
    webhooks_only: bool = typer.Option(False, "--webhooks-only", hidden=True,
                                       help="only deliver webhooks (the child that --webhooks starts)"),
) -> None:
    """Start a Celery worker that runs fine-tuning jobs (reads LOMO_DATABASE_URL / LOMO_BROKER_URL), and
    beside it one that delivers webhooks."""
    import os
    import subprocess
    import sys

    from jobs import logs

    settings = _settings()
    logs.configure(settings.log_format)  # JSON from the first line (warnings at start too); Celery's follow
    quiet = ["--quiet"] if settings.log_format == "json" else []  # JSON lines only: no banner (a global option)
    if webhooks_only:
        os.environ["LOMO_WEBHOOKS_ONLY"] = "1"  # read by worker.app: this worker takes no jobs
        from jobs.queue import webhook_queue
        from worker.app import celery_app

        celery_app.start([
            *quiet, "worker", "--pool", "threads", "--concurrency", "4", "--queues", webhook_queue(settings),
            "--loglevel", loglevel, "--hostname", f"lomo-webhooks@{settings.worker_name}", "--without-gossip",
            "--without-mingle"])
        return
    from worker.app import celery_app
    from worker.app import settings as node  # with the GPUs found on this node

    if webhooks:
        subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--webhooks-only", "--loglevel", loglevel],
                         preexec_fn=_stop_with_parent)
    slots = concurrency or node.rank_slots() or 1  # one per GPU (per CPU rank, with LOMO_CPU_RANKS)
    celery_app.start([
        *quiet, "worker", "--concurrency", str(slots), "--queues", settings.queue, "--loglevel", loglevel,
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


# ------------------------------------------------------------------------------------------------------
# The service's client: files, jobs, sweeps, estimates, evaluations and models, over the REST API
# (client.rest.LomoClient). Exit codes: 0 success, 1 a job that failed or was cancelled (when waited for)
# or a server error, 2 a usage or validation error (a bad option, or the server's 4xx), 3 no service.

POLL_S = 0.5  # how often a followed job is asked for
OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw")
PURPOSES = ("fine-tune", "eval")
#: top-level fields of the job body (everything else a sweep or --set names is a hyperparameter)
TOP_FIELDS = ("model", "training_file", "validation_file", "seed", "suffix", "metadata", "integrations",
              "method", "hyperparameters", "evals", "gpus", "priority")
FILE_FIELDS = ("training_file", "validation_file")

UrlOption = Annotated[str | None, typer.Option(
    "--url", show_default=False, help="the service (else LOMO_URL, the config file, http://127.0.0.1:8000)")]
KeyOption = Annotated[str | None, typer.Option(
    "--api-key", show_default=False, help="sent as 'Authorization: Bearer' (else LOMO_API_KEY, the config file)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout, and nothing else")]
SpecOption = Annotated[Path | None, typer.Option(
    "--spec", show_default=False, help="a YAML or JSON job spec (the request body; files may be local paths, "
                                       "relative to the spec); options given here override it")]
ModelOption = Annotated[str | None, typer.Option("--model", show_default=False, help="a registered model's name")]
TrainingFileOption = Annotated[str | None, typer.Option(
    "--training-file", show_default=False, help="a file id, or a local file (uploaded first)")]
ValidationFileOption = Annotated[str | None, typer.Option(
    "--validation-file", show_default=False, help="a file id, or a local file (uploaded first)")]
SuffixOption = Annotated[str | None, typer.Option("--suffix", show_default=False,
                                                  help="in the model's name ft:<base>:<suffix>:<job id>")]
SeedOption = Annotated[int | None, typer.Option("--seed", show_default=False)]
OptimizerOption = Annotated[str | None, typer.Option("--optimizer", show_default=False,
                                                     help="lomo | adalomo | sgd | adamw")]
EpochsOption = Annotated[str | None, typer.Option("--n-epochs", show_default=False, help="N or auto")]
BatchOption = Annotated[str | None, typer.Option("--batch-size", show_default=False, help="N or auto")]
MultiplierOption = Annotated[str | None, typer.Option(
    "--learning-rate-multiplier", show_default=False, help="X (times the optimizer's base rate) or auto")]
MaxStepsOption = Annotated[int | None, typer.Option("--max-steps", show_default=False)]
GpusOption = Annotated[int | None, typer.Option("--gpus", show_default=False, help="pin the number of GPUs")]
PriorityOption = Annotated[int | None, typer.Option("--priority", show_default=False, help="-100 to 100")]
MetadataOption = Annotated[list[str] | None, typer.Option("--metadata", show_default=False,
                                                          help="key=value (repeatable)")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", show_default=False, help="name=value: any other hyperparameter (repeatable; the value is JSON when "
                                      "it parses, else a string)")]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _api_error_lines(e: Any) -> list[str]:
    """The server's message, then each problem it listed (its field or line) that the message does not repeat."""
    lines = [e.message]
    for detail in e.details:
        if not isinstance(detail, dict) or not detail.get("message"):
            continue
        text = f"{detail['param']}: {detail['message']}" if detail.get("param") else str(detail["message"])
        if text not in lines:
            lines.append(text)
    if e.status in (404, 405) and e.code in ("not_found", "method_not_allowed") and e.request:
        lines.append(f"this server has no {e.request} (it may be older than this client)")
    return lines


@contextlib.contextmanager
def _connect(url: str | None, api_key: str | None):
    """A client of the service named by the option, LOMO_URL or the config file; an error answer ends the
    command with its message (exit 2 for a 4xx, 1 for a 5xx), no answer at all with the URL (exit 3)."""
    from client.config import ConfigFileError, resolve
    from client.rest import ApiError, LomoClient, ServiceUnreachable

    try:
        target = resolve(url, api_key)
    except ConfigFileError as e:
        _fail([str(e)])
    client = LomoClient(target.url, api_key=target.api_key)
    try:
        yield client
    except ServiceUnreachable as e:
        _fail([f"cannot reach the service at {e.url} ({e.reason})",
               f"the URL came from {target.url_source}; start the service with `lomo serve`, or give --url / "
               "LOMO_URL"], code=3)
    except ApiError as e:
        _fail(_api_error_lines(e), code=2 if 400 <= e.status < 500 else 1)
    finally:
        client.close()


def _when(moment: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(moment).strftime("%Y-%m-%d %H:%M") if moment else "-"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    step, total = progress.get("step") or 0, progress.get("total_steps")
    return f"{step}/{total}" if total else f"{step}/?"


def _optimizer(job: dict[str, Any]) -> str:
    method = job.get("method")
    return str((job.get("hyperparameters") or {}).get("optimizer") or (method if isinstance(method, str) else "-"))


STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "paused": "magenta"}


def _status(status: str) -> str:
    from rich.markup import escape

    style = STATUS_STYLE.get(status)
    return f"[{style}]{escape(status)}[/]" if style else escape(status)


def _text(value: Any) -> str:
    from rich.markup import escape

    return "-" if value is None else escape(str(value))


def _table(**options: Any) -> Any:
    """A table with few lines drawn, so that more of the width goes to its values."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True,
                 **options)


def _id_column(table: Any, name: str, ids: list[str]) -> None:
    """A column of ids that is never cut or wrapped (they are copied into the next command)."""
    table.add_column(name, no_wrap=True, min_width=max([len(name), *map(len, ids)]))


def _loss(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, int | float) and abs(value) < 1e6 else str(value)


# ----------------------------------------------------------------------------------------- job specs
def _load_document(path: Path, option: str) -> dict[str, Any]:
    """A YAML (.yaml / .yml) or JSON file holding one object; errors name the option, the file and the line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        _fail([f"{option}: no file {str(path)!r}"])
    except (OSError, UnicodeDecodeError) as e:
        _fail([f"{option}: cannot read {path}: {e}"])
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            _fail([f"{option}: reading YAML needs PyYAML (pip install pyyaml); or write the spec as JSON"])
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            _fail([f"{option}: {path}: {where}invalid YAML: {getattr(e, 'problem', None) or e}"])
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            _fail([f"{option}: {path}: line {e.lineno}: invalid JSON: {e.msg}"])
    if not isinstance(value, dict):
        _fail([f"{option}: {path} must hold an object (key: value pairs), not {type(value).__name__}"])
    return value


def _hyperparameters(body: dict[str, Any], where: str) -> dict[str, Any]:
    """``body["method"]["supervised"]["hyperparameters"]``, created when absent."""
    method = body.get("method")
    if method is None:
        method = body["method"] = {"type": "supervised"}
    if not isinstance(method, dict):
        _fail([f"{where}: method must be an object, {{\"type\": \"supervised\", \"supervised\": {{\"hyperparameters\":"
               f" {{...}}}}}} (the optimizer is hyperparameters.optimizer), got {method!r}"])
    method.setdefault("type", "supervised")
    supervised = method.get("supervised")
    if supervised is None:
        supervised = method["supervised"] = {}
    hyperparameters = supervised.get("hyperparameters") if isinstance(supervised, dict) else None
    if isinstance(supervised, dict) and hyperparameters is None:
        hyperparameters = supervised["hyperparameters"] = {}
    if not isinstance(hyperparameters, dict):
        _fail([f"{where}: method.supervised.hyperparameters must be an object"])
    return hyperparameters


def _normalised(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of a job spec with its hyperparameters in ``method.supervised.hyperparameters`` (a top-level
    ``hyperparameters`` object, OpenAI's deprecated place, is moved there)."""
    import copy

    body = copy.deepcopy(spec)
    legacy = body.pop("hyperparameters", None)
    hyperparameters = _hyperparameters(body, where)
    if legacy is not None:
        if not isinstance(legacy, dict):
            _fail([f"{where}: hyperparameters must be an object"])
        if hyperparameters:
            _fail([f"{where}: give the hyperparameters in method.supervised.hyperparameters or at the top level, "
                   "not both"])
        hyperparameters.update(legacy)
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        _fail([f"{where}: metadata must be an object of key: value strings"])
    return body


def _override(body: dict[str, Any], name: str, value: Any, where: str) -> None:
    """Set one field of a job body: a top-level field by its name, ``metadata`` merged, anything else a
    hyperparameter."""
    if name == "metadata":
        if not isinstance(value, dict):
            _fail([f"{where}: metadata must be an object of key: value strings"])
        body["metadata"] = {**(body.get("metadata") or {}), **value}
    elif name in ("method", "hyperparameters"):
        _fail([f"{where}: {name!r} cannot be varied as a whole; name the hyperparameters themselves"])
    elif name in TOP_FIELDS:
        body[name] = value
    else:
        _hyperparameters(body, where)[name] = value


def _int_or_auto(value: str | None, flag: str) -> int | str | None:
    if value is None or value.strip().lower() == "auto":
        return None if value is None else "auto"
    try:
        return int(value)
    except ValueError:
        _fail([f"{flag}: expected a whole number or 'auto', got {value!r}"])


def _float_or_auto(value: str | None, flag: str) -> float | str | None:
    import math

    if value is None or value.strip().lower() == "auto":
        return None if value is None else "auto"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        _fail([f"{flag}: expected a number or 'auto', got {value!r}"])
    return number


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    found = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail([f"{flag}: expected key=value, got {item!r}"])
        found[key.strip()] = value
    return found


def _set_values(values: list[str] | None) -> dict[str, Any]:
    """``--set name=value``: the value as JSON when it parses (numbers, true, null, lists), else the string."""
    found = {}
    for name, text in _pairs(values, "--set").items():
        try:
            found[name] = json.loads(text)
        except ValueError:
            found[name] = text
    return found


def _job_body(spec: Path | None, model: str | None, training_file: str | None, validation_file: str | None,
              suffix: str | None, seed: int | None, optimizer: str | None, n_epochs: str | None,
              batch_size: str | None, learning_rate_multiplier: str | None, max_steps: int | None,
              gpus: int | None, priority: int | None, metadata: list[str] | None,
              sets: list[str] | None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The job body from ``--spec`` and the options (which win), and the folder each file field's local
    path is relative to (the spec's folder for the spec's, the working folder for an option's)."""
    if optimizer is not None and optimizer not in OPTIMIZERS:
        _fail([f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}"])
    flags = {"n_epochs": _int_or_auto(n_epochs, "--n-epochs"), "batch_size": _int_or_auto(batch_size, "--batch-size"),
             "learning_rate_multiplier": _float_or_auto(learning_rate_multiplier, "--learning-rate-multiplier"),
             "optimizer": optimizer, "max_steps": max_steps}
    pairs, extra = _pairs(metadata, "--metadata"), _set_values(sets)
    body = _normalised(_load_document(spec, "--spec"), "--spec") if spec is not None else _normalised({}, "options")
    spec_dir = spec.resolve().parent if spec is not None else Path.cwd()
    bases = {"training_file": spec_dir, "validation_file": spec_dir, "evals": spec_dir}
    for name, value in (("model", model), ("training_file", training_file), ("validation_file", validation_file),
                        ("suffix", suffix), ("seed", seed), ("gpus", gpus), ("priority", priority)):
        if value is not None:
            body[name] = value
            if name in bases:
                bases[name] = Path.cwd()
    hyperparameters = _hyperparameters(body, "--spec")
    hyperparameters.update({k: v for k, v in flags.items() if v is not None})
    hyperparameters.update(extra)
    if pairs:
        body["metadata"] = {**(body.get("metadata") or {}), **pairs}
    for name, flag in (("model", "--model"), ("training_file", "--training-file")):
        if not body.get(name):
            _fail([f"{flag}: required (or {name!r} in the --spec file)"])
    return body, bases


class _Uploads:
    """Local paths in a job body replaced by the ids of their uploads (each file uploaded once)."""

    SUFFIXES = (".jsonl", ".json", ".txt")

    def __init__(self, client: Any, quiet: bool) -> None:
        self.client, self.quiet, self.done = client, quiet, {}

    def upload(self, path: Path, purpose: str, label: str) -> dict[str, Any]:
        """Upload one file; a file the server refuses ends the command with every problem, under ``label``."""
        from client.rest import ApiError, ServiceUnreachable

        try:
            file = self.client.upload_file(path, purpose=purpose)
        except ServiceUnreachable:  # an OSError too, but not this file's
            raise
        except ApiError as e:
            if e.status >= 500:
                raise
            problems = [str(d["message"]) for d in e.details if isinstance(d, dict) and d.get("message")]
            problems = problems or [e.message.removeprefix("file: ")]
            _fail([f"{label}: {p}" for p in problems] + [f"(uploading {path})"])
        except OSError as e:  # unreadable: a path this process cannot open
            _fail([f"{label}: cannot read {path}: {e}"])
        if not self.quiet:
            err.print(f"uploaded {_text(path)} as {file['id']} ({file.get('records', '?')} records)")
        return file

    def ref(self, value: Any, base: Path, label: str, purpose: str) -> Any:
        """A file id as given, or the id of the local file ``value`` names (relative to ``base``)."""
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_file():
            key = (str(path.resolve()), purpose)
            if key not in self.done:
                self.done[key] = self.upload(path, purpose, label)["id"]
            return self.done[key]
        if "/" in value or value.startswith((".", "~")) or Path(value).suffix.lower() in self.SUFFIXES:
            _fail([f"{label}: no file {value!r} (give an uploaded file's id, or the path of a local file)"])
        return value

    def resolve(self, body: dict[str, Any], bases: dict[str, Path]) -> None:
        for name in FILE_FIELDS:
            if body.get(name) is not None:
                body[name] = self.ref(body[name], bases[name], name, "fine-tune")
        for i, item in enumerate(body.get("evals") or []):
            if isinstance(item, dict):
                for name in ("file", "fewshot_file"):
                    if item.get(name) is not None:
                        item[name] = self.ref(item[name], bases["evals"], f"evals[{i}].{name}", "eval")


# ------------------------------------------------------------------------------------- following jobs
def _follow(client: Any, job_ids: list[str], quiet: bool) -> list[dict[str, Any]]:
    """Poll the jobs until every one has ended, with a live bar per job on stderr (step/total, the latest
    train loss, the estimated time left) unless ``quiet``; the jobs as they ended."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from client.rest import FINAL

    jobs: dict[str, dict[str, Any]] = {}
    after: dict[str, int | None] = dict.fromkeys(job_ids)
    bar = None if quiet else Progress(
        TextColumn("{task.description}"), TextColumn("{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[eta]}"), console=err)
    tasks = {}
    try:
        with bar if bar is not None else contextlib.nullcontext():
            if bar is not None:
                tasks = {i: bar.add_task(i, total=None, status="queued", loss="", eta="") for i in job_ids}
            while True:
                for job_id in job_ids:
                    if job_id in jobs and jobs[job_id]["status"] in FINAL:
                        continue
                    job = jobs[job_id] = client.get_job(job_id)
                    if bar is None:
                        continue
                    points = client.metrics(job_id, kind="train", after_step=after[job_id])
                    fields: dict[str, Any] = {"status": _status(job["status"])}
                    if points:
                        after[job_id] = points[-1]["step"]
                        fields["loss"] = f"loss {_loss(points[-1]['loss'])}"
                    finish = job.get("estimated_finish")
                    fields["eta"] = (f"eta {_duration(finish - time.time())}"
                                     if finish and job["status"] not in FINAL else "")
                    progress = job.get("progress") or {}
                    bar.update(tasks[job_id], total=progress.get("total_steps"), completed=progress.get("step") or 0,
                               **fields)
                if all(jobs[i]["status"] in FINAL for i in job_ids):
                    return [jobs[i] for i in job_ids]
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        _fail(["stopped following; the jobs go on (`lomo status ID`, `lomo cancel ID`)"], code=130)


def _final_line(job: dict[str, Any]) -> str:
    if job["status"] == "succeeded":
        return (f"{_status('succeeded')}: {job['id']} -> {_text(job.get('fine_tuned_model'))} "
                f"({job.get('trained_tokens', 0)} tokens trained)")
    error = job.get("error") or {}
    why = f"{error.get('code')}: {error.get('message')}" if error else ""
    if error.get("param"):
        why += f" ({error['param']})"
    return f"{_status(job['status'])}: {job['id']}" + (f": {_text(why)}" if why else "")


def _show_job(job: dict[str, Any]) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    hyperparameters = job.get("hyperparameters") or {}
    progress = job.get("progress") or {}
    fraction = progress.get("fraction")
    rows = [
        ("job", f"{job['id']}  {_status(job['status'])}" + ("  (cancel requested)" if job.get("cancel_requested")
                                                             and job["status"] not in ("cancelled",) else "")),
        ("model", _text(job.get("model"))),
        ("fine-tuned model", _text(job.get("fine_tuned_model"))),
        ("optimizer", _text(_optimizer(job))),
        ("hyperparameters", _text(", ".join(f"{k}={v}" for k, v in hyperparameters.items()
                                            if k != "optimizer" and v is not None))),
        ("training file", _text(job.get("training_file"))),
        ("validation file", _text(job.get("validation_file"))),
        ("progress", _progress(job) + (f" ({fraction:.0%})" if fraction is not None else "")),
        ("trained tokens", str(job.get("trained_tokens", 0))),
        ("gpus", str(job.get("gpus", "-"))),
        ("created", _when(job.get("created_at"))),
        ("started", _when(job.get("started_at"))),
        ("finished", _when(job.get("finished_at"))),
    ]
    if job.get("estimated_finish") and job["status"] not in ("succeeded", "failed", "cancelled"):
        rows.append(("estimated finish", _when(job["estimated_finish"])))
    history = [f"attempt {job['attempt']}"] if job.get("attempt", 0) > 1 else []
    history += [f"{job[key]} {what}" for key, what in (("recoveries", "recovered after a lost worker"),
                                                        ("preemptions", "preempted")) if job.get(key)]
    if job.get("preempted_by"):
        history.append(f"stopping for {job['preempted_by']} (higher priority)")
    if history:
        rows.append(("history", _text(", ".join(history))))
    if job.get("metadata"):
        rows.append(("metadata", _text(", ".join(f"{k}={v}" for k, v in job["metadata"].items()))))
    if job.get("result_files"):
        rows.append(("result files", _text(", ".join(job["result_files"]))))
    error = job.get("error")
    if error:
        rows.append(("error", f"[red]{_text(error.get('code'))}[/]: {_text(error.get('message'))}"
                     + (f" ({_text(error['param'])})" if error.get("param") else "")))
    for name, value in rows:
        grid.add_row(name, value)
    out.print(grid)


# ----------------------------------------------------------------------------------------------- files
files_app = typer.Typer(no_args_is_help=True, help="Upload, list, show and delete training and evaluation files.")
app.add_typer(files_app, name="files")


@files_app.command("upload")
def files_upload(
    path: Path = typer.Argument(..., help=".jsonl, .json or .txt"),
    purpose: str = typer.Option("fine-tune", help="fine-tune | eval"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """Upload a file; the service checks it line by line (every problem is listed with its line)."""
    if purpose not in PURPOSES:
        _fail([f"--purpose: expected one of {', '.join(PURPOSES)}, got {purpose!r}"])
    if not path.is_file():
        _fail([f"PATH: no file {str(path)!r}"])
    with _connect(url, api_key) as client:
        file = _Uploads(client, quiet=True).upload(path, purpose, str(path))
    if as_json:
        _print_json(file)
        return
    out.print(f"{file['id']}: {_text(file.get('filename'))}, {file.get('records')} records"
              + (f" ({file['format']})" if file.get("format") else "") + f", purpose {file.get('purpose')}")


@files_app.command("list")
def files_list(
    purpose: str | None = typer.Option(None, help="fine-tune | eval"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """The uploaded files."""
    with _connect(url, api_key) as client:
        files = client.list_files(purpose=purpose)
    if as_json:
        _print_json(files)
        return
    table = _table()
    _id_column(table, "id", [f["id"] for f in files])
    for column in ("filename", "purpose", "records", "bytes", "format", "created"):
        table.add_column(column, justify="right" if column in ("records", "bytes") else "left")
    for f in files:
        table.add_row(f["id"], _text(f.get("filename")), _text(f.get("purpose")), str(f.get("records", "-")),
                      str(f.get("bytes", "-")), _text(f.get("format")), _when(f.get("created_at")))
    out.print(table)


@files_app.command("show")
def files_show(file_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
               as_json: JsonOption = False) -> None:
    """One file."""
    with _connect(url, api_key) as client:
        file = client.get_file(file_id)
    if as_json:
        _print_json(file)
        return
    for key, value in file.items():
        if key != "object":
            out.print(f"[bold]{key}[/]: {_when(value) if key == 'created_at' else _text(value)}")


@files_app.command("rm")
def files_rm(file_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
             as_json: JsonOption = False) -> None:
    """Delete a file (refused while an unfinished job uses it)."""
    with _connect(url, api_key) as client:
        answer = client.delete_file(file_id)
    if as_json:
        _print_json(answer)
        return
    out.print(f"deleted {file_id}")


# ------------------------------------------------------------------------------------------------ jobs
@app.command()
def submit(
    spec: SpecOption = None, model: ModelOption = None, training_file: TrainingFileOption = None,
    validation_file: ValidationFileOption = None, suffix: SuffixOption = None, seed: SeedOption = None,
    optimizer: OptimizerOption = None, n_epochs: EpochsOption = None, batch_size: BatchOption = None,
    learning_rate_multiplier: MultiplierOption = None, max_steps: MaxStepsOption = None, gpus: GpusOption = None,
    priority: PriorityOption = None, metadata: MetadataOption = None, set_: SetOption = None,
    idempotency_key: str | None = typer.Option(None, "--idempotency-key", show_default=False,
                                               help="a retry with the same key answers the job first created"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to its end; exit 1 if it failed or was "
                                                    "cancelled"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """Submit a fine-tuning job (from the options and/or --spec); local training files are uploaded first."""
    body, bases = _job_body(spec, model, training_file, validation_file, suffix, seed, optimizer, n_epochs,
                            batch_size, learning_rate_multiplier, max_steps, gpus, priority, metadata, set_)
    with _connect(url, api_key) as client:
        _Uploads(client, quiet=as_json).resolve(body, bases)
        job = client.create_job(idempotency_key=idempotency_key, **body)
        if not wait:
            if as_json:
                _print_json(job)
            else:
                out.print(f"submitted {job['id']} ({_status(job['status'])}); follow it with `lomo status "
                          f"{job['id']} --wait` or `lomo events {job['id']} --follow`")
            return
        if not as_json:
            err.print(f"submitted {job['id']}")
        job = _follow(client, [job["id"]], quiet=as_json)[0]
    if as_json:
        _print_json(job)
    else:
        out.print(_final_line(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def estimate(
    spec: SpecOption = None, model: ModelOption = None, training_file: TrainingFileOption = None,
    validation_file: ValidationFileOption = None, suffix: SuffixOption = None, seed: SeedOption = None,
    optimizer: OptimizerOption = None, n_epochs: EpochsOption = None, batch_size: BatchOption = None,
    learning_rate_multiplier: MultiplierOption = None, max_steps: MaxStepsOption = None, gpus: GpusOption = None,
    priority: PriorityOption = None, metadata: MetadataOption = None, set_: SetOption = None,
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """What a job (same options and spec as submit) would need: memory per device, GPU count, whether it fits."""
    body, bases = _job_body(spec, model, training_file, validation_file, suffix, seed, optimizer, n_epochs,
                            batch_size, learning_rate_multiplier, max_steps, gpus, priority, metadata, set_)
    with _connect(url, api_key) as client:
        _Uploads(client, quiet=as_json).resolve(body, bases)
        answer = client.estimate(**body)
    if as_json:
        _print_json(answer)
        return
    if answer.get("available") is False:
        out.print(f"no prediction: {_text(answer.get('reason'))}")
        return
    devices = f"{answer.get('device')} device(s) of {answer['device_bytes'] / 2**30:.2f} GiB" \
        if answer.get("device_bytes") else f"{answer.get('device')} device(s)"
    out.print(("[green]fits[/]" if answer.get("fits") else "[red]does not fit[/]")
              + f": {answer.get('per_device_gib')} GiB per device, {devices}, {answer.get('devices')} on a node")
    if answer.get("gpus") is not None:
        out.print(f"GPUs: {answer['gpus']}")
    per_device = answer.get("per_device") or {}
    parts = [f"{key.removesuffix('_bytes').replace('_', ' ')} {value / 2**20:.2f} MiB"
             for key, value in per_device.items() if key.endswith("_bytes") and isinstance(value, int | float)]
    if parts:
        out.print("per device: " + ", ".join(parts))
    if answer.get("reason"):
        out.print(f"reason: {_text(answer['reason'])}")
    for warning in answer.get("warnings") or []:
        out.print(f"[yellow]warning:[/] {_text(warning)}")


@app.command("jobs")
def jobs_list(
    status: str | None = typer.Option(None, help="queued | running | succeeded | failed | cancelled ..."),
    metadata: MetadataOption = None,
    limit: int = typer.Option(20, min=1, help="at most this many jobs, newest first"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """The jobs, newest first: id, status, model, optimizer, progress, created."""
    filters = _pairs(metadata, "--metadata")
    with _connect(url, api_key) as client:
        found = list(itertools.islice(client.iter_jobs(status, filters, page_size=min(100, limit)), limit))
    if as_json:
        _print_json(found)
        return
    table = _table()
    _id_column(table, "id", [job["id"] for job in found])
    for column in ("status", "model", "optimizer", "progress", "created"):
        table.add_column(column, justify="right" if column == "progress" else "left")
    for job in found:
        table.add_row(job["id"], _status(job["status"]), _text(job.get("model")), _text(_optimizer(job)),
                      _progress(job), _when(job.get("created_at")))
    out.print(table)


@app.command("status")
def job_status(
    job_id: str = typer.Argument(..., metavar="ID"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to its end; exit 1 if it failed or was "
                                                    "cancelled"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """A job: its status, progress, hyperparameters and error."""
    with _connect(url, api_key) as client:
        job = _follow(client, [job_id], quiet=as_json)[0] if wait else client.get_job(job_id)
    if as_json:
        _print_json(job)
    else:
        _show_job(job)
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


def _new_events(client: Any, job_id: str, seen: set) -> list[dict[str, Any]]:
    """The job's events not in ``seen``, oldest first (the server lists newest first)."""
    fresh, after = [], None
    while True:
        page = client.events(job_id, limit=100, after=after)
        known = False
        for event in page["data"]:
            if event["id"] in seen:
                known = True
                break
            fresh.append(event)
        if known or not page.get("has_more") or not page["data"]:
            break
        after = page["data"][-1]["id"]
    seen.update(event["id"] for event in fresh)
    return fresh[::-1]


LEVEL_STYLE = {"error": "red", "warning": "yellow"}


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event, default=str))
        return
    import datetime as dt

    level = str(event.get("level", "info"))
    moment = dt.datetime.fromtimestamp(event["created_at"]).strftime("%H:%M:%S") if event.get("created_at") else ""
    style = LEVEL_STYLE.get(level)
    shown = f"[{style}]{level:7}[/]" if style else f"{level:7}"
    out.print(f"{moment} {shown} {_text(event.get('message'))}")


@app.command()
def events(
    job_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events until the job ends"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """A job's events, oldest first (--json: a JSON list; with --follow, one JSON object per line)."""
    import time

    from client.rest import FINAL

    seen: set = set()
    with _connect(url, api_key) as client:
        if not follow:
            found = _new_events(client, job_id, seen)
            if as_json:
                _print_json(found)
            else:
                for event in found:
                    _print_event(event, False)
            return
        try:
            while True:
                ended = client.get_job(job_id)["status"] in FINAL  # asked first: no event after the end is missed
                for event in _new_events(client, job_id, seen):
                    _print_event(event, as_json)
                if ended:
                    return
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


@app.command()
def cancel(job_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
           as_json: JsonOption = False) -> None:
    """Cancel a job (a running one stops at its next step)."""
    with _connect(url, api_key) as client:
        job = client.cancel_job(job_id)
    if as_json:
        _print_json(job)
    else:
        out.print(f"{job['id']}: {_status(job['status'])}" + (" (cancellation requested)"
                                                           if job.get("cancel_requested") and
                                                           job["status"] != "cancelled" else ""))


def _pause_or_resume(action: str, job_id: str, url: str | None, api_key: str | None, as_json: bool) -> None:
    with _connect(url, api_key) as client:
        job = client.pause_job(job_id) if action == "pause" else client.resume_job(job_id)
    if as_json:
        _print_json(job)
    else:
        out.print(f"{job['id']}: {_status(job['status'])}")


@app.command()
def pause(job_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
          as_json: JsonOption = False) -> None:
    """Pause a job (where the server offers it; otherwise its answer is printed, exit 2)."""
    _pause_or_resume("pause", job_id, url, api_key, as_json)


@app.command()
def resume(job_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
           as_json: JsonOption = False) -> None:
    """Resume a paused job."""
    _pause_or_resume("resume", job_id, url, api_key, as_json)


def _model_order(ref: str) -> tuple[int, int, str]:
    if ref == "base":
        return 0, 0, ref
    if ref == "fine_tuned":
        return 2, 0, ref
    step = ref.removeprefix("checkpoint-")
    return (1, int(step), ref) if step.isdigit() else (3, 0, ref)


@app.command("evals")
def job_evals(job_id: str = typer.Argument(..., metavar="ID"), url: UrlOption = None, api_key: KeyOption = None,
              as_json: JsonOption = False) -> None:
    """A job's evaluation results: each task and metric, the base model beside the fine-tuned one."""
    with _connect(url, api_key) as client:
        rows = client.evals(job_id)
    if as_json:
        _print_json(rows)
        return
    models = sorted({str(r["model"]) for r in rows}, key=_model_order)
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        values.setdefault((r["task"], r["metric"]), {})[str(r["model"])] = r["value"]
    table = _table()
    table.add_column("task")
    table.add_column("metric")
    for model in models:
        table.add_column(model, justify="right")
    for (task, metric), by_model in values.items():
        table.add_row(_text(task), _text(metric), *[f"{by_model[m]:.4g}" if m in by_model else "-" for m in models])
    if not rows:
        out.print(f"no evaluation results for {job_id} (yet)")
        return
    out.print(table)


# ---------------------------------------------------------------------------------------------- sweeps
def _sweep_runs(document: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base spec and one dict of overrides per run: the cartesian product of ``grid`` or ``runs``."""
    import itertools

    unknown = sorted(set(document) - {"base", "grid", "runs"})
    if unknown:
        _fail([f"SPEC: unknown key {unknown[0]!r} (a sweep has base, and grid or runs)"])
    base = document.get("base")
    if not isinstance(base, dict):
        _fail(["SPEC: base must be a job spec (an object)"])
    grid, runs = document.get("grid"), document.get("runs")
    if (grid is None) == (runs is None):
        _fail(["SPEC: give grid (a list of values per hyperparameter) or runs (a list of overrides), one of them"])
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            _fail(["SPEC: grid must map hyperparameter names to lists of values"])
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                _fail([f"SPEC: grid.{name} must be a non-empty list of values"])
        names = list(grid)
        return base, [dict(zip(names, combo)) for combo in itertools.product(*grid.values())]
    if not isinstance(runs, list) or not runs:
        _fail(["SPEC: runs must be a non-empty list of overrides"])
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            _fail([f"SPEC: runs[{i}] must be an object of overrides"])
    return base, runs


def _varied(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _last(points: list[dict[str, Any]]) -> float | None:
    return points[-1]["loss"] if points else None


@app.command()
def sweep(
    spec: Path = typer.Argument(..., metavar="SPEC", help='YAML or JSON: {"base": <job spec>, "grid": {name: '
                                                          '[values]}} or {"base": ..., "runs": [{overrides}]}'),
    wait: bool = typer.Option(False, "--wait", help="follow every job to its end, then show their results; exit 1 "
                                                    "if any failed or was cancelled"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """Submit one job per run of a sweep; show the jobs and the values varied.

    Each job's metadata gets sweep=<sweep id> and sweep_run=<index> (`lomo jobs --metadata sweep=<id>`);
    with --wait, every job is followed to its end, then their final status, last train loss, validation
    loss and evaluation scores are shown."""
    import secrets

    base, runs = _sweep_runs(_load_document(spec, "SPEC"))
    sweep_id = "sweep-" + secrets.token_hex(4)
    names = list(dict.fromkeys(name for run in runs for name in run))
    bodies = []
    for i, run in enumerate(runs):
        body = _normalised(base, "SPEC: base")
        for name, value in run.items():
            _override(body, name, value, f"SPEC: run {i}")
        body["metadata"] = {**(body.get("metadata") or {}), "sweep": sweep_id, "sweep_run": str(i)}
        for name in ("model", "training_file"):
            if not body.get(name):
                _fail([f"SPEC: run {i}: {name} is required (in base or the run)"])
        bodies.append(body)
    folder = spec.resolve().parent
    bases = dict.fromkeys((*FILE_FIELDS, "evals"), folder)
    from client.rest import ApiError, ServiceUnreachable

    with _connect(url, api_key) as client:
        uploads = _Uploads(client, quiet=as_json)
        for body in bodies:
            uploads.resolve(body, bases)
        created: list[dict[str, Any]] = []
        for i, body in enumerate(bodies):
            try:
                created.append(client.create_job(**body))
            except (ApiError, ServiceUnreachable) as e:
                for job in created:  # all or nothing: a half-submitted sweep is not the sweep asked for
                    with contextlib.suppress(ApiError, ServiceUnreachable):
                        client.cancel_job(job["id"])
                what = ", ".join(f"{k}={_varied(v)}" for k, v in runs[i].items())
                lines = _api_error_lines(e) if isinstance(e, ApiError) else [str(e)]
                lines[0] = f"run {i} ({what}): {lines[0]}"
                if created:
                    lines.append(f"the {len(created)} job(s) already submitted for {sweep_id} were cancelled")
                code = 3 if isinstance(e, ServiceUnreachable) else 2 if 400 <= e.status < 500 else 1
                _fail(lines, code=code)
        ids = [job["id"] for job in created]
        if not as_json:
            table = _table(title=f"{sweep_id}: {len(ids)} jobs (lomo jobs --metadata sweep={sweep_id})")
            table.add_column("run")
            _id_column(table, "job", ids)
            for column in names:
                table.add_column(column)
            for i, job in enumerate(created):
                table.add_row(str(i), job["id"], *[_text(_varied(runs[i][n])) if n in runs[i] else "-" for n in names])
            (err if wait else out).print(table)
        if not wait:
            if as_json:
                _print_json({"sweep": sweep_id, "runs": [
                    {"index": i, "job_id": job["id"], "status": job["status"], "values": runs[i]}
                    for i, job in enumerate(created)]})
            return
        final = _follow(client, ids, quiet=as_json)
        results = []
        for i, job in enumerate(final):
            scores = {f"{r['task']}.{r['metric']}": r["value"] for r in client.evals(job["id"])
                      if r["model"] == "fine_tuned" and r["task"] != "validation_loss"}
            results.append({"index": i, "job_id": job["id"], "values": runs[i], "status": job["status"],
                            "train_loss": _last(client.metrics(job["id"], kind="train")),
                            "val_loss": _last(client.metrics(job["id"], kind="val")), "evals": scores,
                            "error": job.get("error")})
    failed = sum(r["status"] != "succeeded" for r in results)
    if as_json:
        _print_json({"sweep": sweep_id, "runs": results})
    else:
        metrics = list(dict.fromkeys(name for r in results for name in r["evals"]))
        table = _table(title=f"{sweep_id}: results")
        table.add_column("run")
        _id_column(table, "job", [r["job_id"] for r in results])
        for column in (*names, "status", "train loss", "val loss", *metrics):
            table.add_column(column, justify="right" if column in ("train loss", "val loss", *metrics) else "left")
        for r in results:
            table.add_row(str(r["index"]), r["job_id"],
                          *[_text(_varied(r["values"][n])) if n in r["values"] else "-" for n in names],
                          _status(r["status"]), _loss(r["train_loss"]), _loss(r["val_loss"]),
                          *[f"{r['evals'][m]:.4g}" if m in r["evals"] else "-" for m in metrics])
        out.print(table)
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- models
models_app = typer.Typer(no_args_is_help=True, help="The service's models: list them, download one.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False) -> None:
    """The models jobs may name, and the fine-tuned ones."""
    with _connect(url, api_key) as client:
        answer = client.list_models()
    models = answer.get("data", []) if isinstance(answer, dict) else list(answer)
    if as_json:
        _print_json(models)
        return
    preferred = ("id", "name", "owned_by", "base_model", "job_id", "created", "created_at")
    columns = [c for c in preferred if any(c in m for m in models)] or sorted({k for m in models for k in m})
    table = _table()
    for column in columns:
        if column in ("id", "name"):
            _id_column(table, column, [str(m.get(column)) for m in models])
        else:
            table.add_column(column)
    for m in models:
        table.add_row(*[_when(m.get(c)) if c in ("created", "created_at") and isinstance(m.get(c), int)
                        else _text(m.get(c)) for c in columns])
    out.print(table)


@models_app.command("register")
def models_register(
    name: str = typer.Argument(..., metavar="NAME", help="what jobs will name it (\"model\": NAME)"),
    path: Path = typer.Argument(..., metavar="FOLDER", help="a model folder (with config.json) on the service's host"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """Register a base model folder by name (admins): jobs name it, never its path."""
    with _connect(url, api_key) as client:
        made = client.register_model(name, path.expanduser().absolute())
    if as_json:
        _print_json(made)
    else:
        out.print(f"registered {_text(made['id'])}: jobs may now name it")


@models_app.command("download")
def models_download(
    name: str = typer.Argument(..., help="a model's name, e.g. ft:stories260K:demo:<job id>"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the model into"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """Download a model (a Hugging Face folder) into a local folder."""
    from client.rest import ServiceUnreachable

    with _connect(url, api_key) as client:
        try:
            written = client.download_model(name, output)
        except ServiceUnreachable:  # an OSError too, but not the output folder's: exit 3 like every command
            raise
        except ValueError as e:  # an archive member that is not a plain file, or would land outside -o
            _fail([f"download of {name} stopped: {e}"], code=1)
        except OSError as e:
            _fail([f"--output: cannot write into {output}: {e}"], code=1)
    where = str(written) if isinstance(written, str | Path) else str(output)
    if as_json:
        _print_json({"model": name, "path": where})
    else:
        out.print(f"downloaded {_text(name)} to {_text(where)}")



@app.command()
def whoami(url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False) -> None:
    """Who the API key is: the user, their quotas and what they use of them."""
    with _connect(url, api_key) as client:
        me = client.me()
    if as_json:
        _print_json(me)
        return
    out.print(f"{_text(me['name'])} ({_text(me['id'])}){' - admin' if me['is_admin'] else ''}")
    table = _table()
    for column in ("quota", "used", "limit"):
        table.add_column(column, justify="left" if column == "quota" else "right")
    for quota, limit in me["quotas"].items():
        used = me["usage"].get(quota, 0)
        table.add_row(quota, f"{used:g}", "no limit" if limit is None else f"{limit:g}")
    out.print(table)


@app.command()
def cluster(
    hours: float = typer.Option(24.0, "--hours", help="the window of the GPU lease timeline, in hours (at most 744)"),
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False,
) -> None:
    """The nodes and who holds each GPU, the queue in the order it runs, and the GPU leases of the last hours
    (other users' job ids show as '-', but to admins)."""
    with _connect(url, api_key) as client:
        view = client.cluster(hours)
    if as_json:
        _print_json(view)
        return
    nodes = _table(title="nodes", title_justify="left")
    for column in ("node", "up", "gpu", "GiB", "job", "user", "since"):
        nodes.add_column(column, no_wrap=column in ("node", "job"))
    for node in view["nodes"]:
        up = "yes" if node["alive"] else f"no (seen {_when(node['seen_at'])})"
        for gpu in node["gpus"]:
            nodes.add_row(_text(node["name"]), up, str(gpu["index"]), f"{gpu['memory_gib']:g}", _text(gpu["job"]),
                          _text(gpu["user"]), _when(gpu["since"]))
        if not node["gpus"]:  # a CPU node: what it runs holds no lease
            for job in node["running"] or [{}]:
                nodes.add_row(_text(node["name"]), up, "cpu", "-", _text(job.get("job")), _text(job.get("user")),
                              _when(job.get("started_at")))
    out.print(nodes)
    queue = _table(title=f"queue ({len(view['queue'])} job(s), in the order the scheduler considers them)",
                   title_justify="left")
    for column in ("#", "job", "user", "gpus", "priority", "model", "created", "note"):
        queue.add_column(column, justify="right" if column in ("#", "gpus", "priority") else "left",
                         no_wrap=column == "job")
    for job in view["queue"]:
        note = ", ".join(n for n, on in (("preempted", job["preempted"]), ("held by quota", job["held_by_quota"]))
                         if on)
        queue.add_row(str(job["position"]), _text(job["job"]), _text(job["user"]), str(job["gpus"]),
                      str(job["priority"]), _text(job["model"]), _when(job["created_at"]), note)
    out.print(queue)
    cut = " (the newest the API answers with; older ones left out)" if view.get("leases_truncated") else ""
    out.print(f"{len(view['leases'])} GPU lease(s) in the last {view['hours']:g} hours{cut}")


@app.command()
def version(as_json: JsonOption = False) -> None:
    """Print the version."""
    from lomo_core import __version__

    if as_json:
        _print_json({"version": __version__})
        return
    out.print(__version__)


if __name__ == "__main__":
    app()


users_app = typer.Typer(no_args_is_help=True, help="Users and their API keys (on the service's node: these "
                                                   "commands use its database directly, as LOMO_DATABASE_URL says).")
app.add_typer(users_app, name="users")


def _users_session():
    """A transaction on the service's database (migrated first), with its errors as CLI messages."""
    import contextlib

    from jobs import errors as service_errors
    from jobs.migrate import upgrade

    @contextlib.contextmanager
    def scope():
        settings = _settings()
        url = settings.resolved_database_url()
        if settings.auto_migrate:
            upgrade(url)
        try:
            with settings.api_database().session() as session:
                yield session
        except service_errors.InvalidRequest as e:
            _fail([str(e)])
        except (service_errors.NotFound, service_errors.Conflict) as e:
            _fail([str(e)])

    return scope()


def _show_new_key(user: Any, new: Any, as_json: bool) -> None:
    if as_json:
        _print_json({"user": user.name, "user_id": user.id, "admin": user.is_admin, "key_id": new.key.id,
                     "key": new.secret})
        return
    out.print(f"user {_text(user.name)} ({user.id}{', admin' if user.is_admin else ''}): key {new.key.id}")
    out.print("[bold]the key (shown this once; it is stored only as a hash):[/]")
    typer.echo(new.secret)


@users_app.command("create")
def users_create(name: str = typer.Argument(..., metavar="NAME"),
                 admin: bool = typer.Option(False, "--admin", help="may see and act on every user's objects"),
                 key_name: str | None = typer.Option(None, "--key-name", help="a label for the key"),
                 as_json: JsonOption = False) -> None:
    """Create a user and print their first API key (once)."""
    from jobs.users import create_user

    with _users_session() as session:
        user, new = create_user(session, name, admin=admin, key_name=key_name)
    _show_new_key(user, new, as_json)


@users_app.command("add-key")
def users_add_key(name: str = typer.Argument(..., metavar="USER", help="the user's name or id"),
                  key_name: str | None = typer.Option(None, "--key-name", help="a label for the key"),
                  as_json: JsonOption = False) -> None:
    """Give a user another API key (their other keys stay valid) and print it (once)."""
    from jobs.users import add_key, get_user

    with _users_session() as session:
        user = get_user(session, name)
        new = add_key(session, user, key_name)
    _show_new_key(user, new, as_json)


@users_app.command("revoke-key")
def users_revoke_key(key_id: str = typer.Argument(..., metavar="KEY_ID", help="key_... (as `lomo users list "
                                                                               "--keys` shows)"),
                     as_json: JsonOption = False) -> None:
    """Revoke an API key: it authenticates no one from the next request on."""
    from jobs.users import revoke_key

    with _users_session() as session:
        key = revoke_key(session, key_id)
        answer = {"key_id": key.id, "user_id": key.user_id, "revoked_at": key.revoked_at.isoformat()}
    if as_json:
        _print_json(answer)
    else:
        out.print(f"key {key_id} revoked")


@users_app.command("list")
def users_list(keys: bool = typer.Option(False, "--keys", help="also each user's keys (ids, never secrets)"),
               as_json: JsonOption = False) -> None:
    """The users, with their number of live keys."""
    from jobs.users import list_keys, list_users

    with _users_session() as session:
        rows = []
        for user, live in list_users(session):
            row = {"name": user.name, "id": user.id, "admin": user.is_admin, "live_keys": live,
                   "created_at": user.created_at.isoformat() if user.created_at else None}
            if keys:
                row["keys"] = [{"id": k.id, "name": k.name, "created_at": k.created_at.isoformat(),
                                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                                "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None}
                               for k in list_keys(session, user)]
            rows.append(row)
    if as_json:
        _print_json(rows)
        return
    table = _table()
    for column in ("name", "id", "admin", "live keys", *(["keys"] if keys else [])):
        table.add_column(column)
    for row in rows:
        cells = [_text(row["name"]), row["id"], "yes" if row["admin"] else "", str(row["live_keys"])]
        if keys:
            cells.append(", ".join(k["id"] + (" (revoked)" if k["revoked_at"] else "") for k in row["keys"]) or "-")
        table.add_row(*cells)
    out.print(table)
