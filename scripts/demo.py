"""`make demo`: start the service on its zero-configuration default (SQLite, a SQLite broker, one worker
beside the API), submit a real LOMO fine-tuning job of stories260K through the REST API, follow it with a
progress bar, then show the loss curve, the measured memory, the evaluations (COPA and LAMBADA through
lm-eval, base model before and fine-tuned model after) and a generation before / after. Everything goes
through HTTP, as a lab script would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = SHARED / "models"
DATA = SHARED / "data" / "instruct" / "alpaca_en_demo.json"
EVALS = {"copa": (SHARED / "data" / "superglue" / "COPA" / "val.jsonl", 100),
         "lambada": (SHARED / "data" / "text" / "lambada_openai.jsonl", 200)}
HOME = ROOT / "runs" / "demo"
console = Console()

sys.path.insert(0, str(ROOT))
from client.rest import ApiError, LomoClient  # noqa: E402

HYPERPARAMETERS = {  # OpenAI's names, then this service's own settings
    "n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 0.5, "optimizer": "lomo",
    "max_steps": 60, "max_seq_len": 256, "clip_grad_norm": 1.0,
    "lr_schedule": "cosine", "warmup_steps": 5, "validation_split": 0.05, "eval_every": 20, "save_every": 30,
    "loss_chunk_size": 256,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}  # the embedded default
    env.update(LOMO_DATA_DIR=str(HOME / "var"), LOMO_MODEL_DIRS=f'["{MODELS}"]', LOMO_FLUSH_INTERVAL_S="0.5",
               HF_HUB_OFFLINE="1")
    log = (HOME / "service.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(client: LomoClient, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the service stopped; see {HOME / 'service.log'}")
        try:
            client._http.get("/health").raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"the service did not answer within 90 s; see {HOME / 'service.log'}")


def follow(client: LomoClient, job_id: str) -> dict:
    with Progress(TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task("job", total=None, status="queued", info="")

        def update(job: dict) -> None:
            info = ""
            points = client.metrics(job_id, kind="train")
            if points:
                info = f"loss {points[-1]['loss']:.3f}  {points[-1]['tokens_per_s']:.0f} tok/s"
            bar.update(task, total=job["progress"]["total_steps"], completed=job["progress"]["step"],
                       status=job["status"], info=info)

        return client.wait(job_id, timeout=600, poll=0.5, on_update=update)


def generate(model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()


def show(client: LomoClient, job: dict) -> None:
    job_id = job["id"]
    train = client.metrics(job_id, kind="train")
    val = client.metrics(job_id, kind="val")
    table = Table(title="loss curve (/metrics), every 10 steps")
    for col in ("step", "train loss", "lr", "tokens/s"):
        table.add_column(col, justify="right")
    for r in train[::10] + [train[-1]]:
        table.add_row(str(r["step"]), f"{r['loss']:.4f}", f"{r['lr']:.2e}", f"{r['tokens_per_s']:.0f}")
    console.print(table)
    console.print("validation loss: " + ", ".join(f"step {r['step']}: {r['loss']:.4f}" for r in val))

    report = client.memory(job_id)
    memory = report["measured"][0]
    predicted = (report.get("predicted") or {}).get("per_device") or {}
    mem = Table(title=f"memory (/memory), rank {memory['rank']}")
    mem.add_column("part")
    mem.add_column("measured MiB", justify="right")
    mem.add_column("predicted MiB", justify="right")
    for key in ("parameters", "gradients", "optimizer_state", "activations", "other", "peak"):
        guess = predicted.get(key + "_bytes")
        mem.add_row(key.replace("_", " "), f"{memory[key + '_bytes'] / 2**20:.2f}",
                    f"{guess / 2**20:.2f}" if guess is not None else "-")
    console.print(mem)

    evals = Table(title="evaluation (/evals)")
    for col in ("task", "metric", "model", "value", "examples", "truncated"):
        evals.add_column(col)
    for e in sorted(client.evals(job_id), key=lambda e: (e["task"], e["metric"], e["model"] != "base")):
        evals.add_row(e["task"], e["metric"], e["model"], f"{e['value']:.4g}", str(e["examples"]), str(e["truncated"]))
    console.print(evals)

    console.print("[bold]events:[/]")
    for event in reversed(client.events(job_id)["data"]):
        console.print(f"  {event['level']:7} {event['message']}")
    prompt = "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
    console.print("[bold]before:[/] " + generate(MODELS / "stories260K", prompt))
    folder = client.download_model(job["fine_tuned_model"], HOME / "downloads")  # GET /v1/models/{name}/content
    console.print("[bold]after: [/] " + generate(folder, prompt))


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (MODELS / "stories260K").is_dir() or not DATA.is_file():
        console.print(f"[red]the demo reads {MODELS / 'stories260K'} and {DATA}; put ../shared beside the project[/]")
        return 1
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    port = free_port()
    console.rule("[bold]LOMO fine-tuning service: one job through the REST API")
    console.print(f"lomo serve --port {port}  (SQLite + SQLite broker + one worker, data in {HOME / 'var'})",
                  style="dim")
    server = start_service(port)
    client = LomoClient(f"http://127.0.0.1:{port}")
    try:
        wait_healthy(client, server)
        key_file = HOME / "var" / "admin-key"  # the local admin's key, made at the service's first start
        client.close()
        client = LomoClient(f"http://127.0.0.1:{port}", api_key=key_file.read_text().strip())
        console.print(f"API key: the local admin's, from {key_file} (written at the first start, owner-only)",
                      style="dim")
        console.print(f"the portal: http://127.0.0.1:{port}/ (sign in with that key) while the demo runs", style="dim")
        file = client.upload_file(DATA)
        console.print(f"POST /v1/files -> {file['id']}: {file['records']} records ({file['format']})")
        evals = []
        for task, (path, limit) in EVALS.items():
            if path.is_file():
                uploaded = client.upload_file(path, purpose="eval")
                console.print(f"POST /v1/files (purpose=eval) -> {uploaded['id']}: {task}, first {limit} examples")
                evals.append({"task": task, "file": uploaded["id"], "limit": limit})
        job = client.create_job("stories260K", file["id"], suffix="demo", metadata={"source": "make demo"},
                                method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
                                evals=evals)
        console.print(f"POST /v1/fine_tuning/jobs -> {job['id']} ({job['status']})")
        job = follow(client, job["id"])
        if job["status"] != "succeeded":
            console.print(f"[red]job {job['status']}: {job['error']}[/]")
            return 1
        console.print(f"fine-tuned model: {job['fine_tuned_model']}  ({job['trained_tokens']} tokens)")
        show(client, job)
        return 0
    except ApiError as e:
        console.print(f"[red]{e}[/]")
        return 1
    finally:
        client.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
