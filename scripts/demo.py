"""`make demo`: fine-tune the real stories260K model with LOMO on the shared instruction data, then show
the loss curve, the measured memory breakdown and a generation before / after.

The job service (REST API + worker) is not built yet; until it is, the demo drives the same training
loop through the `lomo train` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "instruct" / "alpaca_en_demo.json"
OUT = ROOT / "runs" / "demo"
console = Console()


def generate(model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not MODEL.is_dir() or not DATA.is_file():
        console.print(f"[red]the demo reads {MODEL} and {DATA}; put ../shared beside the project[/]")
        return 1
    cmd = [sys.executable, "-m", "client.cli", "train", "--model", str(MODEL), "--data", str(DATA),
           "-o", str(OUT), "--optimizer", "lomo", "--lr", "5e-3", "--max-steps", "60", "--batch-size", "8",
           "--max-seq-len", "128", "--clip-grad-norm", "1.0", "--lr-schedule", "cosine", "--warmup-steps", "5",
           "--validation-split", "0.05", "--eval-every", "20", "--save-every", "30", "--loss-chunk-size", "256"]
    console.rule("[bold]LOMO fine-tuning of stories260K on 999 instruction rows")
    console.print(" ".join(cmd[1:]), style="dim")
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        return done.returncode

    records = [json.loads(line) for line in (OUT / "metrics.jsonl").read_text().splitlines()]
    last_start = max(i for i, r in enumerate(records) if r["kind"] == "start")
    records = records[last_start:]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    table = Table(title="loss curve (every 10 steps)")
    for col in ("step", "train loss", "lr", "tokens/s"):
        table.add_column(col, justify="right")
    for r in train[::10] + [train[-1]]:
        table.add_row(str(r["step"]), f"{r['loss']:.4f}", f"{r['lr']:.2e}", f"{r['tokens_per_s']:.0f}")
    console.print(table)
    console.print("validation loss: " + ", ".join(f"step {r['step']}: {r['loss']:.4f}" for r in val))

    memory = json.loads((OUT / "memory.json").read_text())
    mem = Table(title=f"measured memory of one step ({memory['source']})")
    mem.add_column("part")
    mem.add_column("MiB", justify="right")
    for key in ("parameters", "gradients", "optimizer_state", "activations", "other", "peak"):
        mem.add_row(key.replace("_", " "), f"{memory[key + '_bytes'] / 2**20:.2f}")
    console.print(mem)

    prompt = "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
    console.print("[bold]before:[/] " + generate(MODEL, prompt))
    console.print("[bold]after: [/] " + generate(OUT / "model", prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
