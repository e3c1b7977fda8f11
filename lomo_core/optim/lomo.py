"""LOMO: SGD fused into the backward pass (arXiv 2306.09782)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lomo_core.optim.fused import FusedOptimizer


class LOMO(FusedOptimizer):
    """Low-memory SGD: each parameter is updated as soon as its gradient is complete.

    A drop-in replacement for ``lomo_optim.Lomo``: the same constructor and the same calls
    (``grad_norm(loss)`` then ``fused_backward(loss, lr)`` when clipping by norm, otherwise just
    ``fused_backward(loss, lr)``), plus ``step(closure)``. Without clipping the parameters follow
    ``torch.optim.SGD(lr, weight_decay)`` exactly; the update arithmetic is fp32 whatever the
    parameter dtype, and fp16 parameters get dynamic loss scaling. Under DeepSpeed ZeRO-3 pass
    ``engine=`` (from ``deepspeed.initialize`` without optimizer): each rank updates its partition.
    """

    elementwise_update = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
        loss_scale_args: dict[str, Any] | None = None,
        engine: Any = None,
    ) -> None:
        super().__init__(model, lr, clip_grad_norm, clip_grad_value, weight_decay, loss_scale_args, engine=engine)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if (group["weight_decay"] == 0 and self.clip_grad_value is None
                and p.dtype == torch.float32 and grad.dtype == torch.float32):
            # One kernel: p += (-lr * clip_coef / loss_scale) * grad. Without clipping the multiplier
            # is 1 and this is exactly SGD's operation.
            multiplier = self._clip_coef_value / (self.scaler.scale if self.scaler is not None else 1.0)
            p.add_(grad, alpha=-group["lr"] * multiplier)
            return
        super()._update(p, grad, group)

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        # The same two operations as torch.optim.SGD, so fp32 results agree bit for bit.
        if p.dtype == torch.float32:
            if weight_decay:
                grad.add_(p, alpha=weight_decay)
            p.add_(grad, alpha=-lr)
            return
        p32 = p.to(torch.float32)
        if weight_decay:
            grad.add_(p32, alpha=weight_decay)
        p32.add_(grad, alpha=-lr)
        p.copy_(p32)
