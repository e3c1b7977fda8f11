"""A causal-LM loss that never holds the full logits.

With LOMO the optimizer no longer sets the peak: at the start of the backward pass the peak is the
saved activations plus the logits (batch x sequence x vocabulary, upcast to fp32) plus their
gradient. For LLaMA-7B at batch 8 x 2048 that is 2 GB each. This loss computes the projection to the
vocabulary and the cross-entropy chunk by chunk, only for positions that have a label, under
activation checkpointing, so no more than one chunk of logits exists at a time; the output
projection is recomputed in the backward pass (one extra ``lm_head`` matmul).

The value equals ``model(**batch).loss`` of Hugging Face's causal LMs (mean over labelled tokens,
labels shifted by one) up to summation order; :func:`supports_chunked_loss` checks that on a real
batch, since some models scale or soft-cap their logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    count = targets.numel()
    if count == 0:
        return hidden.sum() * 0.0  # keeps the graph (and the parameters' hooks) consistent
    total = None
    for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        part = checkpoint(_chunk_loss, h, y, head.weight, head.bias, use_reentrant=False)
        total = part if total is None else total + part
    return total / count


@torch.no_grad()
def supports_chunked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> bool:
    """True when the chunked loss gives the model's own loss on ``batch`` (to fp32 rounding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return False
    try:
        reference = model(**batch).loss.float()
        chunked = chunked_causal_lm_loss(model, batch, chunk_size).float()
    except (TypeError, AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(reference, chunked, rtol=1e-4, atol=1e-5))
