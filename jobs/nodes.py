"""Worker nodes and their GPUs: what the workers registered, and what a job is checked against."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.models import Node, utcnow
from jobs.settings import Settings


def register_node(session: Session, name: str, gpu_memory_gib: list[float]) -> None:
    """Record (or refresh) a worker node's GPUs: the API places jobs on what the workers have."""
    node = session.get(Node, name)
    if node is None:
        session.add(Node(name=name, gpu_memory_gib=list(gpu_memory_gib), seen_at=utcnow()))
    else:
        node.gpu_memory_gib, node.seen_at = list(gpu_memory_gib), utcnow()


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
