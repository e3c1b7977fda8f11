"""Evaluation throughput of ``lomo_core.evals.evaluate`` (lm-eval underneath) per task, on the CPU.

The model is the real stories260K (../shared/models/stories260K) and the files the shared SuperGLUE
validation sets, LAMBADA and C4 (perplexity); each task scores its first ``--limit`` documents. The time
is the whole ``evaluate()`` call for that task (documents converted and written, lm-eval task built,
requests tokenized and scored, metrics aggregated), after one untimed warm-up task so that lm-eval's
import and the first forward pass are not charged to the first task. Throughput is documents per
second (MultiRC: answer options, which is what lm-eval calls documents).

    .venv/bin/python benchmarks/bench_evals.py --threads 1 --out docs/benchmarks-evals.md   # ~1-2 minutes
    .venv/bin/python benchmarks/bench_evals.py --limit 20 --tasks boolq,perplexity          # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED = REPO_ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SUPERGLUE = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "rte": "RTE", "wic": "WiC", "wsc": "WSC",
             "multirc": "MultiRC"}
FILES = {
    **{task: SHARED / "data" / "superglue" / folder / "val.jsonl" for task, folder in SUPERGLUE.items()},
    "perplexity": SHARED / "data" / "text" / "c4_demo.jsonl",
    "lambada": SHARED / "data" / "text" / "lambada_openai.jsonl",
}
HEADLINE = {"cb": ("acc", "f1"), "multirc": ("f1a", "em"), "perplexity": ("token_perplexity", "bits_per_byte"),
            "lambada": ("acc", "perplexity")}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--tasks", default=",".join(FILES), help="comma-separated tasks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="default: the model's 512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not STORIES.exists():
        print(f"{STORIES} is not present (../shared is read in place); nothing to measure", file=sys.stderr)
        return 1

    import torch

    from lomo_core.evals import EvalRequest, evaluate, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tokenizer = load_model(STORIES)
    evaluate(model, tokenizer, [EvalRequest("rte", FILES["rte"], limit=2)], model_ref="warm-up")  # untimed

    rows = []
    load = [os.getloadavg()[0]]
    for task in tasks:
        request = EvalRequest(task, FILES[task], limit=args.limit)
        tic = time.perf_counter()
        scores = evaluate(model, tokenizer, [request], model_ref="stories260K", batch_size=args.batch_size,
                          max_length=args.max_length)
        seconds = time.perf_counter() - tic
        values = {s.metric: s.value for s in scores}
        names = HEADLINE.get(task, ("acc",))
        shown = ", ".join(f"{n} {values[n]:.4g}" for n in names)
        rows.append((task, FILES[task].name, scores[0].examples, scores[0].truncated, seconds, shown))
        load.append(os.getloadavg()[0])
        print(f"{task}: {scores[0].examples} documents in {seconds:.1f}s ({scores[0].examples / seconds:.1f}/s); "
              f"{shown}", flush=True)

    import lm_eval

    lines = [
        "# Evaluation throughput (lm-eval on the CPU)", "",
        f"Command: `benchmarks/bench_evals.py {shlex.join(argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads: {torch.get_num_threads()}; "
        f"torch {torch.__version__}, lm-eval {lm_eval.__version__}; git {git_revision()}.  ",
        f"Model: stories260K (fp32, 512-token context); batch size {args.batch_size}; max length "
        f"{args.max_length or 'the model default (512)'}; first {args.limit} examples of each file. "
        f"1-minute load average during the run: {min(load):.2f} to {max(load):.2f} (a shared machine: "
        "figures above 2 mean other work was competing for the 2 cores).", "",
        "| task | file | examples | truncated | seconds | examples/s | metrics |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for task, name, examples, truncated, seconds, shown in rows:
        lines.append(f"| {task} | {name} | {examples} | {truncated} | {seconds:.1f} | {examples / seconds:.1f} "
                     f"| {shown} |")
    lines += ["", "Examples are lm-eval's documents: MultiRC's are answer options, perplexity's C4 records "
              "(whole web pages, scored in 512-token windows: `truncated` counts those longer than one window). "
              "The scores are those of a 260K-parameter model trained on children's stories: near chance on "
              "SuperGLUE (MultiRC: it never calls an answer correct, hence F1a 0), by design of the model, not "
              "of the harness."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
