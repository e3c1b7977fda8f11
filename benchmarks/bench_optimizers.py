"""Speed and memory of LOMO / AdaLomo against standard optimizers and the reference ``lomo_optim.Lomo``.

One LLaMA-architecture causal LM (random init, ~134M parameters by default: hidden 768, 12 layers,
12 heads, intermediate 2048, vocabulary 32000, untied embeddings), the same seeded random token
batches for every method, for each requested dtype. Methods:

- ``forward_graph``: forward only, the autograd graph kept (no backward): the memory floor reference;
- ``adamw`` / ``sgd``: ``torch.optim.AdamW`` / ``torch.optim.SGD`` (standard backward + step);
- ``ref_lomo`` / ``ref_lomo_clip``: ``lomo_optim.Lomo`` without / with ``clip_grad_norm=1.0`` (two passes);
- ``lomo`` / ``lomo_clip`` / ``adalomo``: ``lomo_core.LOMO`` without / with ``clip_grad_norm=1.0``,
  ``lomo_core.AdaLomo``.

Every (method, dtype) runs in a fresh subprocess (this script re-invoked with ``--worker``), so the
process's peak RSS belongs to that configuration alone. A worker builds the model, runs ``--warmup``
steps, times ``--steps`` steps (tokens/s = batch * seq * steps / time), records the peak RSS, then
runs one more step under ``lomo_core.memory.StepMemoryMeter`` for the tracked peak and its breakdown
(on the CPU that tracker is slow, hence a single step), and prints one JSON line. The parent collects
the lines and writes a markdown report with derived checks against the targets.

    .venv/bin/python benchmarks/bench_optimizers.py --out docs/benchmarks.md
    .venv/bin/python benchmarks/bench_optimizers.py --hidden 64 --layers 2 --seq 32 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

METHODS = ["forward_graph", "adamw", "sgd", "ref_lomo", "ref_lomo_clip", "lomo", "lomo_clip", "adalomo"]
DTYPES = ["fp32", "bf16"]
RESULT_PREFIX = "BENCH_RESULT "
RELATED = """
## Other reports

- [benchmarks-chunked-loss.md](benchmarks-chunked-loss.md): the same comparison with `loss_chunk_size`.
- [benchmarks-hook-overhead.md](benchmarks-hook-overhead.md): per-step cost of the hooks as parameter tensors grow.
- [benchmarks-zero3.md](benchmarks-zero3.md): ZeRO-3 across 2 ranks against the reference `lomo_optim` in its
  ZeRO-3 mode: step time, per-rank peak memory, bytes each rank sends per step (`benchmarks/bench_zero3.py`).
- [benchmarks-memory.md](benchmarks-memory.md): the memory model's predictions against 25 measured steps
  (`make bench-memory`): 24 within 10%, mean error 3.0%.
- [benchmarks-evals.md](benchmarks-evals.md): evaluation with lm-eval on the CPU (`benchmarks/bench_evals.py
  --job`): 4 to 123 examples/s per task for stories260K; BoolQ, COPA and perplexity at 100 documents on the
  base and the fine-tuned model add 79 s to a 13 s training job.
- [benchmarks-recovery.md](benchmarks-recovery.md): a worker SIGKILLed at a random step mid-job
  (`benchmarks/bench_recovery.py --kills 5 --timeout 4 --save-every 5,10,20`, and `--timeout 60`): the job
  runs again on the other worker after a median 4.1-4.6 s with a 4 s heartbeat timeout, 63.7 s with the
  default 60 s; it redoes the steps after its last checkpoint, on average about half the interval (means
  2.6, 3.4 and 15.0 steps at intervals of 5, 10 and 20).
- [benchmarks-scheduler.md](benchmarks-scheduler.md): the scheduler at scale, by simulation
  (`benchmarks/bench_scheduler.py`): a synthetic week of LLaMA 7B-65B jobs on 1 node x 8 GPUs and 10,000 jobs on
  8 x 8, through the real rule against strict FIFO and one job per node: on 8 nodes at 90% load 86.4% GPU
  utilisation (`backfill_limit` 0 86.5%, one job per node 35.3%), p95 wait 20.3 h (20.0 h, 1,579 h), since a job
  at the backfill limit is held for on one node, not on every node where it fits (before commit adc7e3f 83.2% and
  63.9 h, FIFO 81.6% and 87.0 h; 1 node unchanged); the GPU-hours held idle for a job halved (5,480, before
  10,654), but 4,490 of them are still on nodes it did not start on (before 9,167): the holder is the first node
  to decide, mostly a full one; one `start_next` on Postgres over 10,000 queued jobs 152 ms median, p99 under 5%
  of the 15 s wake-up interval.
