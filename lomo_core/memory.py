"""Measured memory of a training step: the peak and what it is made of.

On CUDA the figures come from the caching allocator's statistics (cheap: measured every step).
On the CPU there is no allocator statistic, so a step is run under PyTorch's
``torch.distributed._tools.mem_tracker.MemTracker``, which follows every tensor storage through a
dispatch mode; it costs time, so the loop tracks only some steps (see ``TrainConfig.memory_interval``).

MemTracker's own split into categories assumes the usual forward / backward / ``optimizer.step()``
sequence; with a fused optimizer everything happens inside ``step(closure)`` and it would count the
whole step as optimizer state. So only its *total* peak is used, and the breakdown is ours:

- parameters: bytes of the model's parameter storages;
- optimizer_state: bytes of the tensors in ``optimizer.state``;
- gradients: the largest set of gradients alive at once: for LOMO / AdaLomo one parameter's
  gradient (the optimizer records it), for a standard optimizer all of them;
- other: what was alive before the step besides parameters and optimizer state (buffers, caches);
- activations: the rest of the peak: saved activations and the temporaries of the backward pass.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

MiB = 1024**2


@dataclass
class MemoryReport:
    peak_bytes: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    other_bytes: int
    device: str
    source: str  # "cuda_allocator" or "cpu_tracker"

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def summary(self) -> str:
        def mib(x: int) -> str:
            return f"{x / MiB:.1f}"

        return (
            f"peak {mib(self.peak_bytes)} MiB = parameters {mib(self.parameters_bytes)} + gradients "
            f"{mib(self.gradients_bytes)} + optimizer state {mib(self.optimizer_state_bytes)} + activations "
            f"{mib(self.activations_bytes)} + other {mib(self.other_bytes)} ({self.device}, {self.source})"
        )


def _unique_storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds: under ZeRO-3, its partitions (``ds_tensor``)."""
    return _unique_storage_bytes(getattr(p, "ds_tensor", p) for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    tensors = (v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    return _unique_storage_bytes(tensors)


def _gradient_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    fused_peak = getattr(optimizer, "peak_grad_bytes", None)
    if fused_peak is not None:
        return int(fused_peak)
    return _unique_storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (the whole process: Python, libraries, everything)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class StepMemoryMeter:
    """Measures one training step: ``with meter.measure() as result: ...`` then ``result.report``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)

    @contextlib.contextmanager
    def measure(self) -> Iterator[_Measurement]:
        result = _Measurement()
        params = parameter_bytes(self.model)
        fused = hasattr(self.optimizer, "peak_grad_bytes")
        if fused:
            self.optimizer.peak_grad_bytes = 0  # type: ignore[union-attr]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            opt_before = optimizer_state_bytes(self.optimizer)
            yield result
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            source = "cuda_allocator"
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(self.model, *([self.optimizer] if self.optimizer is not None else []))
            opt_before = optimizer_state_bytes(self.optimizer)
            before_snapshot = tracker.get_tracker_snapshot("current")
            before = sum(snap["Total"] for snap in before_snapshot.values())
            recompute = getattr(self.optimizer, "before_recompute", False)
            if recompute is None:
                self.optimizer.before_recompute = tracker.reset_mod_stats  # type: ignore[union-attr]
            try:
                with tracker, warnings.catch_warnings():
                    # MemTracker warns about parameters whose .grad is None, which is LOMO's normal state.
                    warnings.filterwarnings("ignore", message="Expected a tensor")
                    yield result
            finally:
                if recompute is None:
                    self.optimizer.before_recompute = None  # type: ignore[union-attr]
            peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
            source = "cpu_tracker"
        opt_state = max(opt_before, optimizer_state_bytes(self.optimizer))
        grads = _gradient_bytes(self.model, self.optimizer)
        other = max(before - params - opt_before, 0)
        activations = max(peak - params - opt_state - grads - other, 0)
        result.report = MemoryReport(
            peak_bytes=int(peak), parameters_bytes=params, gradients_bytes=grads,
            optimizer_state_bytes=opt_state, activations_bytes=activations, other_bytes=other,
            device=str(self.device), source=source,
        )


class _Measurement:
    report: MemoryReport | None = None
