"""Run by tests/zero3/test_zero3.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

For each case: the same model is trained for a few steps (a) with ZeRO-3 across the ranks, each rank
taking its half of the global batch, and (b) in one process on the whole global batch, on every rank.
Rank 0 writes, per case, the largest difference between a partition and the same elements of (b).
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist

from lomo_core.optim import LOMO, AdaLomo
from lomo_core.zero3.comm import Partition

STEPS = 4
CASES = {
    "lomo": ("llama", LOMO, {"lr": 0.05}),
    "lomo_clip_norm": ("llama", LOMO, {"lr": 0.05, "clip_grad_norm": 0.5}),
    "lomo_clip_value_wd": ("gpt2", LOMO, {"lr": 0.05, "clip_grad_value": 0.01, "weight_decay": 0.1}),
    "adalomo": ("llama", AdaLomo, {"lr": 0.01}),
    "adalomo_clip_norm": ("gpt2", AdaLomo, {"lr": 0.01, "clip_grad_norm": 0.5, "weight_decay": 0.01}),
    # the first steps overflow (a huge loss scale): every rank must skip exactly the steps one process skips
    "lomo_overflow": ("llama", LOMO, {"lr": 0.05, "loss_scale_args": {
        "enabled": True, "init_scale": 2.0**125, "scale_factor": 2.0**40, "scale_window": 1000}}),
    # non-reentrant activation checkpointing of the ZeRO-3 model only
    "lomo_checkpointing": ("llama", LOMO, {"lr": 0.05, "clip_grad_norm": 0.5}),
    # bf16 parameters (DeepSpeed's bf16 flag), the update in fp32 arithmetic
    "lomo_bf16": ("llama", LOMO, {"lr": 0.05, "clip_grad_norm": 0.5}),
    "adalomo_bf16": ("gpt2", AdaLomo, {"lr": 0.01}),
}
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
    "stage": 3, "stage3_param_persistence_threshold": 0}}


def build(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":  # tied embeddings: one parameter with two gradient contributions
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config)
    # odd sizes everywhere: partitions split rows and the last one is padded
    config = GPT2Config(vocab_size=97, n_embd=33, n_layer=2, n_head=3, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # The key part of this bias has a gradient that is zero in exact arithmetic (softmax ignores a shift),
    # so its computed gradient is rounding noise, which AdaLomo normalises to steps of size lr * eps:
    # the two runs differ there by noise, not by the algorithm. Frozen, it also tests frozen parameters.
    for block in model.transformer.h:
        block.attn.c_attn.bias.requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (arch, opt_cls, kwargs) in CASES.items():
        bf16 = name.endswith("_bf16")
        config = {**DS_CONFIG, "bf16": {"enabled": True}} if bf16 else DS_CONFIG
        reference = build(arch).to(torch.bfloat16) if bf16 else build(arch)
        with deepspeed.zero.Init(config_dict_or_path=config):  # the dtype comes from the config
            model = build(arch)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
            if rank == 0:  # start from exactly the reference's weights
                for pname, p in model.named_parameters():
                    p.copy_(reference.state_dict()[pname])
        if name == "lomo_checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sharded_opt = opt_cls(model, engine=engine, **kwargs)
        reference_opt = opt_cls(reference, **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            batch = torch.randint(0, 97, (2 * world, 12), generator=g)
            local = batch.chunk(world)[rank]
            sharded_opt.step(lambda local=local, model=model: model(input_ids=local, labels=local).loss)
            reference_opt.step(lambda batch=batch, ref=reference: ref(input_ids=batch, labels=batch).loss)
        worst, scale = 0.0, 0.0
        full = reference.state_dict()
        for pname, p in model.named_parameters():
            part = Partition.of(p, rank)  # frozen parameters too: they must not have moved
            expected = full[pname].reshape(-1)[part.start:part.start + part.valid]
            assert p.ds_tensor.dtype == expected.dtype, (pname, p.ds_tensor.dtype, expected.dtype)
            worst = max(worst, (p.ds_tensor[: part.valid].float() - expected.float()).abs().max().item())
            scale = max(scale, expected.float().abs().max().item())
        start = build(arch).to(torch.bfloat16) if bf16 else build(arch)
        moved = max((full[n].float() - v.float()).abs().max().item() for n, v in start.state_dict().items())
        stats = torch.tensor([worst, scale, moved])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        padded_grad_bytes = sum(part.size * world * 4 for part in sharded_opt.partitions.values())
        results[name] = {"max_diff": stats[0].item(), "max_abs": stats[1].item(), "moved": stats[2].item(),
                         "steps": STEPS, "world": world, "padded_grad_bytes": padded_grad_bytes,
                         "norm_pass": sharded_opt.needs_norm_pass,
                         "grad_norm": sharded_opt.last_grad_norm, "reference_grad_norm": reference_opt.last_grad_norm,
                         "skipped": sharded_opt.skipped_steps, "reference_skipped": reference_opt.skipped_steps,
                         "bytes_sent": sharded_opt.comm.bytes_sent}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    dist.barrier()
    os._exit(0)  # skip DeepSpeed's slow teardown


if __name__ == "__main__":
    main()