"""
MiB = 1024**2


# ---------------------------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,bf16")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup steps per configuration")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (heads = hidden // 64)")
    p.add_argument("--layers", type=int, default=12, help="number of decoder layers")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP size (None: 8/3 * hidden rounded up to a multiple of 64, 2048 for 768)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every configuration this many times, round-robin, and report the fastest run "
                        "(for machines where other work competes for the CPUs)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="compute the loss with lomo_core.loss.chunked_causal_lm_loss in chunks of this many tokens "
                        "(no full logits held); 0: the model's own loss")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate for every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: the usable CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out", default=None, help="markdown report to write (the report is printed in any case)")
    p.add_argument("--json", default=None, help="also write the raw per-worker results to this JSON file")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per worker")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [m for m in args.methods if m not in METHODS] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown method/dtype: {bad}")
    if args.intermediate is None:
        args.intermediate = -(-(8 * args.hidden // 3) // 64) * 64
    if args.threads is None:
        args.threads = usable_cpus()
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1 or args.loss_chunk < 0:
        p.error("--steps and --repeat must be >= 1, --warmup >= 0")
    return args


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_argv(args: argparse.Namespace, method: str, dtype: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", method, dtype,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq", str(args.seq),
        "--batch", str(args.batch), "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--intermediate", str(args.intermediate), "--vocab", str(args.vocab), "--lr", repr(args.lr),
        "--seed", str(args.seed), "--loss-chunk", str(args.loss_chunk), "--threads", str(args.threads),
        "--device", args.device,
    ]


# ---------------------------------------------------------------------------------------------- worker
def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def lomo_core_digest() -> str:
    """Short hash of the lomo_core sources this benchmark runs (the optimizers and the memory meter), as this
    process sees them: detects code changed mid-run."""
    import hashlib

    h = hashlib.sha1()
    root = REPO_ROOT / "lomo_core"
    files = [root / "__init__.py", root / "memory.py", *(root / "optim").rglob("*.py")]
    for f in sorted(f for f in files if f.is_file()):
        h.update(f.relative_to(REPO_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lomo_core"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (lomo_core modified)" if dirty else "")


def cpu_busy_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (None where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / hz, steal / hz


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def build_model(args: argparse.Namespace, dtype: Any, device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    # Built directly in the target dtype (no transient fp32 copy in the bf16 process's peak RSS).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    return model


def make_batches(args: argparse.Namespace, count: int, device: Any) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(count)]


def make_step(method: str, model: Any, lr: float, loss_chunk: int = 0) -> tuple[Any, Any]:
    """Returns (optimizer or None, step(batch) -> loss float) for one method."""
    import torch

    def forward(batch: Any) -> Any:
        if loss_chunk:
            from lomo_core.loss import chunked_causal_lm_loss

            return chunked_causal_lm_loss(model, {"input_ids": batch, "labels": batch}, loss_chunk)
        return model(input_ids=batch, labels=batch).loss

    if method == "forward_graph":
        def step(batch: Any) -> float:
            loss = forward(batch)  # the graph stays alive until `loss` goes out of scope
            return float(loss.detach())
        return None, step

    if method in ("adamw", "sgd"):
        opt = (torch.optim.AdamW(model.parameters(), lr=lr) if method == "adamw"
               else torch.optim.SGD(model.parameters(), lr=lr))

        def step(batch: Any) -> float:
            opt.zero_grad(set_to_none=True)  # before backward: gradients are alive at the step's end
            loss = forward(batch)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return opt, step

    if method in ("ref_lomo", "ref_lomo_clip"):
        from lomo_optim import Lomo

        clip = 1.0 if method == "ref_lomo_clip" else None
        opt = Lomo(model, lr=lr, clip_grad_norm=clip)

        def step(batch: Any) -> float:
            loss = forward(batch)
            if clip is not None:
                opt.grad_norm(loss)
            opt.fused_backward(loss, lr)
            return float(loss.detach())
        return opt, step

    from lomo_core import LOMO, AdaLomo

    if method == "adalomo":
        opt = AdaLomo(model, lr=lr)
    else:
        opt = LOMO(model, lr=lr, clip_grad_norm=1.0 if method == "lomo_clip" else None)

    def step(batch: Any) -> float:
        return float(opt.step(lambda: forward(batch)))
    return opt, step


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lomo_core.memory import StepMemoryMeter, peak_rss_bytes

    method, dtype_name = args.worker
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    digest = lomo_core_digest()
    rss_start = current_rss_bytes()
    model = build_model(args, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(model.parameters(), key=lambda p: p.numel())
    largest_name = next(n for n, p in model.named_parameters() if p is largest)
    gc.collect()
    baseline_rss = current_rss_bytes()
    baseline_peak_rss = peak_rss_bytes()

    batches = make_batches(args, args.warmup + args.steps + 1, device)
    opt, step = make_step(method, model, args.lr, args.loss_chunk)

    losses = []
    for i in range(args.warmup):
        losses.append(step(batches[i]))
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    machine0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(batches[i]))
        sync()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    machine1, own1 = cpu_busy_seconds(), own_cpu_seconds()
    peak_rss = peak_rss_bytes()
    # CPU time other processes used while the timed steps ran, as a fraction of all CPUs' time: well
    # above 0 means the timings competed with something else and are pessimistic.
    ncpu = os.cpu_count() or 1
    foreign = steal = None
    if machine0 is not None and machine1 is not None:
        foreign = max(0.0, (machine1[0] - machine0[0]) - (own1 - own0)) / (wall * ncpu)
        steal = (machine1[1] - machine0[1]) / (wall * ncpu)
    device_peak = torch.cuda.max_memory_allocated(device) if cuda else None

    # One more step under the memory meter (slow on the CPU: tensor-level tracking).
    if opt is not None and method in ("adamw", "sgd"):
        opt.zero_grad(set_to_none=True)  # last step's gradients must not count as "other"
    gc.collect()
    meter = StepMemoryMeter(model, opt, device)
    t0 = time.perf_counter()
    with meter.measure() as measured:
        losses.append(step(batches[-1]))
    sync()
    meter_s = time.perf_counter() - t0
    report = measured.report
    assert report is not None

    tokens = args.batch * args.seq * args.steps
    return {
        "method": method, "dtype": dtype_name, "device": str(device), "lomo_core_digest": digest,
        "threads": torch.get_num_threads(),
        "n_params": n_params, "largest_param": largest_name, "largest_param_numel": largest.numel(),
        "dtype_bytes": largest.element_size(),
        "step_times_s": times, "tokens_per_s": tokens / sum(times),
        "rss_start_bytes": rss_start, "baseline_rss_bytes": baseline_rss,
        "baseline_peak_rss_bytes": baseline_peak_rss, "peak_rss_bytes": peak_rss,
        "device_peak_bytes": device_peak,
        "memory": report.as_dict(), "meter_step_s": meter_s,
        "foreign_cpu_frac": foreign, "steal_cpu_frac": steal, "own_cpu_per_wall": (own1 - own0) / wall,
        "load_avg": os.getloadavg(),
        "losses": losses, "finite": all(x == x and abs(x) != float("inf") for x in losses),
    }


# ---------------------------------------------------------------------------------------------- parent
def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu_model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        ref_version = version("lomo-optim")
    except Exception:  # noqa: BLE001 - informational only
        ref_version = "not installed"
    info = {
        "cpu": cpu_model, "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "lomo_optim": ref_version,
        "git": git_revision(), "lomo_core_digest": lomo_core_digest(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_one(args: argparse.Namespace, method: str, dtype: str) -> dict[str, Any]:
    cmd = worker_argv(args, method, dtype)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"method": method, "dtype": dtype, "error": f"timed out after {args.timeout:.0f}s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["worker_wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"method": method, "dtype": dtype, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def fmt_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | dtype | tokens/s | peak RSS MiB | RSS after build MiB | tracked peak MiB | params MiB "
        "| grads MiB | opt state MiB | activations MiB | other MiB | last loss | other CPU % | runs tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | ERROR: {r['error'][:300]} |" + " |" * 12)
            continue
        m = r["memory"]
        flag = "" if r["finite"] else " (non-finite loss!)"
        lines.append(
            f"| {r['method']}{flag} | {r['dtype']} | {r['tokens_per_s']:.1f} | {mib(r['peak_rss_bytes'])} "
            f"| {mib(r['baseline_rss_bytes'])} | {mib(m['peak_bytes'])} | {mib(m['parameters_bytes'])} "
            f"| {mib(m['gradients_bytes'])} | {mib(m['optimizer_state_bytes'])} "
            f"| {mib(m['activations_bytes'])} | {mib(m['other_bytes'])} | {r['losses'][-1]:.6f} "
            f"| {pct(r.get('foreign_cpu_frac'))} | {', '.join(f'{x:.0f}' for x in r['runs_tokens_per_s'])} |"
        )
    return lines


def derived_checks(results: list[dict[str, Any]], dtypes: list[str]) -> list[str]:
    by = {(r["method"], r["dtype"]): r for r in results if "error" not in r}
    lines = ["| dtype | check | value | target | result |", "| --- | --- | --- | --- | --- |"]

    def row(dtype: str, check: str, value: str, target: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"| {dtype} | {check} | {value} | {target} | {verdict} |")

    for dtype in dtypes:
        fg, lomo = by.get(("forward_graph", dtype)), by.get(("lomo", dtype))
        ref, sgd = by.get(("ref_lomo", dtype)), by.get(("sgd", dtype))
        clip, ref_clip = by.get(("lomo_clip", dtype)), by.get(("ref_lomo_clip", dtype))
        if fg and lomo:
            grad = lomo["largest_param_numel"] * lomo["dtype_bytes"]
            floor = fg["memory"]["peak_bytes"] + grad
            ratio = lomo["memory"]["peak_bytes"] / floor
            row(dtype, "LOMO tracked peak / floor (forward_graph peak + largest gradient "
                f"{mib(grad)} MiB = {mib(floor)} MiB)", f"{mib(lomo['memory']['peak_bytes'])} MiB = {ratio:.3f}x",
                "<= 1.05x", ratio <= 1.05)
        if lomo and ref:
            a, b = lomo["memory"]["peak_bytes"], ref["memory"]["peak_bytes"]
            row(dtype, "LOMO tracked peak vs ref_lomo", f"{mib(a)} vs {mib(b)} MiB ({a / b:.3f}x)", "below",
                a < b)
            a, b = lomo["peak_rss_bytes"], ref["peak_rss_bytes"]
            row(dtype, "LOMO peak RSS vs ref_lomo (informational)", f"{mib(a)} vs {mib(b)} MiB ({a / b:.3f}x)",
                "below", a < b)
        if lomo and sgd:
            a, b = lomo["tokens_per_s"], sgd["tokens_per_s"]
            row(dtype, "LOMO tokens/s vs SGD", f"{a:.1f} vs {b:.1f} ({a / b:.3f}x)", ">= 1.00x", a >= b)
        if lomo and ref:
            a, b = lomo["tokens_per_s"], ref["tokens_per_s"]
            row(dtype, "LOMO tokens/s vs ref_lomo", f"{a:.1f} vs {b:.1f} ({a / b:.3f}x)", ">= 1.05x",
                a >= 1.05 * b)
        if clip and ref_clip:
            a, b = clip["tokens_per_s"], ref_clip["tokens_per_s"]
            row(dtype, "lomo_clip tokens/s vs ref_lomo_clip", f"{a:.1f} vs {b:.1f} ({a / b:.3f}x)", ">= 1.00x",
                a >= b)
    return lines


def render(args: argparse.Namespace, command: str, info: dict[str, Any], results: list[dict[str, Any]],
           wall_s: float) -> str:
    ok = [r for r in results if "error" not in r]
    n_params = ok[0]["n_params"] if ok else None
    digests = sorted({r["lomo_core_digest"] for r in ok} | {info["lomo_core_digest"]})
    code = f"repo {info['git']}, lomo_core sources {info['lomo_core_digest']}"
    if len(digests) > 1:
        code += f" -- WARNING: lomo_core changed during the run (workers saw {', '.join(digests)})"
    largest = f"{ok[0]['largest_param']} ({ok[0]['largest_param_numel']:,})" if ok else "?"
    out = [
        "# Optimizer benchmark: LOMO / AdaLomo vs AdamW, SGD and lomo_optim.Lomo",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {info['cpu']}, {info['cpu_count']} CPUs ({info['usable_cpus']} usable), "
        f"{info.get('ram_gib', '?')} GiB RAM" + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        f"- Software: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"lomo-optim {info['lomo_optim']}; {info['platform']}",
        f"- Code: {code}",
        f"- Model: LLaMA architecture, random init, hidden {args.hidden}, {args.layers} layers, "
        f"{max(1, args.hidden // 64)} heads, intermediate {args.intermediate}, vocab {args.vocab}, untied "
        f"embeddings: {n_params:,} parameters; largest {largest}" if n_params else "- Model: ?",
        f"- Run: device {args.device}, {args.threads} threads, batch {args.batch} x seq {args.seq} "
        f"= {args.batch * args.seq} tokens/step, {args.warmup} warmup + {args.steps} timed steps, lr {args.lr}, "
        f"seed {args.seed}, loss "
        + (f"chunked ({args.loss_chunk} tokens per chunk)" if args.loss_chunk else "the model's own")
        + "; each (method, dtype) in a fresh process"
        + (f", {args.repeat} runs round-robin, the fastest reported" if args.repeat > 1 else ""),
        f"- Total wall time: {wall_s / 60:.1f} min",
        "",
        "## Results",
        "",
        *fmt_table(results),
        "",
        "## Checks against the targets",
        "",
        *derived_checks(results, args.dtypes),
        "",
        "## How to read this",
        "",
        "- tokens/s: batch * seq * timed steps / their wall time (forward_graph: forward only).",
        "- peak RSS: the worker process's peak resident set (`ru_maxrss`) after the timed steps: the whole "
        "process, Python and libraries included; 'RSS after build' is the resident set once the model exists.",
        "- tracked peak and breakdown: one extra step under `lomo_core.memory.StepMemoryMeter` "
        "(CPU: torch's MemTracker, tensor storages only; CUDA: allocator statistics). grads: for LOMO / "
        "AdaLomo the largest gradient alive at once, for AdamW / SGD all gradients; for ref_lomo the reference "
        "frees its gradients inside backward, so they are counted under activations (0 here).",
        "- last loss: the loss of the metered step (same batches and lr everywhere: SGD, LOMO and ref_lomo "
        "should agree, the clipped pair with each other). other CPU %: CPU time that other processes "
        "used during the timed steps, as a share of all CPUs (from /proc/stat): well above 0 means the "
        "configuration competed for the CPUs and its tokens/s is pessimistic; with --repeat the fastest run "
        "of each configuration is reported (all runs in the runs column).",
        "- floor: forward_graph's tracked peak (parameters + saved activations + logits) plus one gradient of "
        "the largest parameter: what a fused update cannot go below.",
        "- With the model's own loss the tracked peak of SGD, ref_lomo and LOMO is normally set by the "
        "cross-entropy backward (three fp32 batch x seq x vocab tensors) before any parameter has a gradient, "
        "so it does not depend on the optimizer; `--loss-chunk N` removes that term.",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    info = machine_info()
    print(f"command: {command}", flush=True)
    print("machine: " + json.dumps(info), flush=True)
    t_start = time.perf_counter()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i in range(args.repeat):
        for dtype in args.dtypes:
            for method in args.methods:
                print(f"[{time.perf_counter() - t_start:7.0f}s] run {i + 1}/{args.repeat} {method} {dtype} ...",
                      end=" ", flush=True)
                r = run_one(args, method, dtype)
                runs.setdefault((method, dtype), []).append(r)
                if "error" in r:
                    print("ERROR " + r["error"], flush=True)
                else:
                    print(f"{r['tokens_per_s']:.1f} tok/s (other CPU {pct(r['foreign_cpu_frac'])}%), peak RSS "
                          f"{mib(r['peak_rss_bytes'])} MiB, tracked peak {mib(r['memory']['peak_bytes'])} MiB, "
                          f"{r['n_params']:,} params ({r['worker_wall_s']:.0f}s)", flush=True)
    wall = time.perf_counter() - t_start
    results = []
    for rs in runs.values():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results.append(rs[0])
            continue
        best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
        best["runs_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
        best["failed_runs"] = len(rs) - len(ok)
        results.append(best)
    text = render(args, command, info, results, wall) + RELATED
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": info, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
