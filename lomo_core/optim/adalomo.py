"""AdaLomo: LOMO with an adaptive, factored second moment (arXiv 2310.10195)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lomo_core.optim.fused import FusedOptimizer
from lomo_core.zero3.comm import Partition


class AdaLomo(FusedOptimizer):
    """Adafactor-style adaptive learning rate, fused into the backward pass.

    Matrices keep a factored second moment (one row and one column vector), vectors a full one; the
    update is normalised to RMS <= ``clip_threshold`` and scaled by the parameter's RMS (relative step
    size). All state lives in ``state_dict()`` so a resumed run continues its statistics.
    Same calls as ``lomo_optim.AdaLomo``; runs wherever the parameters live (CPU or GPU).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        loss_scale: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
        loss_scale_args: dict[str, Any] | None = None,
        engine: Any = None,
    ) -> None:
        problems = []
        if len(eps) != 2 or any(not (isinstance(e, (int, float)) and e >= 0) for e in eps):
            problems.append(f"eps must be two numbers >= 0, got {eps!r}")
        if not (isinstance(clip_threshold, (int, float)) and clip_threshold > 0):
            problems.append(f"clip_threshold must be > 0, got {clip_threshold!r}")
        if not (isinstance(decay_rate, (int, float)) and decay_rate < 0):
            problems.append(f"decay_rate must be < 0, got {decay_rate!r}")
        if problems:
            raise ValueError("AdaLomo: " + "; ".join(problems))
        if loss_scale is not None:
            # lomo_optim's static `loss_scale` maps onto a scaler that starts there and never moves.
            loss_scale_args = {"enabled": True, "init_scale": float(loss_scale), "scale_window": 2**62,
                               **(loss_scale_args or {})}
        super().__init__(
            model, lr, clip_grad_norm, clip_grad_value, weight_decay, loss_scale_args,
            extra_defaults=dict(eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate),
            engine=engine,
        )
        for p in self._params():
            state = self.state[p]
            part = self.partitions.get(id(p))
            shape = part.shape if part is not None else p.shape
            device = p.ds_tensor.device if part is not None else p.device
            if len(shape) >= 2:
                # Under ZeRO-3 the factored statistics (a row and a column vector) are small and kept
                # whole on every rank, identical everywhere; they are built from all-reduced sums.
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=device)
            else:
                # A vector's second moment is elementwise: partitioned like the parameter.
                size = part.size if part is not None else shape
                state["exp_avg_sq"] = torch.zeros(size, dtype=torch.float32, device=device)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _before_step(self) -> None:
        # beta2 follows 1 - t^decay_rate with t the number of this update (1 for the first).
        t = self.global_step + 1
        self._beta2 = 1.0 - math.pow(t, self.param_groups[0]["decay_rate"])

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        eps_sq = group["eps"][0]
        beta2 = self._beta2
        state = self.state[p]
        if grad.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            sq = grad.square().add_(eps_sq)
            row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)
            del sq
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            col_factor = col.unsqueeze(-2).rsqrt()
            # (row * col) first, then the gradient: the reference's rounding order. The temporary is
            # no larger than `sq` above, so the peak does not grow.
            update = grad.mul_(row_factor * col_factor)
        else:
            second = state["exp_avg_sq"]
            second.mul_(beta2).add_(grad.square().add_(eps_sq), alpha=1.0 - beta2)
            update = grad.mul_(second.rsqrt())
        numel = update.numel()
        update_rms = update.norm(2) / (numel**0.5)
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))

        p32 = p if p.dtype == torch.float32 else p.to(torch.float32)
        _relative_step(p32, update, torch.norm(p32, 2.0) / math.sqrt(numel), group)
        if p32 is not p:
            p.copy_(p32)

    # ------------------------------------------------------------------ ZeRO-3
    def _update_partition(self, p: torch.Tensor, part: Partition, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """The update of :meth:`_apply_update` on this rank's partition: the row / column sums, the
        update's RMS and the parameter's RMS are all-reduced, so every rank computes the factors of the
        whole tensor and applies the same step size as a single process would."""
        comm = self.comm
        eps_sq = group["eps"][0]
        beta2 = self._beta2
        state = self.state[p]
        shard = p.ds_tensor.data
        g = self._prepare_grad(grad)[: part.valid]
        numel = part.numel
        if len(part.shape) >= 2:
            cols, rows_per_block = part.shape[-1], part.shape[-2]
            first_row = part.start // cols
            lead = part.start % cols
            n_rows = -(-(lead + part.valid) // cols) if part.valid else 0
            tail = n_rows * cols - lead - part.valid

            def as_rows(x: torch.Tensor) -> torch.Tensor:  # local elements laid out on whole rows
                return F.pad(x, (lead, tail)).view(n_rows, cols)

            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            sums = torch.zeros(row.numel() + col.numel(), dtype=torch.float32, device=g.device)
            if n_rows:
                sq = as_rows(g.square().add_(eps_sq))
                sums[first_row:first_row + n_rows] = sq.sum(dim=1)
                col_sums = sums[row.numel():].view(-1, cols)
                for block, lo, hi in _blocks(first_row, n_rows, rows_per_block):
                    col_sums[block] += sq[lo:hi].sum(dim=0)
                del sq
            comm.all_reduce_sum(sums)
            row.mul_(beta2).add_(sums[: row.numel()].view_as(row) / cols, alpha=1.0 - beta2)
            col.mul_(beta2).add_(sums[row.numel():].view_as(col) / rows_per_block, alpha=1.0 - beta2)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().reshape(-1)
            col_factor = col.rsqrt().reshape(-1, cols)
            if n_rows:
                blocks = torch.arange(first_row, first_row + n_rows, device=g.device) // rows_per_block
                factor = row_factor[first_row:first_row + n_rows].unsqueeze(-1) * col_factor[blocks]
                update = as_rows(g).mul_(factor).view(-1)[lead:lead + part.valid]
            else:
                update = g
        else:
            second = state["exp_avg_sq"][: part.valid]
            second.mul_(beta2).add_(g.square().add_(eps_sq), alpha=1.0 - beta2)
            update = g.mul_(second.rsqrt())

        p32 = shard[: part.valid].to(torch.float32)
        squares = torch.stack([update.square().sum(), p32.square().sum()]).to(torch.float32)
        comm.all_reduce_sum(squares)
        update_rms = squares[0].sqrt() / (numel**0.5)
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))
        _relative_step(p32, update, squares[1].sqrt() / math.sqrt(numel), group)
        shard[: part.valid].copy_(p32)


def _relative_step(p32: torch.Tensor, update: torch.Tensor, param_rms: torch.Tensor, group: dict[str, Any]) -> None:
    """``p32 -= lr * max(eps, RMS(p)) * update`` (with decoupled weight decay), in place.

    Rounded the way lomo_optim rounds it (fp32 when the RMS wins, double when eps does) so that both
    give the same bits. The .item() is one device sync per parameter, as in the reference.
    """
    eps_scale = group["eps"][1]
    if param_rms.item() > eps_scale:
        step_size = param_rms * group["lr"]
    else:
        step_size = group["lr"] * eps_scale
    if group["weight_decay"]:
        p32.mul_(1.0 - step_size * group["weight_decay"])
    p32.add_(update, alpha=-float(step_size))


def _blocks(first_row: int, n_rows: int, rows_per_block: int):
    """(block index, first local row, end local row) of each block of ``rows_per_block`` rows met."""
    row = first_row
    end = first_row + n_rows
    while row < end:
        block = row // rows_per_block
        stop = min((block + 1) * rows_per_block, end)
        yield block, row - first_row, stop - first_row
        row = stop
