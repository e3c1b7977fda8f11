"""Collectives of the partition-aware fused update, and a count of the bytes each rank sends.

DeepSpeed ZeRO-3 splits every parameter's flattened elements into ``world`` equal partitions (the last
one zero-padded); rank r keeps elements ``[r * ps, (r + 1) * ps)`` in ``param.ds_tensor``. A gradient
therefore needs only a reduce-scatter, after which each rank holds the summed gradient of exactly its
own partition: (N-1)/N of the gradient's bytes leave each rank, half of what an all-reduce sends, and
no rank keeps more than its partition once the full-size gradient of the backward pass is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (it carries its partition in ``ds_tensor``)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


@dataclass
class Partition:
    """Where rank ``rank``'s partition of a ZeRO-3 parameter lies in its flattened elements."""

    start: int  # first element of the partition
    size: int  # elements in ``ds_tensor`` (padding included)
    valid: int  # elements of the partition that belong to the parameter (the rest is padding)
    numel: int  # elements of the whole parameter
    shape: torch.Size  # shape of the whole parameter

    @classmethod
    def of(cls, p: torch.Tensor, rank: int) -> Partition:
        size = p.ds_tensor.numel()
        start = rank * size
        return cls(start, size, max(0, min(size, p.ds_numel - start)), p.ds_numel, torch.Size(p.ds_shape))


class ShardComm:
    """Reduce-scatter of full gradients into partitions, plus the small all-reduces of norms and statistics.

    ``bytes_sent`` counts what this rank puts on the wire with ring algorithms: a reduce-scatter or an
    all-gather of S bytes sends (N-1)/N * S, an all-reduce 2 (N-1)/N * S.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeRO-3 parameters need torch.distributed to be initialised "
                               "(deepspeed.init_distributed or torch.distributed.init_process_group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0
        # gloo's reduce_scatter is slower than its all_reduce (measured on 16 MB: 15-21 ms against
        # 11-13 ms); a ring of point-to-point sends moves the same (N-1)/N bytes in 9-10 ms.
        self.ring = dist.get_backend(group) == "gloo"

    def _ring(self, nbytes: int, factor: int = 1) -> None:
        self.bytes_sent += factor * nbytes * (self.world - 1) // self.world

    def reduce_scatter_mean(self, grad: torch.Tensor, part: Partition) -> torch.Tensor:
        """The mean over ranks of ``grad`` (a full gradient), restricted to this rank's partition."""
        flat = grad.reshape(-1)
        total = part.size * self.world
        if flat.numel() != total:
            flat = F.pad(flat, (0, total - flat.numel()))
        fp16 = grad.dtype == torch.float16
        if fp16:
            flat.div_(self.world)  # before the sum, so that fp16 sums stay in range
        if self.ring:
            out = self._ring_reduce_scatter(flat, part.size)
        else:
            out = torch.empty(part.size, dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, group=self.group)
        self._ring(flat.numel() * flat.element_size())
        if not fp16:
            out.div_(self.world)  # 1/N of the elements: cheaper than dividing the full gradient
        return out

    def _ring_reduce_scatter(self, flat: torch.Tensor, size: int) -> torch.Tensor:
        """Reduce-scatter as N-1 ring steps: chunk c travels round the ring, each rank adding its own
        part, and arrives complete at rank c. Each step sends one chunk to the next rank."""
        n, r = self.world, self.rank
        chunks = flat.split(size)
        nxt = dist.get_global_rank(self.group, (r + 1) % n) if self.group else (r + 1) % n
        prev = dist.get_global_rank(self.group, (r - 1) % n) if self.group else (r - 1) % n
        acc = chunks[(r - 1) % n].clone()
        buf = torch.empty_like(acc)
        for step in range(n - 1):
            request = dist.isend(acc, nxt, group=self.group)
            dist.recv(buf, prev, group=self.group)
            request.wait()
            buf.add_(chunks[(r - 2 - step) % n])
            acc, buf = buf, acc
        return acc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        self._ring(tensor.numel() * tensor.element_size(), factor=2)
        return tensor
