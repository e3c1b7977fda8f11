"""Whether this CPU multiplies bf16 matrices natively. Without native bf16 (no AVX-512 BF16 / AMX, as on many
AMD EPYC and older Intel parts) PyTorch falls back to a naive kernel for some layouts: a 1024x2048 @ 2048x512
product has been seen to take 2.5 s in bf16 against 37 ms in fp32 on one thread, and a bf16 job to train at a
few tokens a second. The probe times one small product of both layouts a linear layer uses (``x @ W`` and
``x @ W.T``) in each dtype, on one thread, in well under a second."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

#: bf16 is taken for emulated when its product is this many times slower than fp32's (native bf16 is about
#: as fast or faster; the naive fallback tens of times slower)
SLOW_FACTOR = 3.0


@dataclass(frozen=True)
class Bf16Probe:
    fp32_ms: float
    bf16_ms: float

    @property
    def slowdown(self) -> float:
        """bf16's time over fp32's (below 1: bf16 is faster)."""
        return self.bf16_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")

    @property
    def native(self) -> bool:
        return self.slowdown <= SLOW_FACTOR


def probe_bf16_matmul(rows: int = 256, inner: int = 512, cols: int = 128, repeat: int = 3) -> Bf16Probe:
    """Time ``rows x inner @ inner x cols`` in fp32 and in bf16 (the slower of the two layouts, best of
    ``repeat`` each), on one thread as a training process's matmuls on a busy node would see it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(rows, inner, generator=generator).to(dtype)
            w = torch.randn(inner, cols, generator=generator).to(dtype)
            wt = w.t().contiguous()  # the weight as nn.Linear keeps it: x @ W.T
            worst = 0.0
            for product in (partial(torch.matmul, x, w), partial(torch.matmul, x, wt.t())):
                product()  # the first call picks and warms the kernel
                best = float("inf")
                for _ in range(repeat):
                    started = time.perf_counter()
                    product()
                    best = min(best, time.perf_counter() - started)
                worst = max(worst, best)
            timings[dtype] = worst * 1000
        return Bf16Probe(fp32_ms=timings[torch.float32], bf16_ms=timings[torch.bfloat16])
    finally:
        torch.set_num_threads(threads)
