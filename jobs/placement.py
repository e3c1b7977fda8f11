"""Jobs larger than a node: spread over several nodes, one launcher and the others joining.

A job that needs more GPUs (CPU ranks, on CPU nodes with ``LOMO_CPU_RANKS``) than one node has runs on
``k`` nodes of ``need / k`` each, the fewest nodes that hold it with the same count on every node
(DeepSpeed's launchers start as many ranks on every node). Placing it is part of the scheduler's one
transaction (``jobs.scheduler``): the worker that starts it leases its part on its own node and the parts
of the other nodes together, all or none (the partial unique index refuses a device another worker
leased meanwhile, and the whole choice is made again). The lease rows say which node rank each node has
(``GpuLease.node_rank``; 0, the node that started it, is the launcher).

Then:

- the launcher's worker writes the rendezvous (its address, a free port) and the run's config on the job
  (``Job.placement``, :func:`mark_ready`) and starts node rank 0 (``torch.distributed.run``'s static
  rendezvous, ``lomo_core.zero3.launch.Nodes``);
- the workers of the other nodes see the leases of their node at their next look at the queue
  (:func:`joins_owed`), take the join with one conditional UPDATE (:func:`claim_join`: one process of a
  node joins, however many it runs), wait for the rendezvous and start their node's ranks;
- the launcher alone writes the job's records and heartbeat, decides its end and releases every lease of
  the attempt. A joining node that fails says so on the job (:func:`report_failure`); the launcher then
  stops its ranks and the job fails with that node's error. A node of the placement that is no longer
  seen (``heartbeat_timeout_s``: its worker is gone) is an infrastructure failure, as a lost worker is:
  the launcher stops its ranks and the job goes back to the queue, to resume from its latest checkpoint
  on a new placement (``jobs.recovery.requeue_after_node_loss``). A lost launcher is a lost worker: the
  job is recovered by its heartbeat. A joining node stops its ranks when the job is no longer running in
  its attempt (fenced, like any attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobs.events import add_event
from jobs.models import GpuLease, Job, Node, aware
from jobs.states import JobStatus

#: ``plan`` when the job can be spread over the live nodes, but not on what is free now
WAIT = "wait"
LIVE = (JobStatus.RUNNING.value, JobStatus.PAUSING.value)


@dataclass(frozen=True)
class Peer:
    """Another live node as a placement sees it."""

    name: str
    slots: int  # GPUs (or CPU ranks)
    free: int
    device_bytes: int | None = None  # its smallest GPU's memory (None: a CPU node)


def splits(need: int, sizes: list[int]) -> list[tuple[int, int]]:
    """The ways to spread ``need`` ranks over nodes of ``sizes`` (this node's first): (node count, ranks
    per node), the fewest nodes first; 2 nodes at least, each with the same count."""
    return [(k, need // k) for k in range(2, len(sizes) + 1)
            if need % k == 0 and need // k <= sizes[0] and sum(size >= need // k for size in sizes[1:]) >= k - 1]


def plan(need: int, node: str, size: int, free: int, peers: list[Peer]) -> list[tuple[str, int]] | str | None:
    """Where a job of ``need`` ranks (more than one node has) starts with this ``node`` (``size``,
    ``free``) as its launcher: [(node, ranks), ...], this node first; ``WAIT`` when it could be spread
    over the live nodes but not now; None when this node can never be part of it."""
    options = splits(need, [size, *(peer.slots for peer in peers)])
    for _count, per in options:
        if free < per:
            continue
        ready = sorted((peer for peer in peers if peer.free >= per), key=lambda peer: (peer.free, peer.name))
        if len(ready) >= _count - 1:  # the fullest nodes that still fit: the emptiest stay for larger jobs
            return [(node, per)] + [(peer.name, per) for peer in ready[:_count - 1]]
    return WAIT if options else None


def can_spread(need: int, sizes: list[int]) -> bool:
    """Whether ``need`` ranks can run on the nodes of ``sizes`` (one node, or several with the same count
    each), for admission."""
    return any(sum(size >= need // k for size in sizes) >= k for k in range(1, len(sizes) + 1) if need % k == 0)


def peers(session: Session, node: str, gpu: bool, live_after: datetime) -> list[Peer]:
    """The other nodes seen after ``live_after`` of this node's kind (GPU nodes, or CPU nodes with
    ``cpu_ranks``), with what is free on them."""
    taken = dict(session.execute(select(GpuLease.node, func.count(GpuLease.id))
                                 .where(GpuLease.released_at.is_(None)).group_by(GpuLease.node)).all())
    found = []
    for row in session.scalars(select(Node).where(Node.name != node, Node.seen_at >= live_after)):
        slots = len(row.gpu_memory_gib) if gpu else (None if row.gpu_memory_gib else row.cpu_ranks)
        if slots:
            smallest = int(min(row.gpu_memory_gib) * 1024**3) if gpu else None
            found.append(Peer(row.name, slots, slots - taken.get(row.name, 0), smallest))
    return found


def large_enough(peers: list[Peer], need_bytes: int | None) -> list[Peer]:
    """The peers whose GPUs hold ``need_bytes`` (a job's predicted peak per GPU; None: all of them)."""
    return [peer for peer in peers
            if need_bytes is None or peer.device_bytes is None or peer.device_bytes >= need_bytes]


def lease(session: Session, job: Job, nodes: list[tuple[str, int]], sizes: dict[str, int], now: datetime) -> list[int]:
    """Lease the job's part on every node of ``nodes`` (node rank = position), in the caller's transaction;
    the devices of the first (this) node. A device taken meanwhile fails the flush (IntegrityError)."""
    from jobs.leases import leased_devices

    mine: list[int] = []
    for rank, (name, per) in enumerate(nodes):
        taken = leased_devices(session, name)
        devices = [i for i in range(sizes[name]) if i not in taken][:per]
        if len(devices) < per:
            raise LookupError(name)  # another worker took them since the choice: choose again
        session.add_all([GpuLease(node=name, device_index=i, job_id=job.id, attempt=job.attempt, leased_at=now,
                                  node_rank=rank, joined_by=None) for i in devices])
        mine = mine or devices
    session.flush()
    job.placement = {"attempt": job.attempt, "nodes": [name for name, _ in nodes], "per_node": nodes[0][1]}
    return mine


def mark_ready(session: Session, job_id: str, attempt: int, master_addr: str, master_port: int,
               rendezvous_timeout_s: int, config: dict[str, Any]) -> None:
    """The launcher's rendezvous and the run's config, for the joining nodes (only while the job runs in
    ``attempt``)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.status not in LIVE or job.attempt != attempt or not job.placement:
        return
    job.placement = {**job.placement, "master_addr": master_addr, "master_port": master_port,
                     "rendezvous_timeout_s": rendezvous_timeout_s, "config": config}
    add_event(session, job_id, f"launching on {len(job.placement['nodes'])} nodes "
                               f"({', '.join(job.placement['nodes'])}), {job.placement['per_node']} rank(s) each; "
                               f"the others join {master_addr}:{master_port}")


@dataclass(frozen=True)
class Join:
    job_id: str
    attempt: int
    node_rank: int


def joins_owed(session: Session, node: str) -> list[Join]:
    """The parts of running jobs that ``node`` holds leases for as a joining node and no process of it has
    taken yet."""
    rows = session.execute(
        select(GpuLease.job_id, GpuLease.attempt, GpuLease.node_rank).join(Job, Job.id == GpuLease.job_id)
        .where(GpuLease.node == node, GpuLease.released_at.is_(None), GpuLease.node_rank > 0,
               GpuLease.joined_by.is_(None), Job.status.in_(LIVE), Job.attempt == GpuLease.attempt)
        .distinct())
    return [Join(job_id, attempt, rank) for job_id, attempt, rank in rows]


def claim_join(session: Session, join: Join, node: str, worker: str) -> bool:
    """Take the join of ``join`` on ``node`` for ``worker``: one conditional UPDATE, so one process joins."""
    return session.execute(
        update(GpuLease).where(GpuLease.job_id == join.job_id, GpuLease.attempt == join.attempt,
                               GpuLease.node == node, GpuLease.released_at.is_(None), GpuLease.joined_by.is_(None))
        .values(joined_by=worker)).rowcount > 0


def leased_here(session: Session, job_id: str, attempt: int, node: str) -> list[int]:
    return sorted(session.scalars(select(GpuLease.device_index).where(
        GpuLease.job_id == job_id, GpuLease.attempt == attempt, GpuLease.node == node,
        GpuLease.released_at.is_(None))))


def rendezvous(session: Session, job_id: str, attempt: int) -> dict[str, Any] | None:
    """The job's placement once its launcher wrote the rendezvous; None before. Raises ``LookupError``
    when the job is no longer running in ``attempt`` (nothing to join)."""
    job = session.get(Job, job_id)
    if job is None or job.status not in LIVE or job.attempt != attempt:
        raise LookupError(job_id)
    placement = job.placement or {}
    return placement if placement.get("attempt") == attempt and placement.get("master_port") else None


def report_failure(session: Session, job_id: str, attempt: int, node: str, node_rank: int, code: str,
                   message: str) -> bool:
    """A joining node's ranks failed: say so on the job, for its launcher to stop and fail it (only while
    it runs in ``attempt``, and the first failure only)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.status not in LIVE or job.attempt != attempt or not job.placement \
            or job.placement.get("failure"):
        return False
    job.placement = {**job.placement, "failure": {"node": node, "node_rank": node_rank, "code": code,
                                                  "message": message}}
    add_event(session, job_id, f"node {node} (node rank {node_rank}) failed: {message}", "error")
    return True


def problem(session: Session, job_id: str, live_after: datetime) -> dict[str, Any] | None:
    """For the launcher: the failure a joining node reported, or a node of the placement that is no longer
    seen (its worker is gone: its ranks cannot be waited for); None while all is well."""
    placement = session.scalar(select(Job.placement).where(Job.id == job_id)) or {}
    if placement.get("failure"):
        return placement["failure"]
    names = placement.get("nodes") or []
    seen = dict(session.execute(select(Node.name, Node.seen_at).where(Node.name.in_(names))).all())
    for rank, name in enumerate(names[1:], start=1):
        if name not in seen or aware(seen[name]) < live_after:
            return {"node": name, "node_rank": rank, "code": "node_lost",
                    "message": f"node {name} (node rank {rank}) is no longer seen: its worker stopped or the node "
                               "is cut off"}
    return None
