"""Worker nodes and their GPUs: what the workers registered, and what a job is checked against."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.models import Node, utcnow
from jobs.settings import Settings


def register_node(session: Session, name: str, gpu_memory_gib: list[float],
                  cpu_bf16_slowdown: float | None = None, cpu_ranks: int | None = None) -> None:
    """Record (or refresh) a worker node's GPUs (for a CPU node, its leased ranks, ``LOMO_CPU_RANKS``, and
    what its bf16 probe measured): the API places jobs on what the workers have."""
    node = session.get(Node, name)
    if node is None:
        node = Node(name=name)
        session.add(node)
    node.gpu_memory_gib, node.seen_at = list(gpu_memory_gib), utcnow()
    node.cpu_bf16_slowdown, node.cpu_ranks = cpu_bf16_slowdown, (None if gpu_memory_gib else cpu_ranks)


def bf16_warning(session: Session, settings: Settings, dtype: str) -> str | None:
    """For a bf16 job on this deployment's CPU nodes, when none of those that were probed multiplies bf16
    natively: what to do instead (fp32); otherwise None."""
    from lomo_core.cpu_probe import SLOW_FACTOR

    if dtype != "bf16" or settings.gpu_memory_gib:
        return None
    probed = [n for n in session.scalars(select(Node)) if not n.gpu_memory_gib and n.cpu_bf16_slowdown is not None]
    if not probed or any(n.cpu_bf16_slowdown <= SLOW_FACTOR for n in probed):
        return None
    best = min(probed, key=lambda n: n.cpu_bf16_slowdown)
    return (f"bf16 on this deployment's CPU node(s) is emulated: a bf16 matmul takes {best.cpu_bf16_slowdown:.0f}x "
            f"as long as fp32 on {best.name} (no native bf16 on its CPU); set dtype fp32, which will run many "
            "times faster here")


def node_seen(session: Session, name: str) -> None:
    """A worker of node ``name`` is up: its ``seen_at`` is now (the watch of every worker writes it, so an
    idle node is seen alive too)."""
    session.execute(update(Node).where(Node.name == name).values(seen_at=utcnow()))


def deployment_inventory(session: Session, settings: Settings) -> tuple[str, int, int]:
    """(device kind, devices per node, bytes per device) that jobs are checked against at submission.

    GPUs declared in the settings (``LOMO_GPU_MEMORY_GIB``) win; otherwise the largest GPU node its
    workers registered (the most GPUs, then the most memory on its smallest one); otherwise this host's
    memory, as a CPU node."""
    if settings.gpu_memory_gib:
        return settings.device_inventory()
    nodes = [n.gpu_memory_gib for n in session.scalars(select(Node)) if n.gpu_memory_gib]
    if nodes:
        best = max(nodes, key=lambda gib: (len(gib), min(gib)))
        return "cuda", len(best), int(min(best) * 1024**3)
    return settings.device_inventory()


def node_sizes(session: Session, settings: Settings) -> list[int]:
    """The GPUs of each registered GPU node (on a deployment of GPUs), or the ranks of each CPU node that
    counts them (``cpu_ranks``); [] when nothing is counted. A job of more than the largest is spread over
    several (``jobs.placement``). Declared GPUs (``LOMO_GPU_MEMORY_GIB``) count as one node when no GPU node
    has registered, as in ``deployment_inventory``."""
    rows = list(session.execute(select(Node.gpu_memory_gib, Node.cpu_ranks)))
    gpu_nodes = [len(gib) for gib, _ranks in rows if gib]
    if settings.gpu_memory_gib or gpu_nodes:
        return gpu_nodes or [len(settings.gpu_memory_gib)]
    return [ranks for gib, ranks in rows if not gib and ranks]
