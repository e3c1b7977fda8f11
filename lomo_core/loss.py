"""A causal-LM loss that never holds the full logits.

With LOMO the optimizer no longer sets the peak: at the start of the backward pass the peak is the
saved activations plus the logits (batch x sequence x vocabulary, upcast to fp32) plus their
gradient. For LLaMA-7B at batch 8 x 2048 that is 2 GB each. This loss computes the projection to the
vocabulary and the cross-entropy chunk by chunk, only for positions that have a label, under
recomputation, so no more than one chunk of logits exists at a time; the backward pass recomputes
each chunk's projection (one extra ``lm_head`` matmul) and adds its weight gradient into a single
buffer.

The value equals ``model(**batch).loss`` of Hugging Face's causal LMs (mean over labelled tokens,
labels shifted by one) up to summation order; :func:`supports_chunked_loss` checks that on a real
batch, since some models scale or soft-cap their logits.

Under DeepSpeed ZeRO-3 the output layer's weight is partitioned, and DeepSpeed only gathers a
parameter around its own module's forward and backward. This loss reads the weight outside the
module, so it gathers it itself: once for the forward, once again for the backward, as the module
hooks would (the all-gathers are the same two a plain ``lm_head`` call costs). The weight's gradient
leaves the backward full-size, where the optimizer's hook reduce-scatters it like any other.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _gathered(*params: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Full copies of ZeRO-3 partitioned ``params`` for the duration of the block (read only)."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, y_i), a chunk of rows at a time, in the forward and the backward.

    The backward recomputes each chunk's logits and adds its contribution to one weight-gradient
    buffer in place, so neither the full logits nor several weight-gradient copies ever exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start:start + chunk_size], weight, bias).float()
            total += F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        with _gathered(weight, bias):
            return _ChunkedLinearCrossEntropy._backward(ctx, grad_total, hidden, weight, bias, targets)

    @staticmethod
    def _backward(ctx, grad_total, hidden, weight, bias, targets):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start:start + ctx.chunk_size]
            y = targets[start:start + ctx.chunk_size]
            # d CE / d logits = softmax - one_hot, in fp32 as the loss was; then the model's dtype.
            dlogits = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
            dlogits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            dlogits = dlogits.mul_(grad_total).to(h.dtype)
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[start:start + ctx.chunk_size])
            if grad_weight is not None:
                grad_weight.addmm_(dlogits.t(), h)
            if grad_bias is not None:
                grad_bias += dlogits.sum(dim=0)
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int,
                           num_items_in_batch: float | None = None) -> torch.Tensor:
    """The mean over labelled tokens of the next-token cross-entropy, or the sum divided by
    ``num_items_in_batch`` when given (a rank's share of a global batch, as Hugging Face's models take it).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    denominator = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    # With no labelled token the function still runs (on zero rows): every parameter stays in the graph
    # and gets its (zero) gradient, so the optimizer's hooks, and their collectives, run on every rank.
    with _gathered(head.weight, head.bias):
        total = _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size)
    return total / denominator


@torch.no_grad()
def supports_chunked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> bool:
    """True when the chunked loss gives the model's own loss on ``batch`` (to fp32 rounding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return False
    if not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):  # nothing to compare on: label every token
        batch = {**batch, "labels": batch["input_ids"]}
    try:
        reference = model(**batch).loss.float()
        chunked = chunked_causal_lm_loss(model, batch, chunk_size).float()
    except torch.OutOfMemoryError:
        raise  # not a model the chunked loss cannot follow: the job itself does not fit (and other ranks wait)
    except (TypeError, AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(reference, chunked, rtol=1e-4, atol=1e-5))
