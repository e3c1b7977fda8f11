"""A short real job through `lomo serve` on a chosen device: the service's path on a GPU, end to end.

Starts `lomo serve` on its zero-configuration default (SQLite, the SQLite broker, one worker beside the
API) with ``LOMO_DEVICE``, uploads the instruction data, submits a LOMO job of stories260K through the REST
API, waits for it, and writes what the service reports (status, steps, step time, predicted and measured
memory, the loss at the start and the end) as JSON and as a markdown table.

    .venv/bin/python benchmarks/gpu_job.py --device cpu --out /tmp/job.md      # here, to check the script
    python3 benchmarks/gpu_job.py --device cuda --shared .gpu-shared --out $OUT/gpu-job.md   # on the GPU machine

``--shared`` is the folder holding ``models/stories260K`` and ``data/instruct/alpaca_en_demo.json``
(../shared here; on the GPU machine a copy carried with the working tree, see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.rest import LomoClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds the job may take")
    parser.add_argument("--home", type=Path, default=Path("/tmp/lomo-gpu-job"))
    parser.add_argument("--out", type=Path, help="markdown report (a .json beside it holds the raw answers)")
    args = parser.parse_args()
    model, data = args.shared / "models" / "stories260K", args.shared / "data" / "instruct" / "alpaca_en_demo.json"
    if not (model / "config.json").is_file() or not data.is_file():
        print(f"needs {model} and {data}", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOMO_")}
    env.update(LOMO_DATA_DIR=str(args.home / "var"), LOMO_DEVICE=args.device, LOMO_MODEL_DIRS=json.dumps([
        str(model.parent)]), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args.home.mkdir(parents=True, exist_ok=True)
    log = args.home / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = LomoClient(f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
                return 1
            time.sleep(0.3)
        client.close()
        client = LomoClient(f"http://127.0.0.1:{port}", timeout=60,
                            api_key=(args.home / "var" / "admin-key").read_text().strip())
        file = client.upload_file(data)
        job = client.create_job("stories260K", file["id"], suffix="gpu-check", method={
            "type": "supervised", "supervised": {"hyperparameters": {
                "optimizer": "lomo", "batch_size": 8, "max_seq_len": 256, "max_steps": args.steps,
                "learning_rate_multiplier": 0.5, "clip_grad_norm": 1.0, "save_every": args.steps // 2}}})
        started = time.monotonic()
        job = client.wait(job["id"], timeout=args.timeout, poll=0.5)
        wall = time.monotonic() - started
        metrics = client.metrics(job["id"], kind="train")
        memory = client.memory(job["id"])
        events = [e["message"] for e in reversed(client.events(job["id"], limit=100)["data"])]
    finally:
        client.close()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    measured = max((m.get("peak_bytes") or 0 for m in memory.get("measured") or []), default=0)
    predicted = (memory.get("predicted") or {}).get("per_device", {}).get("peak_bytes")
    speeds = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    rows = {
        "device": args.device, "status": job["status"], "error": job.get("error"), "steps": len(metrics),
        "wall_s": round(wall, 1), "median_tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "first_loss": metrics[0]["loss"] if metrics else None, "last_loss": metrics[-1]["loss"] if metrics else None,
        "measured_peak_mib": round(measured / 2**20, 2) if measured else None,
        "predicted_peak_mib": round(predicted / 2**20, 2) if predicted else None,
        "fine_tuned_model": job.get("fine_tuned_model"),
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    text = "\n".join([
        f"# A real job through `lomo serve` on {args.device}", "",
        f"Commit {commit.stdout.strip() or '?'}; `benchmarks/gpu_job.py --device {args.device} --steps {args.steps}`: "
        "stories260K, LOMO, batch 8, 256 tokens, on the zero-configuration service.", "",
        "| what | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows.items()], "",
        "Events:", "", *[f"- {m}" for m in events], ""])
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"job": job, "metrics": metrics, "memory": memory,
                                                             "events": events}, indent=2, default=str))
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
