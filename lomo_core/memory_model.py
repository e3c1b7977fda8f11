"""Predicted memory of a training job, per GPU, before it runs; and the fewest GPUs that hold it.

The model states are exact functions of the parameter count (read from the model's config on the meta
device, so no weights are loaded):

- parameters: P x bytes(dtype), divided over the GPUs under ZeRO-3;
- gradients: all of them (P x bytes) for SGD / AdamW; for LOMO / AdaLomo only the largest single
  gradient alive at once (whole, even under ZeRO-3: autograd produces it before the reduce-scatter);
- optimizer state: AdamW two moments, SGD none; in fp16 the usual mixed-precision recipe also keeps an
  fp32 master copy (the paper's accounting: AdamW 12 bytes / parameter, SGD 4); LOMO none; AdaLomo a
  row and a column statistic per matrix, fp32.

For LLaMA-7B in fp16 this gives the paper's figures (arXiv 2306.09782, Table 1): parameters 12.55 GB,
gradients 12.55 (AdamW, SGD) / 0.24 (LOMO), optimizer state 75.31 (AdamW) / 25.10 (SGD) / 0
(LOMO), in GiB.

Activations are an analytic count of what a decoder layer of a Hugging Face causal LM saves for
backward (per token: the layer input, the normalised inputs of attention and MLP with their fp32
intermediates, q / k / v and the attention output, the MLP's four intermediate tensors), all layers,
or with gradient checkpointing the layer inputs plus one layer recomputed. The peak is the larger of
two moments: the loss's backward (those activations, the logits, their fp32 copy, the fp32
log-softmax and the logits' gradient, or a chunk of them with ``loss_chunk_size``; no parameter
gradient exists yet) and the layers' backward (the activations, the largest gradient, one recomputed
layer with checkpointing). Calibrated against measured CPU steps by ``benchmarks/bench_memory.py``.
Framework workspace is a fixed allowance on GPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_WORKSPACE = 768 * 1024**2  # CUDA context, cuBLAS workspace, allocator slack (not in allocator stats)
FUSED = ("lomo", "adalomo")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model, read from its config."""

    parameters: int
    largest_parameter: int  # elements of the largest parameter tensor
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3 gathers at once)
    factored_state: int  # AdaLomo: sum over matrices of (rows + columns), plus vector sizes
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int  # hidden size of keys / values (grouped-query attention)
    heads: int
    vocab: int


@lru_cache(maxsize=32)
def _shape_from_config_json(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads(config_json)
    config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())  # each tied parameter once
    layer_sizes = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):  # the decoder layers
            layer_sizes += [sum(p.numel() for p in layer.parameters()) for layer in module]
    # AdaLomo keeps exp_avg_sq_row (shape[:-1]) and exp_avg_sq_col (shape[:-2] + shape[-1:]) per matrix
    factored = sum(math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1] if p.dim() >= 2 else p.numel()
                   for p in params)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _first(config, "num_key_value_heads", default=heads) or heads
    return ModelShape(
        parameters=sum(p.numel() for p in params),
        largest_parameter=max(p.numel() for p in params),
        largest_layer=max(layer_sizes, default=0),
        factored_state=factored,
        layers=_first(config, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        intermediate=_first(config, "intermediate_size", "n_inner", default=None) or 4 * hidden,
        kv_hidden=hidden * kv_heads // heads,
        heads=heads,
        vocab=config.vocab_size,
    )


def _first(config: Any, *names: str, default: Any = ...) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is ...:
        raise ValueError(f"the model config has none of {names}")
    return default


def model_shape(config: dict[str, Any] | str | Path) -> ModelShape:
    """From a config dict, or a model folder / config.json path."""
    if not isinstance(config, dict):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    values = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "auto_map")}
    return _shape_from_config_json(json.dumps(values, sort_keys=True))


