"""ZeRO-3 across ranks: this implementation against the reference ``lomo_optim.Lomo`` in its ZeRO-3 mode.

Same model (LLaMA architecture, random init, untied), same seeded batches, same DeepSpeed ZeRO-3
configuration (no DeepSpeed optimizer, nothing persisted between steps), N ranks. For each method:
step time (median of the timed steps, a barrier on both sides), bytes each rank sends per step (all
collectives, ring algorithms: an all-gather / reduce-scatter of S bytes sends (N-1)/N * S, an all-reduce
twice that), split into DeepSpeed's parameter all-gathers and the optimizer's gradient traffic, and the
peak tensor memory of one step on each rank (CUDA allocator, or PyTorch's MemTracker on the CPU).

Methods: ``lomo`` / ``lomo_clip`` (``lomo_core.LOMO`` without / with ``clip_grad_norm=1.0``),
``ref_lomo`` / ``ref_lomo_clip`` (``lomo_optim.Lomo``, the same), ``adalomo`` and ``ref_adalomo``.
With norm clipping both run the forward twice (a retained graph cannot be backpropagated twice under
ZeRO-3). After each step both release DeepSpeed's gathered copies (``partition_all_parameters``),
without which the reference's updates of ``ds_tensor`` would not reach the next forward.

    .venv/bin/python benchmarks/bench_zero3.py --out docs/benchmarks-zero3.md           # CPU, 2 ranks (gloo)
    .venv/bin/python benchmarks/bench_zero3.py --preset gpu --out docs/benchmarks-zero3-gpu.md   # all GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

METHODS = ["lomo", "ref_lomo", "lomo_clip", "ref_lomo_clip", "adalomo", "ref_adalomo"]
PRESETS = {
    # 2 CPU ranks, about 45M parameters: a few seconds a step on 2 cores
    "cpu": dict(nproc=2, hidden=512, layers=6, intermediate=1376, vocab=16000, batch=2, seq=256, steps=4),
    # every GPU of the node, a 1.3B-parameter model in bf16: well under 10 minutes on 2-8 GPUs
    "gpu": dict(nproc=0, hidden=2048, layers=24, intermediate=5504, vocab=32000, batch=4, seq=1024, steps=5,
                dtype="bf16"),
}
MiB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nproc", type=int, help="ranks (default: the preset's; 0 = every GPU)")
    for name in ("hidden", "layers", "intermediate", "vocab", "batch", "seq", "steps"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in {"dtype": "fp32", **PRESETS[args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    return args


# ---------------------------------------------------------------------------------------------- one rank
def rank_worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lomo_core.optim import LOMO, AdaLomo
    from lomo_core.zero3.runtime import CollectiveCounter, ds_config

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = ds_config(args.batch, args.dtype)
    keep = HfDeepSpeedConfig(config)  # the reference detects ZeRO-3 through transformers  # noqa: F841
    model_config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                               num_key_value_heads=max(1, args.hidden // 64), tie_word_embeddings=False,
                               max_position_embeddings=max(args.seq, 64))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch * world, args.seq), generator=g)
               for _ in range(args.steps + 1)]
    results = []
    for method in args.methods:
        result: dict[str, Any] = {"method": method}
        try:
            # The dtype comes from the config (bf16 enabled or not). Passing dtype=torch.float32 here gives
            # bfloat16 parameters with DeepSpeed 0.19 on CPU ranks (seen): do not pass it.
            with deepspeed.zero.Init(config_dict_or_path=config):
                torch.manual_seed(0)
                model = LlamaForCausalLM(model_config)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            clip = 1.0 if method.endswith("_clip") else None
            if method.startswith("ref_"):
                from lomo_optim import AdaLomo as RefAdaLomo
                from lomo_optim import Lomo as RefLomo

                if "adalomo" in method:
                    opt = RefAdaLomo(model, lr=1e-3)
                else:
                    opt = RefLomo(model, lr=1e-3, clip_grad_norm=clip)
            else:
                opt = (AdaLomo(model, lr=1e-3, engine=engine) if method == "adalomo"
                       else LOMO(model, lr=1e-3, clip_grad_norm=clip, engine=engine))

            def loss_of(batch, model=model):
                local = batch.chunk(world)[rank].to(device)
                return model(input_ids=local, labels=local).loss

            def step(batch, opt=opt, engine=engine, method=method, clip=clip, tracker=None):
                if not method.startswith("ref_"):
                    opt.before_recompute = tracker.reset_mod_stats if tracker is not None else None
                    return opt.step(lambda: loss_of(batch)).item()
                loss = loss_of(batch)
                if clip is not None:
                    opt.grad_norm(loss)
                    engine.optimizer.partition_all_parameters()
                    if tracker is not None:
                        tracker.reset_mod_stats()
                    loss = loss_of(batch)  # the graph cannot be used twice under ZeRO-3
                opt.fused_backward(loss, 1e-3)
                engine.optimizer.partition_all_parameters()
                return loss.item()

            step(batches[0])  # warmup
            counter = CollectiveCounter()
            times, losses = [], []
            for batch in batches[1:]:
                dist.barrier()
                tic = time.perf_counter()
                with counter.counting():
                    losses.append(step(batch))
                dist.barrier()
                times.append(time.perf_counter() - tic)
            result["seconds_per_step"] = statistics.median(times)
            result["bytes_per_step"] = counter.bytes_sent // len(times)
            result["gather_bytes_per_step"] = counter.by_kind.get("all_gather_into_tensor", 0) // len(times)
            result["optimizer_bytes_per_step"] = result["bytes_per_step"] - result["gather_bytes_per_step"]
            result["loss"] = losses[-1]
            result["peak_bytes"] = _peak_of_one_step(step, batches[1], model, device)
            partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
            result["partition_bytes"] = partition
            result["model_bytes"] = sum(p.ds_numel * p.ds_tensor.element_size() for p in model.parameters())
            result["dtype"] = str(next(model.parameters()).ds_tensor.dtype).removeprefix("torch.")
            result["parameters"] = sum(p.ds_numel for p in model.parameters())
            del opt, engine, model
        except Exception as e:  # a method that crashes is a result too (the reference's ZeRO-3 AdaLomo)
            result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if rank == 0:
                traceback.print_exc()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        results.append(gathered)
    if rank == 0:
        args.result.write_text(json.dumps(results))
    dist.barrier()
    os._exit(0)


def _peak_of_one_step(step, batch, model, device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import warnings

    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        step(batch, tracker=tracker)
    return int(sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))


# ---------------------------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace, argv: list[str]) -> list[list[dict[str, Any]]]:
    """One fresh set of rank processes per method: a method's timings do not inherit the previous
    method's allocator state or DeepSpeed hooks (measured: the second method in a process ran up to
    30% slower, whichever it was)."""
    import tempfile

    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.preset == "gpu" else 2)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if args.preset == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    argv = [a for i, a in enumerate(argv) if a != "--methods" and (i == 0 or argv[i - 1] != "--methods")]
    results = []
    for method in args.methods:
        result = Path(tempfile.mkdtemp(prefix="bench-zero3-")) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), *argv, "--methods", method, "--rank-worker", "--result", str(result)]
        subprocess.run(cmd, env=env, check=True)
        results += json.loads(result.read_text())
    args.nproc = nproc
    return results


def _first(results: list[list[dict[str, Any]]], key: str, default: Any) -> Any:
    return next((ranks[0][key] for ranks in results if key in ranks[0]), default)


def report(args: argparse.Namespace, results: list[list[dict[str, Any]]], command: str) -> str:
    by = {ranks[0]["method"]: ranks for ranks in results}
    lines = [
        f"# ZeRO-3 across {args.nproc} ranks: LOMO / AdaLomo against the reference `lomo_optim`", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; preset `{args.preset}`: LLaMA architecture, "
        f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocabulary {args.vocab} "
        f"({_first(results, 'parameters', 0) / 1e6:.1f}M parameters, held as {_first(results, 'dtype', '?')}); "
        f"per rank batch {args.batch} x {args.seq} tokens; median of {args.steps} steps.", "",
        "| method | s / step | bytes sent / step / rank | of which gradients (optimizer) | parameter "
        "all-gathers | peak MiB per rank | partition MiB per rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in args.methods:
        ranks = by.get(method)
        if ranks is None:
            continue
        if any("error" in r for r in ranks):
            lines.append(f"| {method} | fails: {next(r['error'] for r in ranks if 'error' in r)} | | | | | |")
            continue
        r0 = ranks[0]
        peaks = " / ".join(f"{r['peak_bytes'] / MiB:.1f}" for r in ranks)
        parts = " / ".join(f"{r['partition_bytes'] / MiB:.1f}" for r in ranks)
        lines.append(f"| {method} | {r0['seconds_per_step']:.3f} | {r0['bytes_per_step'] / MiB:.2f} MiB | "
                     f"{r0['optimizer_bytes_per_step'] / MiB:.2f} MiB | {r0['gather_bytes_per_step'] / MiB:.2f} MiB | "
                     f"{peaks} | {parts} |")
    lines += ["", "Checks against the targets:", ""]
    model_mib = next((r[0]["model_bytes"] / MiB for r in results if "model_bytes" in r[0]), None)
    for ours, ref in (("lomo", "ref_lomo"), ("lomo_clip", "ref_lomo_clip")):
        if ours in by and ref in by and not any("error" in r for r in by[ours] + by[ref]):
            a, b = by[ours][0], by[ref][0]
            ratio = a["optimizer_bytes_per_step"] / max(b["optimizer_bytes_per_step"], 1)
            speed = b["seconds_per_step"] / a["seconds_per_step"]
            lines.append(f"- `{ours}`: gradient bytes per rank {ratio:.2f}x the reference's (target: 0.5, a "
                         f"reduce-scatter instead of an all-reduce); speed {speed:.2f}x the reference's; "
                         f"peak {a['peak_bytes'] / MiB:.1f} vs {b['peak_bytes'] / MiB:.1f} MiB.")
    if model_mib:
        part = by.get("lomo", [{}])[0].get("partition_bytes")
        if part:
            lines.append(f"- Parameters per rank: {part / MiB:.1f} MiB of a {model_mib:.1f} MiB model "
                         f"({part / MiB / model_mib:.3f}, target about 1/{args.nproc}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.rank_worker:
        rank_worker(args)
        return
    command = "benchmarks/bench_zero3.py " + shlex.join(argv)
    passthrough = [a for a in argv if not a.startswith("--out")]
    if args.out is not None and "--out" in passthrough:
        passthrough = passthrough[: passthrough.index("--out")] + passthrough[passthrough.index("--out") + 2:]
    results = launch(args, [a for a in passthrough if a != str(args.out)])
    text = report(args, results, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
