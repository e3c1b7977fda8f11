"""Calibration of the memory model: predicted against measured peak, one real training step per configuration.

Every configuration runs in a fresh process (several ranks: ``torch.distributed.run``, ZeRO-3): a
randomly initialised model is built from a config, LOMO takes one warmup step, then one step is measured
(CUDA allocator statistics, or PyTorch's MemTracker on the CPU; under ZeRO-3 the peak of each rank, the
largest reported). The prediction comes from ``lomo_core.memory_model.estimate`` with the same settings.

    .venv/bin/python benchmarks/bench_memory.py --out docs/benchmarks-memory.md       # CPU matrix (make bench-memory)
    .venv/bin/python benchmarks/bench_memory.py --preset gpu --out docs/benchmarks-memory-gpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ARCHS = {
    "llama": {"model_type": "llama", "vocab_size": 8000, "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 1024},
    "gpt2": {"model_type": "gpt2", "vocab_size": 8000, "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 1024,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0},
    # stories260K's shape (make demo's model): a small vocabulary, so attention, not the logits, sets the peak
    "tiny": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172,
             "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
             "max_position_embeddings": 512, "tie_word_embeddings": True},
    # a LLaMA-7B-sized model (random init): the GPU preset's reference point
    "llama7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 2048},
}
MiB = 1024**2
RESULT = "MEMORY_RESULT "


def matrix(preset: str) -> list[dict[str, Any]]:
    if preset == "gpu":
        return [dict(arch="llama7b", dtype="bf16", seq=seq, ckpt=ckpt, ranks=1, batch=4)
                for seq, ckpt in [(512, True), (1024, True), (512, False)]]
    single = [dict(arch=a, dtype=d, seq=s, ckpt=c, ranks=1, batch=2)
              for a, d, s, c in itertools.product(("llama", "gpt2"), ("fp32", "bf16"), (128, 512), (False, True))]
    ranked = [dict(arch=a, dtype="fp32", seq=s, ckpt=False, ranks=2, batch=4)
              for a, s in itertools.product(("llama", "gpt2"), (128, 512))]
    # padded batches (a quarter of each row is padding, as instruction data has): the attention mask
    # changes the CPU's attention kernel; and the chunked loss
    padded = [dict(arch="tiny", dtype="fp32", seq=256, ckpt=c, ranks=1, batch=8, padded=True, chunk=k)
              for c, k in itertools.product((False, True), (None, 256))]
    padded.append(dict(arch="llama", dtype="fp32", seq=512, ckpt=False, ranks=1, batch=2, padded=True, chunk=None))
    return single + ranked + padded


# ---------------------------------------------------------------------------------------------- one run
def worker(cfg: dict[str, Any]) -> None:
    import torch

    from lomo_core.memory import StepMemoryMeter
    from lomo_core.memory_model import estimate, model_shape
    from lomo_core.optim import LOMO

    ranks = cfg["ranks"]
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    config_dict = ARCHS[cfg["arch"]]
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    engine, rank = None, 0
    if ranks > 1:
        import deepspeed
        import torch.distributed as dist

        from lomo_core.zero3.runtime import ds_config

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        rank = dist.get_rank()
        ds = ds_config(cfg["batch"], cfg["dtype"])
        model_class = AutoModelForCausalLM._model_mapping[type(config)]  # from_config fails under zero.Init
        with deepspeed.zero.Init(config_dict_or_path=ds):  # the dtype comes from the config (bf16 flag)
            torch.manual_seed(0)
            model = model_class(config)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.config.use_cache = False
    if cfg["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = LOMO(model, lr=1e-4, engine=engine)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.vocab_size, (cfg["batch"], cfg["seq"]), generator=g)
    local = batch.chunk(ranks)[rank].to(device)
    inputs = {"input_ids": local, "labels": local}
    if cfg.get("padded"):
        mask = torch.ones_like(local)
        mask[:, -cfg["seq"] // 4:] = 0
        inputs = {"input_ids": local, "attention_mask": mask, "labels": local.masked_fill(mask == 0, -100)}

    def closure():
        if cfg.get("chunk"):
            from lomo_core.loss import chunked_causal_lm_loss

            return chunked_causal_lm_loss(model, inputs, cfg["chunk"])
        return model(**inputs).loss

    optimizer.step(closure)  # warmup
    meter = StepMemoryMeter(model, optimizer, device)
    with meter.measure() as measured:
        optimizer.step(closure)
    report = measured.report.as_dict()
    predicted = estimate(model_shape(config_dict), optimizer="lomo", dtype=cfg["dtype"], batch_size=cfg["batch"],
                         seq_len=cfg["seq"], gradient_checkpointing=cfg["ckpt"], gpus=ranks,
                         loss_chunk_size=cfg.get("chunk"),
                         device="cuda" if cuda else "cpu")
    result = {**cfg, "measured": report, "predicted": predicted.as_dict(), "rank": rank}
    if ranks > 1:
        import torch.distributed as dist

        everyone: list[Any] = [None] * ranks
        dist.all_gather_object(everyone, result)
        if rank == 0:
            result = max(everyone, key=lambda r: r["measured"]["peak_bytes"])
            print(RESULT + json.dumps(result), flush=True)
        dist.barrier()
        os._exit(0)
    print(RESULT + json.dumps(result), flush=True)


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    if cfg["ranks"] > 1:
        import torch

        if not torch.cuda.is_available():
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg["ranks"]),
               *script]
    else:
        cmd = [sys.executable, *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {**cfg, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def report(results: list[dict[str, Any]], command: str, preset: str) -> str:
    lines = [
        "# Memory model calibration: predicted against measured peak", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; preset `{preset}`. LOMO, one measured step "
        "after one warmup step; models of `benchmarks/bench_memory.py` (random init); batch is the global batch "
        "(split over the ranks); with 2 ranks, ZeRO-3 and the larger rank's peak.", "",
        "| model | dtype | seq | checkpointing | ranks | batch | batches | measured MiB | predicted MiB | error | "
        "measured activations | predicted activations |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    errors = []
    for r in results:
        ckpt = "on" if r["ckpt"] else "off"
        kind = ("padded" if r.get("padded") else "full") + (f", loss chunk {r['chunk']}" if r.get("chunk") else "")
        head = f"| {r['arch']} | {r['dtype']} | {r['seq']} | {ckpt} | {r['ranks']} | {r['batch']} | {kind} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | |")
            continue
        measured, predicted = r["measured"]["peak_bytes"], r["predicted"]["peak_bytes"]
        error = predicted / measured - 1
        errors.append(abs(error))
        acts = r["measured"]["activations_bytes"] / MiB, r["predicted"]["activations_bytes"] / MiB
        lines.append(f"{head} {measured / MiB:.1f} | {predicted / MiB:.1f} | {error * 100:+.1f}% | "
                     f"{acts[0]:.1f} | {acts[1]:.1f} |")
    if errors:
        within = sum(e <= 0.10 for e in errors)
        lines += ["", f"Within 10% of the measured peak: {within} of {len(errors)} configurations (target: all); "
                      f"largest error {max(errors) * 100:.1f}%, mean {sum(errors) / len(errors) * 100:.1f}%."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    results = []
    for cfg in matrix(args.preset):
        result = run_one(cfg)
        results.append(result)
        if "error" in result:
            print(f"{cfg}: failed: {result['error']}", flush=True)
        else:
            m, p = result["measured"]["peak_bytes"], result["predicted"]["peak_bytes"]
            print(f"{cfg}: measured {m / MiB:.1f} MiB, predicted {p / MiB:.1f} MiB ({(p / m - 1) * 100:+.1f}%)",
                  flush=True)
    text = report(results, "benchmarks/bench_memory.py " + shlex.join(argv), args.preset)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