@dataclass
class Estimate:
    """Predicted peak bytes per GPU (or host, on CPU) and what it is made of."""

    gpus: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    other_bytes: int  # ZeRO-3 gathered layers, framework workspace
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return (self.parameters_bytes + self.gradients_bytes + self.optimizer_state_bytes + self.activations_bytes
                + self.other_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def estimate(
    shape: ModelShape, optimizer: str = "lomo", dtype: str = "fp16", batch_size: int = 1, seq_len: int = 512,
    gradient_checkpointing: bool = False, gpus: int = 1, loss_chunk_size: int | None = None,
    device: str = "cuda",
) -> Estimate:
    """The predicted peak per GPU; ``batch_size`` is the global batch (split over the GPUs)."""
    d = DTYPE_BYTES[dtype]
    p = shape.parameters
    fused = optimizer in FUSED
    zero3 = gpus > 1
    notes = []
    params = -(-p // gpus) * d
    if fused:
        grads = shape.largest_parameter * d
    else:
        grads = p * d
    if optimizer == "adamw":
        state = p * (12 if dtype == "fp16" else 2 * d)
    elif optimizer == "sgd":
        state = p * 4 if dtype == "fp16" else 0
    elif optimizer == "adalomo":
        state = shape.factored_state * 4
    else:
        state = 0
    if dtype == "fp16" and not fused:
        notes.append("fp16 with SGD / AdamW counted with an fp32 master copy (mixed precision)")

    rows = -(-batch_size // gpus)
    tokens = rows * seq_len
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_hidden
    per_token_layer = d * (6 * h + 2 * kv + 4 * i) + 8 * h  # see the module docstring
    logit_tokens = min(tokens, loss_chunk_size) if loss_chunk_size else tokens
    # the logits, their fp32 copy (none when they are fp32 already), the fp32 log-softmax the loss
    # saves, and the logits' gradient: 12 bytes per token and vocabulary entry in fp32 and in bf16
    logits = logit_tokens * shape.vocab * (d + (4 if d < 4 else 0) + 4 + d)
    kept = tokens * shape.layers * (h * d if gradient_checkpointing else per_token_layer)
    # Two moments compete for the peak. At the loss's backward every saved activation and the logits
    # are alive, but no parameter's gradient yet (the output layer's comes right after; under ZeRO-3
    # its gathered weight takes that place). Later, in the layers' backward, the largest gradient is
    # alive with the activations not yet freed (and, with checkpointing, one recomputed layer).
    # (the chunked loss builds the output layer's full gradient during that backward: it stays counted)
    at_loss = kept + logits - (0 if zero3 or loss_chunk_size else grads)
    in_layers = kept + (tokens * per_token_layer if gradient_checkpointing else 0)
    if device == "cpu":
        # An empirical allowance for the CPU's attention kernels, whose backward holds a layer's attention
        # scores (rows x heads x seq^2 in fp32): the whole of it without checkpointing, a quarter with it
        # (fitted on bench_memory.py's small-vocabulary rows, where attention and not the logits sets the
        # peak). GPU kernels (flash / memory-efficient) never hold the scores.
        scores = rows * shape.heads * seq_len * seq_len * 4
        in_layers += scores // 4 if gradient_checkpointing else scores
    activations = max(at_loss, in_layers)

    other = 0
    if zero3:
        other += 2 * shape.largest_layer * d  # the layer being computed and the one prefetched
    if device == "cuda":
        other += CUDA_WORKSPACE
    return Estimate(gpus, params, grads, state, activations, other, notes)


@dataclass
class Placement:
    gpus: int | None  # None: it does not fit on the devices given
    estimate: Estimate
    device_bytes: int
    max_gpus: int
    reason: str

    @property
    def fits(self) -> bool:
        return self.gpus is not None


def place(shape: ModelShape, device_bytes: int, max_gpus: int, pinned: int | None = None, **settings: Any) -> Placement:
    """The fewest GPUs (1, 2, 4, 8, ... up to ``max_gpus``) that hold the job; SGD / AdamW run on one."""
    fused = settings.get("optimizer", "lomo") in FUSED
    if pinned is not None:
        candidates = [pinned]
    elif fused:
        candidates = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_gpus] or [1]
    else:
        candidates = [1]
    last = None
    for n in candidates:
        last = estimate(shape, gpus=n, **settings)
        if last.peak_bytes <= device_bytes:
            return Placement(n, last, device_bytes, max_gpus, f"fits on {n} of {max_gpus} device(s)")
    assert last is not None
    why = (f"needs {last.peak_bytes / GiB:.2f} GiB per device on {last.gpus} device(s); each has "
           f"{device_bytes / GiB:.2f} GiB")
    if not fused:
        why += f" ({settings.get('optimizer')} keeps whole gradients and optimizer state on one device: LOMO needs "
        alt = place(shape, device_bytes, max_gpus, **{**settings, "optimizer": "lomo"})
        why += f"{alt.gpus} device(s))" if alt.fits else "more than this node has too)"
    return Placement(None, last, device_bytes, max_gpus, why)
