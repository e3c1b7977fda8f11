"""Which queued job a worker starts next, on which GPUs of its node.

The queue's order is priority (higher first), then first come. A worker that wakes up walks the queue
with the number of its node's GPUs that are free:

- the first job that fits the free GPUs starts;
- a job that needs more GPUs than are free waits. Jobs behind it may still start on the free GPUs
  (*backfill*: a 1-GPU job need not wait behind an 8-GPU job while 3 GPUs idle), but each time one
  does, the waiting job's ``bypassed`` count grows. At ``backfill_limit`` nothing behind it starts any more
  on the node that holds for it: the GPUs are held for it as running jobs end, so it cannot starve. One
  node holds (``held_on``: the first whose worker reached that decision), not every node where it fits:
  the others go on backfilling (were they all to drain for it, all but one would have idled in vain; the
  simulation of ``benchmarks/bench_scheduler.py`` measured most held GPU-hours on nodes it never started
  on). A node that is no longer seen (``heartbeat_timeout_s``) holds for nothing: another takes over;
- a job whose predicted peak per GPU is larger than this node's GPUs (nodes of different cards) is left
  to other nodes, and does not block this one;
- a job that needs more GPUs than this node has is spread over several nodes (``jobs.placement``): it
  starts here, this node launching it, when this node and enough other live nodes have its share free
  (all the shares are leased in this transaction); it waits like any job when they could but do not
  now, and is left to other nodes when this one cannot take a share.

Preemption (``LOMO_PREEMPT``): when the first job of the queue that this node can run does not fit the
free GPUs (counting those of jobs already pausing), and running jobs of lower priority hold enough of
them, such jobs are paused for it, lowest priority first, then the most recently started, until enough
GPUs will be free: each checkpoints at its next step, frees its GPUs and goes back to the queue
(``preempted_by``), to resume from that checkpoint when GPUs free up. Bounds: a job is preempted only
after it has run ``LOMO_PREEMPT_MIN_RUN_S`` since its last start, so it always makes progress; nothing
is preempted when even all eligible jobs would not free enough; one preemption at a time per waiting job
(its row is locked while it is decided); and while it is under way the freed GPUs are held for the job
it makes room for on the node whose jobs pause (no backfill takes them there). A preempted job keeps its
place in the queue: it resumes before the jobs of its priority that came after it.

Choosing, claiming and leasing happen in one transaction: the conditional ``UPDATE ... WHERE
status='queued'`` claims the job, the lease rows take the devices (a partial unique index refuses a
device already leased), and the waiting jobs' ``bypassed`` counts grow. When another worker won any
part of it, the whole transaction is rolled back and the choice is made again from the new state, so
no job starts twice, no device is leased twice, and a job is never left claimed without its GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from jobs import leases, lifecycle, placement, quotas
from jobs.db import Database, session_scope
from jobs.events import add_event
from jobs.models import GpuLease, Job, JobEvent, Node, User, aware, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus, transition_values

log = logging.getLogger("lomo.scheduler")


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    id: str
    need: int  # GPUs (or CPU ranks)
    bypassed: int = 0
    need_bytes: int | None = None  # predicted peak per GPU, when the memory model gave one
    priority: int = 0
    owner: str | None = None
    held_on: str | None = None  # the node that holds its GPUs for it (at the backfill limit), if a live one


@dataclass(frozen=True)
class Running:
    """A running job as preemption sees it: the GPUs it holds on this node, since when it runs."""

    id: str
    priority: int
    gpus: int
    started_at: datetime


@dataclass
class Choice:
    job_id: str | None  # the job to start, or None
    skipped: list[str] = field(default_factory=list)  # jobs ahead of it that wait for more GPUs than are free
    held_for: str | None = None  # the job the free GPUs are held for (it reached the backfill limit)
    placement: list[tuple[str, int]] | None = None  # a job spread over nodes: (node, GPUs) each, this one first


def fits_node(job: Waiting, node_size: int | None, device_bytes: int | None = None) -> bool:
    """Whether ``job`` can ever run on a node of ``node_size`` GPUs of ``device_bytes`` each (a CPU node:
    ``node_size`` None, always)."""
    if node_size is None:
        return True
    too_small = device_bytes is not None and job.need_bytes is not None and job.need_bytes > device_bytes
    return not too_small and job.need <= node_size


def choose(queue: list[Waiting], free: int | None, node_size: int | None, backfill_limit: int,
           device_bytes: int | None = None, reserved: frozenset[str] = frozenset(),
           node: str | None = None,
           spread: Callable[[Waiting], list[tuple[str, int]] | str | None] | None = None) -> Choice:
    """The job to start from ``queue`` (in queue order) with ``free`` GPUs (None: a CPU node, where
    the first job starts), on ``node`` of ``node_size`` GPUs of ``device_bytes`` each (the smallest).
    The GPUs are held for a job of ``reserved`` (running jobs are being preempted for it) as for one
    at the backfill limit, unless another node holds for that one (``Waiting.held_on``).

    A job larger than the node is asked of ``spread`` (``jobs.placement.plan``): where it starts over
    several nodes with this one as its launcher, ``placement.WAIT`` when it could but not now (it waits
    like a job that needs more GPUs than are free; at the backfill limit every node it could use holds
    for it, since it needs several), or None (never from here: another node's job)."""
    skipped: list[str] = []
    for job in queue:
        spreads = (spread is not None and node_size is not None and job.need > node_size
                   and fits_node(replace(job, need=node_size), node_size, device_bytes))
        if spreads:
            where = spread(job)
            if where is None:
                continue
            if where != placement.WAIT:
                return Choice(job.id, skipped, placement=list(where))
        elif not fits_node(job, node_size, device_bytes):
            continue  # never fits here (too few GPUs, or GPUs smaller than its predicted peak): another node's job
        elif free is None or job.need <= free:
            return Choice(job.id, skipped)
        if job.id in reserved:
            return Choice(None, skipped, held_for=job.id)
        if job.bypassed >= backfill_limit:
            if not spreads and job.held_on is not None and job.held_on != node:
                continue  # another node drains for it; its count is at the limit already, and stays there
            return Choice(None, skipped, held_for=job.id)
        skipped.append(job.id)
    return Choice(None, skipped)


def preemption_victims(waiting: Waiting, free: int, running: list[Running], now: datetime,
                       min_run_s: float) -> list[str]:
    """The running jobs to preempt so that ``waiting`` can start with ``free`` GPUs free: of those of
    lower priority that have run ``min_run_s`` since their start, lowest priority first, then the most
    recently started (the least time since its start is lost to the restart), until enough GPUs will be
    free. Empty when even all of them would not free enough: nothing is preempted in vain."""
    if waiting.need <= free:
        return []
    eligible = sorted((r for r in running if r.priority < waiting.priority
                       and (now - r.started_at).total_seconds() >= min_run_s),
                      key=lambda r: (r.priority, -r.started_at.timestamp(), r.id))
    chosen, freed = [], free
    for job in eligible:
        chosen.append(job.id)
        freed += job.gpus
        if freed >= waiting.need:
            return chosen
    return []


@dataclass
class Started:
    job_id: str
    devices: list[int] | None  # leased GPU indices on the node; None on a CPU node
    attempt: int
    ahead_of: list[str]  # waiting jobs this one started ahead of (backfill)
    placement: list[tuple[str, int]] | None = None  # spread over nodes (``jobs.placement``): this node launches


class _Lost(Exception):
    """Another worker claimed the job first: choose again."""


def queue_snapshot(session: Session, live_after: datetime | None = None) -> list[Waiting]:
    """The queued jobs in queue order. A job's ``held_on`` counts only while that node was seen after
    ``live_after`` (when given)."""
    rows = session.execute(select(Job.id, Job.gpus, Job.bypassed, Job.predicted_memory, Job.priority, Job.owner_id,
                                  Job.held_on)
                           .where(Job.status == JobStatus.QUEUED.value)
                           .order_by(Job.priority.desc(), Job.created_at, Job.id))
    queue = [Waiting(id, need or 1, bypassed or 0, _predicted_peak(predicted), priority or 0, owner, held_on)
             for id, need, bypassed, predicted, priority, owner, held_on in rows]
    holding = {job.held_on for job in queue if job.held_on}
    if holding and live_after is not None:
        live = set(session.scalars(select(Node.name).where(Node.name.in_(holding), Node.seen_at >= live_after)))
        queue = [job if job.held_on in live or job.held_on is None else replace(job, held_on=None) for job in queue]
    return queue


def _over_running_quota(session: Session, queue: list[Waiting], settings: Settings | None) -> list[Waiting]:
    """The queue less the jobs of users whose running-jobs quota is reached (``jobs.quotas``): they keep
    their place and start when one of their owner's jobs ends. The first of each such user's jobs gets
    an event that says why it waits."""
    if settings is None:
        return queue
    capped = quotas.running_limits(session, settings, {job.owner for job in queue if job.owner})
    if not capped:
        return queue
    noted = set()
    for job in queue:
        if job.owner in capped and job.owner not in noted:
            noted.add(job.owner)
            _note_waiting(session, job.id, capped[job.owner])
    return [job for job in queue if job.owner not in capped]


def preemptions_under_way(session: Session, node: str | None = None) -> frozenset[str]:
    """The queued jobs that running jobs are pausing for (on ``node``, when given: the GPUs of that node
    are held for them, not those of the others)."""
    query = select(Job.preempted_by).where(Job.status == JobStatus.PAUSING.value, Job.preempted_by.is_not(None))
    if node is not None:
        query = query.where(Job.id.in_(select(GpuLease.job_id).where(GpuLease.node == node,
                                                                     GpuLease.released_at.is_(None))))
    return frozenset(session.scalars(query))


def running_on(session: Session, node: str) -> list[Running]:
    """The running jobs that hold GPUs of ``node`` (and whose cancellation was not asked)."""
    rows = session.execute(
        select(Job.id, Job.priority, Job.started_at, func.count(GpuLease.id))
        .join(GpuLease, GpuLease.job_id == Job.id)
        .where(GpuLease.node == node, GpuLease.released_at.is_(None), Job.status == JobStatus.RUNNING.value,
               Job.cancel_requested.is_(False))
        .group_by(Job.id, Job.priority, Job.started_at))
    return [Running(id, priority or 0, count, aware(started)) for id, priority, started, count in rows]


def _predicted_peak(predicted: dict | None) -> int | None:
    """The predicted peak per GPU of a job placed on GPUs (None for a CPU prediction or none at all)."""
    if not predicted or not predicted.get("available") or predicted.get("device") != "cuda":
        return None
    peak = (predicted.get("per_device") or {}).get("peak_bytes")
    return int(peak) if peak else None


def start_next(db: Database, node: str, node_size: int | None, worker: str, backfill_limit: int,
               attempts: int = 50, device_bytes: int | None = None,
               preempt_min_run_s: float | None = None, quota_settings: Settings | None = None,
               heartbeat_timeout_s: float = 60.0) -> Started | None:
    """Claim the next job this node can start and lease its GPUs, or None when no queued job can start
    here now. ``node_size`` is the node's GPU count (None on a CPU node), ``device_bytes`` the memory of
    its smallest GPU. With ``preempt_min_run_s`` (preemption on), a waiting job that running jobs of
    lower priority block has them paused for it (see the module's docstring). With ``quota_settings``,
    the jobs of users at their running-jobs quota wait (``jobs.quotas``). A node not seen for
    ``heartbeat_timeout_s`` holds GPUs for no job (see ``Waiting.held_on``)."""
    for _ in range(attempts):
        try:
            with session_scope(db.sessions) as session:
                return _start_next(session, node, node_size, worker, backfill_limit, device_bytes,
                                   preempt_min_run_s, quota_settings, heartbeat_timeout_s)
        except (_Lost, IntegrityError):
            continue  # another worker changed the queue or the leases between our read and our write
        except OperationalError as e:
            # SQLite: "database is locked" when many workers write at once; Postgres: a deadlock or a
            # serialization failure between two workers' transactions (rolled back: choose again)
            if "locked" not in str(e) and getattr(e.orig, "sqlstate", None) not in ("40P01", "40001"):
                raise
    log.warning("%s: gave up choosing a job after %d conflicts; the next wake-up tries again", worker, attempts)
    return None


def _start_next(session: Session, node: str, node_size: int | None, worker: str,
                backfill_limit: int, device_bytes: int | None = None,
                preempt_min_run_s: float | None = None, quota_settings: Settings | None = None,
                heartbeat_timeout_s: float = 60.0) -> Started | None:
    taken = leases.leased_devices(session, node) if node_size is not None else {}
    free = [i for i in range(node_size) if i not in taken] if node_size is not None else None
    live_after = utcnow() - timedelta(seconds=heartbeat_timeout_s)
    queue = _over_running_quota(session, queue_snapshot(session, live_after), quota_settings)
    reserved = preemptions_under_way(session, node)
    spread = None
    if node_size is not None and free is not None and any(job.need > node_size for job in queue):
        others = placement.peers(session, node, device_bytes is not None, live_after)

        def spread(job: Waiting) -> list[tuple[str, int]] | str | None:
            return placement.plan(job.need, node, node_size, len(free), placement.large_enough(others, job.need_bytes))
    choice = choose(queue, len(free) if free is not None else None, node_size, backfill_limit, device_bytes,
                    reserved, node, spread)
    spreads = node_size is not None and choice.held_for is not None and next(
        job.need for job in queue if job.id == choice.held_for) > node_size
    if choice.held_for is not None and choice.held_for not in reserved and not spreads:
        held = next(job for job in queue if job.id == choice.held_for)
        if held.held_on != node:  # this node holds for it from now on (conditional: one node wins)
            live = select(Node.name).where(Node.seen_at >= live_after)
            taken = session.execute(update(Job).where(
                Job.id == held.id, Job.status == JobStatus.QUEUED.value,
                or_(Job.held_on.is_(None), Job.held_on == node, Job.held_on.not_in(live)),
            ).values(held_on=node)).rowcount
            if taken != 1:
                raise _Lost()
    if choice.job_id is None and free is not None and preempt_min_run_s is not None:
        _preempt_for(session, node, queue, len(free), node_size, device_bytes, reserved, preempt_min_run_s)
    for job_id in choice.skipped[:1] + ([choice.held_for] if choice.held_for else []):
        need = next(j.need for j in queue if j.id == job_id)
        if node_size is not None and need > node_size:
            said = (f"waiting: {need} GPU(s) needed, more than a node has: it starts when enough nodes have "
                    "their share free at once")
        else:
            said = f"waiting: {need} GPU(s) needed, {len(free or [])} of {node_size} free on {node}"
        _note_waiting(session, job_id, said + ("; the GPUs are held for it" if job_id == choice.held_for else ""))
    if choice.job_id is None:
        return None
    owner = next(job.owner for job in queue if job.id == choice.job_id)
    if quota_settings is not None and owner:
        # Two workers may choose two jobs of one user at once: the owner's row is locked and the quota
        # counted again under the lock, so the second waits for the first and then sees its job running.
        session.execute(select(User.id).where(User.id == owner).with_for_update())
        if quotas.running_limits(session, quota_settings, {owner}):
            raise _Lost()
    now = utcnow()
    claimed = lifecycle.claim(session, choice.job_id, worker, now)
    if not claimed:
        raise _Lost()
    job = session.get(Job, choice.job_id)
    devices = None
    if choice.placement is not None:
        sizes = {node: node_size, **{peer.name: peer.slots for peer in others}}
        try:
            devices = placement.lease(session, job, choice.placement, sizes, now)
        except LookupError:
            raise _Lost() from None
    elif free is not None:
        devices = free[:job.gpus or 1]
        session.add_all([GpuLease(node=node, device_index=i, job_id=job.id, attempt=job.attempt, leased_at=now)
                         for i in devices])
        session.flush()  # the unique index decides here, inside the transaction
    where = (f" on GPUs {devices} of {node}" if devices is not None else "")
    if choice.placement is not None:
        where = " across nodes " + ", ".join(f"{name} ({count})" for name, count in choice.placement) \
            + f"; {node} launches"
    add_event(session, job.id, f"started by worker {worker} (attempt {job.attempt}){where}")
    if choice.skipped:
        # Conditional on the count this choice saw: if another worker started a job ahead of one of them
        # meanwhile, the limit might be passed; then the whole choice is made again.
        bumped = session.execute(
            update(Job).where(Job.id.in_(choice.skipped), Job.status == JobStatus.QUEUED.value,
                              Job.bypassed < backfill_limit).values(bypassed=Job.bypassed + 1)).rowcount
        if bumped != len(choice.skipped):
            raise _Lost()
        add_event(session, job.id, "started ahead of " + ", ".join(choice.skipped)
                          + " (waiting for more GPUs than are free): backfill")
        for waiting in queue:
            if waiting.id in choice.skipped and waiting.bypassed + 1 == backfill_limit:
                add_event(session, waiting.id,
                                  f"waiting: {backfill_limit} job(s) behind this one have started meanwhile; none "
                                  f"more will: the GPUs of {node} are held for it as they free up")
    return Started(job.id, devices, job.attempt, choice.skipped, choice.placement)


def _note_waiting(session: Session, job_id: str, message: str) -> None:
    """An event on a job that waits for GPUs, once per wait (not at every look at the queue)."""
    last = session.scalar(select(JobEvent.message).where(JobEvent.job_id == job_id)
                          .order_by(JobEvent.id.desc()).limit(1))
    if last is None or not last.startswith("waiting:"):
        add_event(session, job_id, message)


def _preempt_for(session: Session, node: str, queue: list[Waiting], free: int, node_size: int,
                 device_bytes: int | None, reserved: frozenset[str], min_run_s: float) -> None:
    """Pause the running jobs of lower priority that the first job of the queue this node can run needs
    the GPUs of (unless a preemption is already under way for it)."""
    target = next((job for job in queue if fits_node(job, node_size, device_bytes)), None)
    if target is None or target.id in reserved:
        return
    # One decision at a time for a waiting job (workers of other nodes may look at it now): its row is
    # locked, and what is under way for it is read again under the lock.
    if session.scalar(select(Job.id).where(Job.id == target.id, Job.status == JobStatus.QUEUED.value)
                      .with_for_update()) is None or target.id in preemptions_under_way(session):
        return
    now = utcnow()
    running = running_on(session, node)
    freeing = session.scalar(select(func.count(GpuLease.id)).join(Job, Job.id == GpuLease.job_id).where(
        GpuLease.node == node, GpuLease.released_at.is_(None), Job.status == JobStatus.PAUSING.value)) or 0
    victims = preemption_victims(target, free + freeing, running, now, min_run_s)  # pausing ones free theirs soon
    if not victims:
        return
    by_id = {job.id: job for job in running}
    for victim in victims:
        done = session.execute(
            update(Job).where(Job.id == victim, Job.status == JobStatus.RUNNING.value)
            .values(preempted_by=target.id, **transition_values(JobStatus.RUNNING, JobStatus.PAUSING, now))
        ).rowcount
        if done != 1:
            raise _Lost()  # it ended or was paused meanwhile: look again
        add_event(session, victim, f"preempted by {target.id} (priority {target.priority} over "
                                   f"{by_id[victim].priority}): the run checkpoints at its next step, frees its "
                                   "GPUs and goes back to the queue, to resume when GPUs free up", "warning")
    add_event(session, target.id, f"waiting: preempting {', '.join(victims)} (lower priority) for its "
                                  f"{target.need} GPU(s) on {node}")
    log.info("job %s: preempting %s on %s", target.id, ", ".join(victims), node)
