"""The training loop's distributed side: ranks, ZeRO-3 model loading, batch sharding, saving.

Started by ``torch.distributed.run`` (``lomo train --nproc N``): every rank runs the same loop on the same
global batches; rank r takes its share of each batch's rows, and the loss is weighted so that the mean
of the ranks' gradients is exactly the gradient of the whole batch's mean loss. NCCL on GPUs, gloo on
CPU (``DS_ACCELERATOR=cpu``), so CI runs real ranks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lomo_core.data import IGNORE_INDEX

SHARD_BYTES = 2 << 30  # safetensors files of the gathered model are cut at about this size


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """The ranks ``torch.distributed.run`` describes in the environment (one process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(ranks: Ranks, device: torch.device) -> None:
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def ds_config(batch_size: int, dtype: str) -> dict[str, Any]:
    """ZeRO-3 with no DeepSpeed optimizer: DeepSpeed partitions and gathers the parameters, the fused
    optimizer does the rest. Nothing stays gathered between steps (persistence threshold 0): the
    forward pass must always see the partitions the optimizer updated."""
    return {
        "train_micro_batch_size_per_gpu": max(1, batch_size),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": False},  # the fused optimizer scales fp16 losses itself
        "zero_allow_untested_optimizer": True,
    }


@dataclass
class Zero3Model:
    model: Any
    engine: Any
    hf_config: Any = field(repr=False)  # keeps transformers' ZeRO-3 integration alive


def load_zero3(folder: Path, dtype: torch.dtype, config: dict[str, Any]) -> Zero3Model:
    """Load a Hugging Face causal LM straight into ZeRO-3 partitions (no rank holds the whole model)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(config)  # from_pretrained then builds under deepspeed.zero.Init
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return Zero3Model(model, engine, hf_config)


# ---------------------------------------------------------------------------------------------- batches
def local_rows(batch: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch's rows. A rank left without rows (a last batch
    smaller than the number of ranks) gets a copy of row 0 with no labelled token: it still runs the
    forward and backward the collectives need, and contributes nothing."""
    rows = batch["input_ids"].shape[0]
    bounds = [rows * r // ranks.world for r in range(ranks.world + 1)]
    lo, hi = bounds[ranks.rank], bounds[ranks.rank + 1]
    if hi > lo:
        return {k: v[lo:hi] for k, v in batch.items()}
    local = {k: v[:1].clone() for k, v in batch.items()}
    local["labels"].fill_(IGNORE_INDEX)
    return local


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------- bytes
class CollectiveCounter:
    """Counts the bytes this rank sends through torch.distributed collectives (ring algorithms): the
    optimizer's reduce-scatters and DeepSpeed's parameter all-gathers alike. An all-gather or a
    reduce-scatter of a full tensor of S bytes sends (N-1)/N * S, an all-reduce twice that, a
    point-to-point send all of its tensor."""

    #: collective -> (factor, position and keyword of the full-size tensor)
    SPEC = {"all_gather_into_tensor": (1, 0, "output_tensor"), "reduce_scatter_tensor": (1, 1, "input"),
            "all_reduce": (2, 0, "tensor"), "broadcast": (1, 0, "tensor"),
            "isend": (0, 0, "tensor"), "send": (0, 0, "tensor")}  # factor 0: point to point, all of it

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.by_kind: dict[str, int] = {}  # bytes per collective (all_gather_into_tensor, reduce_scatter_tensor...)

    @contextmanager
    def counting(self) -> Iterator[CollectiveCounter]:
        world = dist.get_world_size()

        def wrap(name: str, original: Any) -> Any:
            factor, position, keyword = self.SPEC[name]

            def counted(*args: Any, **kwargs: Any) -> Any:
                tensor = args[position] if len(args) > position else kwargs.get(keyword)
                if tensor is None and name == "all_gather_into_tensor":
                    tensor = kwargs.get("output_tensor")
                if isinstance(tensor, torch.Tensor):
                    nbytes = tensor.numel() * tensor.element_size()
                    sent = factor * nbytes * (world - 1) // world if factor else nbytes
                    self.bytes_sent += sent
                    self.by_kind[name] = self.by_kind.get(name, 0) + sent
                return original(*args, **kwargs)

            return counted

        # The same functions are reached three ways: torch.distributed, its distributed_c10d module, and
        # the functions DeepSpeed's backend looked up once and keeps (its parameter all-gathers).
        targets: list[tuple[Any, str, str]] = []
        for module in (dist, dist.distributed_c10d):
            targets += [(module, name, name) for name in self.SPEC]
        backend = _deepspeed_backend()
        if backend is not None:
            targets += [(backend, "all_gather_function", "all_gather_into_tensor"),
                        (backend, "reduce_scatter_function", "reduce_scatter_tensor")]
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets if getattr(obj, attr, None) is not None]
        kinds = {(id(obj), attr): kind for obj, attr, kind in targets}
        for obj, attr, original in saved:
            setattr(obj, attr, wrap(kinds[(id(obj), attr)], original))
        try:
            yield self
        finally:
            for obj, attr, original in saved:
                setattr(obj, attr, original)


def _deepspeed_backend() -> Any:
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:
        return None
    return getattr(ds_comm, "cdb", None)


# ---------------------------------------------------------------------------------------------- saving
def _persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module.named_buffers(recurse=False):
            if name not in skip and buffer is not None:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def save_gathered(model: torch.nn.Module, tokenizer: Any, folder: Path, ranks: Ranks) -> None:
    """A Hugging Face folder of the whole model, written by rank 0, gathering one module at a time: no
    rank ever holds more than one module's full parameters plus one safetensors shard."""
    import deepspeed
    from safetensors.torch import save_file

    folder = Path(folder)
    if ranks.main:
        folder.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            for key in shard:
                weight_map[key] = name
        shard, shard_bytes = {}, 0

    seen: set[int] = set()
    for module_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if ranks.main:
                for name, p in params:
                    key = f"{module_name}.{name}" if module_name else name
                    shard[key] = p.detach().to("cpu", copy=True).contiguous()
                    shard_bytes += p.numel() * p.element_size()
                    total += p.numel() * p.element_size()
        if ranks.main and shard_bytes >= SHARD_BYTES:
            flush()
    if ranks.main:
        for key, buffer in _persistent_buffers(model):
            shard[key] = buffer.detach().to("cpu", copy=True).contiguous()
        flush()
        final = {}
        for index, name in enumerate(files, start=1):  # HF's naming: model-0000i-of-0000n.safetensors
            target = f"model-{index:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
            (folder / name).rename(folder / target)
            final[name] = target
        if len(files) > 1:
            index_file = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    dist.barrier()


def partition_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's partition of every parameter (what a partitioned checkpoint stores per rank)."""
    return {name: p.ds_tensor.detach().clone() for name, p in model.named_parameters()}


def load_partition_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in state or state[name].shape != p.ds_tensor.shape:
                raise ValueError(f"the checkpoint has no partition of {name!r} of this size: was it written "
                                 "with another number of ranks?")
            p.ds_tensor.copy_(state[name])
