"""The cluster view: what each node holds now, the queue in the order the scheduler takes it, and the GPU
leases of a recent window (a timeline), as plain data (``GET /v1/cluster``).

Every user sees who holds the GPUs and waits in the queue (the owner's name, as ``squeue`` shows), but
only the ids of their own jobs: another user's job has ``job`` None (its id stays a 404 for them
everywhere), and its model is shown by its base model's name (a fine-tuned model's name holds a job id).
An admin (``viewer`` None) sees every id. A fixed number of queries, whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from jobs import quotas, scheduler
from jobs.catalog import base_name
from jobs.models import GpuLease, Job, Node, User, aware, owned, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus

#: the most leases the timeline holds (the newest are kept): a long, busy window cannot blow up an answer
MAX_LEASES = 5000
#: the statuses of a job that runs on a node (a pausing one still holds its GPUs)
ON_A_NODE = (JobStatus.RUNNING.value, JobStatus.PAUSING.value)
#: (job id, owner id) -> the ``job`` (the id, or None where the viewer may not see it) and ``mine`` of an entry
JobOf = Callable[[str, str], dict[str, Any]]


def node_of(worker: str | None) -> str | None:
    """The node a worker process claims jobs for: workers claim as ``<worker_name>:<pid>``
    (``worker.supervisor``), and the worker name is the node its GPU leases belong to."""
    if not worker:
        return None
    return worker.rpartition(":")[0] or worker


def cluster_view(session: Session, settings: Settings, viewer: str | None, hours: float = 24.0,
                 now: datetime | None = None, me: str | None = None) -> dict[str, Any]:
    """The nodes (their GPUs and who holds each, the jobs they run), the queue in order and the leases
    that overlap the last ``hours``, as seen by ``viewer`` (a user id; None: an admin, who sees every job
    id). ``me`` (default ``viewer``) is whose entries are marked ``mine``: an admin's own jobs too."""
    now = now or utcnow()
    me = viewer if me is None else me
    since = now - timedelta(hours=hours)

    def job_of(job_id: str, owner: str) -> dict[str, Any]:
        return {"job": job_id if owned(owner, viewer) else None, "mine": owner == me}

    held = session.execute(
        select(GpuLease.node, GpuLease.device_index, GpuLease.job_id, GpuLease.leased_at, Job.owner_id, User.name)
        .join(Job, Job.id == GpuLease.job_id).join(User, User.id == Job.owner_id)
        .where(GpuLease.released_at.is_(None))).all()
    holder = {(node, index): {**job_of(job_id, owner), "user": user, "since": aware(leased)}
              for node, index, job_id, leased, owner, user in held}
    devices: dict[tuple[str, str], list[int]] = {}
    for node, index, job_id, *_ in held:
        devices.setdefault((node, job_id), []).append(index)

    running: dict[str, list[dict[str, Any]]] = {}
    for job_id, owner, user, gpus, started, status, worker, beat in session.execute(
            select(Job.id, Job.owner_id, User.name, Job.gpus, Job.started_at, Job.status, Job.claimed_by,
                   Job.heartbeat_at)
            .join(User, User.id == Job.owner_id).where(Job.status.in_(ON_A_NODE))
            .order_by(Job.started_at, Job.id)):
        node = node_of(worker)
        running.setdefault(node, []).append({
            **job_of(job_id, owner), "user": user, "gpus": gpus or 1, "status": status,
            "devices": sorted(devices.get((node, job_id), [])),
            "started_at": aware(started) if started else None, "heartbeat_at": aware(beat) if beat else None})

    # Signs of life: a node's ``seen_at`` is written when its workers start and by each worker's watch of the
    # queue (every quarter of ``heartbeat_timeout_s`` at most, ``worker.app.watch_the_queue``), and the jobs
    # it runs write heartbeats as they train. A node is alive while the latest of these is within
    # ``heartbeat_timeout_s``, the silence after which recovery takes a job's worker for lost.
    alive_after = now - timedelta(seconds=settings.heartbeat_timeout_s)
    nodes = []
    for row in session.scalars(select(Node).order_by(Node.name)):
        jobs_here = running.get(row.name, [])
        seen = max([aware(row.seen_at), *(j["heartbeat_at"] for j in jobs_here if j["heartbeat_at"])])
        gpus = [{"index": index, "memory_gib": float(gib),
                 **holder.get((row.name, index), {"job": None, "mine": False, "user": None, "since": None})}
                for index, gib in enumerate(row.gpu_memory_gib or [])]
        nodes.append({"name": row.name, "seen_at": seen, "alive": seen >= alive_after, "gpus": gpus,
                      "cpu_bf16_slowdown": row.cpu_bf16_slowdown,
                      "running": [{k: v for k, v in j.items() if k != "heartbeat_at"} for j in jobs_here]})

    leases, cut = _leases(session, now, since, job_of)
    return {"now": now, "hours": hours, "since": since, "nodes": nodes, "queue": _queue(session, settings, job_of),
            "leases": leases, "leases_truncated": cut}


def _queue(session: Session, settings: Settings, job_of: JobOf) -> list[dict[str, Any]]:
    """The queued jobs in the scheduler's order (``scheduler.queue_snapshot``)."""
    order = scheduler.queue_snapshot(session)
    rows = {row.id: row for row in session.execute(
        select(Job.id, Job.model, Job.created_at, Job.preemptions, User.name)
        .join(User, User.id == Job.owner_id).where(Job.status == JobStatus.QUEUED.value))}
    capped = quotas.running_limits(session, settings, {job.owner for job in order if job.owner})
    queue = []
    for waiting in order:
        row = rows.get(waiting.id)
        if row is None:  # it started (or was cancelled) between the two reads
            continue
        entry = job_of(waiting.id, waiting.owner)
        queue.append({
            "position": len(queue) + 1, **entry, "user": row.name, "gpus": waiting.need,
            "priority": waiting.priority, "created_at": aware(row.created_at),
            # preempted jobs keep their place (first come within a priority) and resume from a checkpoint
            "preempted": bool(row.preemptions),
            # the scheduler passes over them until one of their owner's running jobs ends
            "held_by_quota": waiting.owner in capped,
            "model": row.model if entry["job"] else base_name(row.model)})
    return queue


def _leases(session: Session, now: datetime, since: datetime, job_of: JobOf) -> tuple[list[dict[str, Any]], bool]:
    """The leases taken before ``now`` and not released before ``since``, oldest first: the newest
    ``MAX_LEASES`` of them, and whether older ones were left out."""
    rows = session.execute(
        select(GpuLease.node, GpuLease.device_index, GpuLease.job_id, GpuLease.leased_at, GpuLease.released_at,
               Job.owner_id, User.name)
        .join(Job, Job.id == GpuLease.job_id).join(User, User.id == Job.owner_id)
        .where(GpuLease.leased_at < now, or_(GpuLease.released_at.is_(None), GpuLease.released_at > since))
        .order_by(GpuLease.leased_at.desc(), GpuLease.id.desc()).limit(MAX_LEASES + 1)).all()
    cut = len(rows) > MAX_LEASES
    return [{"node": node, "device_index": index, **job_of(job_id, owner), "user": user,
             "started_at": aware(leased), "released_at": aware(released) if released else None}
            for node, index, job_id, leased, released, owner, user in reversed(rows[:MAX_LEASES])], cut
