"""The machinery shared by LOMO and AdaLomo: updating each parameter inside the backward pass.

Every trainable parameter gets one ``register_post_accumulate_grad_hook``. Autograd calls it once
the parameter's gradient is complete (after all contributions, e.g. of tied weights, have been
summed), the hook applies the update and drops the gradient. So at most one gradient is alive at a
time and none is left after ``backward()``; no optimizer-wide scan, no call for the last parameter.

Global gradient-norm clipping and fp16 overflow detection need to know about *all* gradients before
any parameter may change. They run a first backward (``grad_norm``) whose hooks only accumulate
per-parameter norms; the second backward (``fused_backward``) then applies the clipped update.
Without norm clipping and without fp16, a step is a single backward.

DeepSpeed ZeRO-3 parameters (``deepspeed.zero.Init`` + ``deepspeed.initialize`` with no DeepSpeed
optimizer) are updated partition by partition: the hook reduce-scatters the full gradient, so each rank
receives the mean gradient of its own partition only, updates ``param.ds_tensor`` and frees both at
once (see ``lomo_core.zero3.comm``). Norms are all-reduced, so every rank applies the same clipping
coefficient and agrees on fp16 overflow. A retained graph cannot be backpropagated twice under ZeRO-3
(the partitions are released after the first pass), so there ``step(closure)`` runs the closure again
for the update pass, with the RNG state restored.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lomo_core.optim.scaler import DynamicLossScaler
from lomo_core.zero3.comm import Partition, ShardComm, is_partitioned

_SLICE = 1 << 18  # elements per slice of a half-precision update: 1 MiB of fp32
_NORM_PASS = "norm"
_UPDATE_PASS = "update"


def _check_positive(name: str, value: float | None, problems: list[str], allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            problems.append(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        problems.append(f"{name} must be a positive number, got {value!r}")


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement :meth:`_apply_update` for one parameter."""

    #: True when the update of each element depends on that element alone (LOMO), so a parameter may
    #: be updated slice by slice; AdaLomo's row / column statistics need the whole tensor.
    elementwise_update = False

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        clip_grad_norm: float | None,
        clip_grad_value: float | None,
        weight_decay: float,
        loss_scale_args: dict[str, Any] | None,
        extra_defaults: dict[str, Any] | None = None,
        engine: Any = None,
    ) -> None:
        problems: list[str] = []
        if not isinstance(model, nn.Module):
            problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_positive("lr", lr, problems, allow_none=False)
        _check_positive("clip_grad_norm", clip_grad_norm, problems)
        _check_positive("clip_grad_value", clip_grad_value, problems)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            problems.append(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            problems.append(f"loss_scale_args must be a dict or None, got {type(loss_scale_args).__name__}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

        self.model = model
        self.clip_grad_norm = float(clip_grad_norm) if clip_grad_norm is not None else None
        self.clip_grad_value = float(clip_grad_value) if clip_grad_value is not None else None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters")
        self.engine = engine
        self.comm: ShardComm | None = None
        self.partitions: dict[int, Partition] = {}
        if any(is_partitioned(p) for _, p in named):
            if engine is None or not hasattr(getattr(engine, "optimizer", None), "partition_all_parameters"):
                raise ValueError(
                    f"{type(self).__name__}: the model has DeepSpeed ZeRO-3 parameters; pass engine=<the engine of "
                    "deepspeed.initialize(model=..., config=...) without a DeepSpeed optimizer>, so that "
                    "gathered copies are released after each update"
                )
            persistent = [n for n, p in named if getattr(p, "ds_persist", False)]
            if persistent:
                raise ValueError(
                    f"{type(self).__name__}: ZeRO-3 keeps {persistent[:3]} gathered between steps "
                    "(stage3_param_persistence_threshold > 0), so updates of their partitions would not reach "
                    "the forward pass; set zero_optimization.stage3_param_persistence_threshold to 0"
                )
            self.comm = ShardComm()
            self.partitions = {id(p): Partition.of(p, self.comm.rank) for _, p in named}
        self.param_names = {p: n for n, p in named}
        defaults = dict(lr=float(lr), weight_decay=float(weight_decay), **(extra_defaults or {}))
        super().__init__([p for _, p in named], defaults)

        self.scaler = self._make_scaler(loss_scale_args, [p for _, p in named])
        self.global_step = 0  # number of updates applied (overflowed steps do not count)
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self.peak_grad_bytes = 0  # largest gradient alive at once, for the memory report

        self._pass: str | None = None
        self._seen: set[int] = set()
        self._norms: list[torch.Tensor] = []
        self._clip_coef: torch.Tensor | None = None
        self._clip_coef_value = 1.0
        self._norm_done = False
        self._overflow = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for _, p in named]
        #: called before the closure runs a second time (ZeRO-3 with a norm pass); the CPU memory meter
        #: uses it to tell its tracker that the same modules run again within the step
        self.before_recompute: Callable[[], None] | None = None

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _make_scaler(args: dict[str, Any] | None, params: list[nn.Parameter]) -> DynamicLossScaler | None:
        args = dict(args or {})
        enabled = args.pop("enabled", None)
        if enabled is None:
            enabled = any(p.dtype == torch.float16 for p in params)
        scaler = DynamicLossScaler.from_args(args)  # validated even when unused
        return scaler if enabled else None

    @property
    def needs_norm_pass(self) -> bool:
        """True when a step needs the extra gradient-norm backward (norm clipping or fp16 overflow check)."""
        return self.clip_grad_norm is not None or self.scaler is not None

    @property
    def zero3(self) -> bool:
        """True when the parameters are DeepSpeed ZeRO-3 partitions."""
        return self.comm is not None

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (after this, ``loss.backward()`` is ordinary again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ the hook
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._pass is None:
            p.grad = None
            raise RuntimeError(
                f"{type(self).__name__} updates parameters inside the backward pass: call "
                "optimizer.step(closure) or optimizer.fused_backward(loss, lr) instead of loss.backward()"
            )
        key = id(p)
        if key in self._seen:
            raise RuntimeError(
                f"parameter {self.param_names.get(p, '?')!r} received its gradient twice in one backward "
                "pass, so a fused update would use a partial gradient; with gradient checkpointing use "
                "use_reentrant=False, and do not call backward on several losses: sum them first"
            )
        self._seen.add(key)
        grad = p.grad
        p.grad = None
        if grad is None:
            return
        nbytes = grad.numel() * grad.element_size()
        if nbytes > self.peak_grad_bytes:
            self.peak_grad_bytes = nbytes
        with torch.no_grad():
            part = None
            if self.comm is not None:
                part = self.partitions[key]
                grad = self.comm.reduce_scatter_mean(grad, part)
            if self._pass == _NORM_PASS:
                self._norms.append(self._grad_norm_of(grad))
            elif part is not None:
                self._update_partition(p, part, grad, self.param_groups[0])
            else:
                self._update(p, grad, self.param_groups[0])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        same_layout = p.is_contiguous() and grad.is_contiguous()
        if not (self.elementwise_update and same_layout) or (p.dtype == grad.dtype == torch.float32):
            self._apply_update(p, self._prepare_grad(grad), group)
            return
        # Half-precision parameters: the fp32 arithmetic, one cache-sized slice at a time. Every
        # operation is elementwise, so the bits are those of the whole-tensor computation, without two
        # full-size fp32 copies and with the temporaries staying in cache.
        flat_p, flat_g = p.view(-1), grad.view(-1)
        for start in range(0, flat_p.numel(), _SLICE):
            self._apply_update(flat_p[start:start + _SLICE], self._prepare_grad(flat_g[start:start + _SLICE]), group)

    def _update_partition(self, p: torch.Tensor, part: Partition, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """ZeRO-3: update this rank's partition ``p.ds_tensor`` with the gradient of that partition.

        Elementwise updates (LOMO) use the flat partition as it is (the padding has zero gradient and
        zero value, and stays zero); AdaLomo overrides this to gather its statistics across ranks.
        """
        self._update(p.ds_tensor.data, grad, group)

    def _grad_norm_of(self, grad: torch.Tensor) -> torch.Tensor:
        if self.clip_grad_value is None:
            # The scale is divided out of the total at the end: no copy of the gradient here.
            return torch.linalg.vector_norm(grad, dtype=torch.float32)
        g = grad.to(torch.float32, copy=True)
        if self.scaler is not None:
            g.mul_(1.0 / self.scaler.scale)
        g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        return torch.linalg.vector_norm(g)

    def _prepare_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Unscale and clip one gradient; returns an fp32 tensor the update may modify in place."""
        # After p.grad = None autograd holds no reference to an fp32 gradient: it is ours to modify.
        g = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        if self.scaler is not None:
            g.mul_(1.0 / self.scaler.scale)
        if self.clip_grad_value is not None:
            g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self._clip_coef is not None:
            g.mul_(self._clip_coef)
        return g

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ passes
    def _backward(self, loss: torch.Tensor, which: str, retain_graph: bool) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: was it computed under torch.no_grad()?")
        self._pass = which
        self._seen = set()
        try:
            scaled = loss * self.scaler.scale if self.scaler is not None else loss
            scaled.backward(retain_graph=retain_graph and self.comm is None)
        finally:
            self._pass = None
            self._seen = set()
            if self.comm is not None:
                # Gathered copies are stale once partitions change: the next forward gathers afresh.
                self.engine.optimizer.partition_all_parameters()

    def grad_norm(self, loss: torch.Tensor) -> float:
        """First pass: compute the global gradient norm (and detect fp16 overflow); changes no parameter.

        The autograd graph is retained for the :meth:`fused_backward` call that must follow. Under
        ZeRO-3 it cannot be: compute the loss again (same batch, same RNG state) for that call.
        """
        self._norms = []
        self._backward(loss, _NORM_PASS, retain_graph=True)
        norms, self._norms = self._norms, []
        if norms:
            total = torch.linalg.vector_norm(torch.stack(norms))
        else:
            total = torch.zeros((), dtype=torch.float32)
        if self.comm is not None:  # the norm of the whole (mean) gradient: every rank gets the same value
            total = self.comm.all_reduce_sum(total.square().reshape(1)).sqrt().reshape(())
        if self.scaler is not None and self.clip_grad_value is None:
            total = total / self.scaler.scale
        total_value = float(total)
        self._overflow = not math.isfinite(total_value)
        self.last_grad_norm = total_value
        if self.clip_grad_norm is not None and not self._overflow:
            # The same arithmetic as torch.nn.utils.clip_grad_norm_.
            self._clip_coef = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
            self._clip_coef_value = float(self._clip_coef)
        else:
            self._clip_coef = None
            self._clip_coef_value = 1.0
        self._norm_done = True
        return total_value

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> bool:
        """Second (or only) pass: backward with each parameter updated as its gradient completes.

        Returns False when the step was skipped because the fp16 gradients overflowed.
        """
        if lr is not None:
            problems: list[str] = []
            _check_positive("lr", lr, problems, allow_none=False)
            if problems:
                raise ValueError(problems[0])
            for group in self.param_groups:
                group["lr"] = float(lr)
        if self.needs_norm_pass and not self._norm_done:
            why = "clip_grad_norm is set" if self.clip_grad_norm is not None else "parameters are fp16"
            raise RuntimeError(
                f"{why}: call optimizer.grad_norm(loss) before optimizer.fused_backward(loss, lr), "
                "or use optimizer.step(closure) which runs both passes"
            )
        try:
            if self._overflow:
                self.skipped_steps += 1
                applied = False
            else:
                self._before_step()
                self._backward(loss, _UPDATE_PASS, retain_graph=False)
                self.global_step += 1
                applied = True
            if self.scaler is not None:
                self.scaler.update(overflow=not applied)
        finally:
            self._norm_done = False
            self._overflow = False
            self._clip_coef = None
            self._clip_coef_value = 1.0
        return applied

    def _before_step(self) -> None:
        """Hook for subclasses: runs before the update pass of an applied step."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One optimizer step. ``closure`` runs the forward pass and returns the loss (no backward)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that returns the loss: the update happens "
                "inside the backward pass, so the optimizer must run it"
            )
        with torch.enable_grad():
            rng = _rng_state() if self.needs_norm_pass and self.comm is not None else None
            loss = closure()
            if self.needs_norm_pass:
                self.grad_norm(loss)
                if rng is not None and not self._overflow:
                    _set_rng_state(rng)  # the same dropout masks as the first forward
                    if self.before_recompute is not None:
                        self.before_recompute()
                    loss = closure()
            self.fused_backward(loss)
        return loss.detach()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: gradients never outlive the backward pass."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fused"] = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A deep copy: loading from another live optimizer must not share its state tensors.
        state_dict = copy.deepcopy(dict(state_dict))
        fused = state_dict.pop("fused", None)
        super().load_state_dict(state_dict)
        if fused is not None:
            self.global_step = int(fused["global_step"])
            self.skipped_steps = int(fused["skipped_steps"])
            if fused["loss_scaler"] is not None and self.scaler is not None:
                self.scaler.load_state_dict(fused["loss_scaler"])
