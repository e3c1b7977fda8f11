"""Evaluation throughput of ``lomo_core.evals.evaluate`` (lm-eval underneath) per task, on the CPU.

The model is the real stories260K (../shared/models/stories260K) and the files the shared SuperGLUE
validation sets, LAMBADA and C4 (perplexity); each task scores its first ``--limit`` documents. The time
is the whole ``evaluate()`` call for that task (documents converted and written, lm-eval task built,
requests tokenized and scored, metrics aggregated), after one untimed warm-up task so that lm-eval's
import and the first forward pass are not charged to the first task. Throughput is documents per
second (MultiRC: answer options, which is what lm-eval calls documents).

    .venv/bin/python benchmarks/bench_evals.py --threads 1 --out docs/benchmarks-evals.md   # ~1-2 minutes
    .venv/bin/python benchmarks/bench_evals.py --limit 20 --tasks boolq,perplexity          # smoke

With ``--job`` it also measures the time evaluations add to a job: the worker's training process
(``python -m worker.runner``, as the service starts it) runs the same short fine-tuning job twice, without
and with ``evals`` (the base model scored before training, the fine-tuned one after), wall clock each.
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


INSTRUCT = SHARED / "data" / "instruct" / "alpaca_en_demo.json"
JOB_EVALS = ("boolq", "copa", "perplexity")


def run_job(folder: Path, limit: int, threads: int | None, with_evals: bool) -> float:
    """Wall seconds of one job's training process; with evals, the base and fine-tuned scoring too."""
    import json
    import threading

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": str(STORIES), "data": str(INSTRUCT), "output_dir": str(folder / "out"), "max_steps": 20,
              "batch_size": 4, "max_seq_len": 128, "lr": 5e-3, "device": "cpu"}
    (folder / "job-config.json").write_text(json.dumps(config))
    evals = [{"task": t, "file": str(FILES[t]), "limit": limit} for t in JOB_EVALS] if with_evals else []
    (folder / "evals.json").write_text(json.dumps(evals))
    read_fd, write_fd = os.pipe()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    tic = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "worker.runner", str(folder / "job-config.json"), "--fd",
                              str(write_fd)], pass_fds=(write_fd,), cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(os.fdopen(read_fd, "rb")), daemon=True)
    reader.start()
    code = child.wait()
    seconds = time.perf_counter() - tic
    reader.join()
    records = [json.loads(line) for line in lines if line.strip()]
    final = records[-1] if records else {}
    if code != 0 or final.get("kind") != "done":
        raise SystemExit(f"the job's training process failed ({code}): {final}")
    scored = sum(1 for r in records if r["kind"] == "eval")
    if with_evals and scored == 0:
        raise SystemExit("no evaluation was reported")
    return seconds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--tasks", default=",".join(FILES), help="comma-separated tasks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="default: the model's 512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--job", action="store_true", help="also time a job with and without evaluations")
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
    if args.job:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            plain = run_job(Path(tmp) / "plain", args.limit, args.threads, with_evals=False)
            scored = run_job(Path(tmp) / "scored", args.limit, args.threads, with_evals=True)
        lines += ["", "## Time evaluations add to a job", "",
                  f"The worker's training process (`python -m worker.runner`) on stories260K, 20 LOMO steps of "
                  f"batch 4 x 128 tokens on the Alpaca demo, without and with `evals` ({', '.join(JOB_EVALS)}, "
                  f"first {args.limit} documents each), scored on the base model before training and on the "
                  "fine-tuned model after. Wall clock of the whole process (start-up included).", "",
                  "| job | seconds |", "| --- | ---: |",
                  f"| training only | {plain:.1f} |", f"| training + evaluations | {scored:.1f} |",
                  f"| added by the evaluations (2 models x {len(JOB_EVALS)} tasks) | {scored - plain:.1f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
