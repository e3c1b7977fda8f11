"""The Celery app of the workers: ``lomo worker`` (or ``celery -A worker.app worker``).

Two tasks: ``lomo.run_job(job_id)``, and ``lomo.deliver_webhook(delivery_id)`` on a queue of its own
(``jobs.webhooks``; ``lomo worker`` runs a few threads for it beside the training worker). A job's
messages are acknowledged only when the job has ended
(``acks_late``) and a worker takes one at a time (prefetch 1); a duplicated or re-delivered message
is harmless because the job is claimed with one conditional UPDATE. When a worker starts it applies
the migrations and sends a wake-up per slot while jobs are queued, so a job whose message was lost
still runs, and restarting workers does not multiply messages. While it runs, it looks at the database
every few seconds (``watch_the_queue``): jobs whose worker was lost are recovered, and free GPUs with
jobs queued get a wake-up each, so a broker that lost its messages (restarted without persistence)
needs no worker restart either.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_ready
from kombu.exceptions import KombuError
from sqlalchemy.exc import IntegrityError

from jobs import leases, lifecycle, logs, nodes, placement, webhooks
from jobs.db import UNREACHABLE
from jobs.queue import DELIVER_WEBHOOK, RUN_JOB, dispatch_due_webhooks, enqueue, make_celery, send_delivery
from jobs.recovery import recover_lost
from jobs.settings import Settings, get_settings
from worker.supervisor import JobRunner

log = logging.getLogger("lomo.worker")


def with_node_gpus(settings: Settings) -> Settings:
    """The settings with this node's GPUs: declared (``LOMO_GPU_MEMORY_GIB``), or discovered with
    nvidia-smi unless ``LOMO_DEVICE=cpu``. The worker registers them for the API at start."""
    if settings.gpu_memory_gib or settings.device == "cpu":
        return settings
    from jobs.devices import discover_gpus

    found = discover_gpus()
    if found:
        log.info("%d GPU(s) found: %s GiB", len(found), ", ".join(f"{g:.1f}" for g in found))
        return settings.model_copy(update={"gpu_memory_gib": found})
    return settings


settings = with_node_gpus(get_settings())
celery_app = make_celery(settings)
app = celery_app  # `celery -A worker.app` finds it under either name


@celery_app.task(name=RUN_JOB)
def run_job(job_id: str, poll: bool = True) -> str:
    outcome = JobRunner(settings).run(job_id, poll=poll)
    if outcome not in ("skipped", "waiting"):  # a job ended (or paused): its webhooks go out now
        try:
            dispatch_due_webhooks(settings, settings.worker_database())
        except Exception as e:  # the watch sends them within a few seconds anyway
            log.warning("could not send the webhook deliveries: %s", e)
    return outcome


@celery_app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    """One attempt of a webhook delivery (``jobs.webhooks.attempt``); a failed one is sent again after
    its backoff."""
    wait = webhooks.attempt(settings.worker_database(), settings, delivery_id)
    if wait is not None:
        send_delivery(settings, delivery_id, countdown=wait)


@worker_init.connect
def _migrate(**_kwargs) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        from jobs.migrate import upgrade

        upgrade(settings.resolved_database_url())


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger=None, **_kwargs) -> None:
    if logger is not None:  # LOMO_LOG_FORMAT=json: Celery's handlers write JSON lines too
        logs.reformat(logger)
        if logs.json_wanted():
            logging.captureWarnings(True)


@worker_ready.connect
def _at_start(sender=None, **_kwargs) -> None:
    if os.environ.get("LOMO_WEBHOOKS_ONLY"):  # the webhooks worker beside a training worker: no node of its own
        return
    slots = getattr(getattr(sender, "controller", None), "concurrency", None)
    try:
        start_node(settings, slots)
    finally:  # the watch also covers what a start that failed (the database away) left undone
        threading.Thread(target=watch_the_queue, args=(settings, slots), name="lomo-watch", daemon=True).start()


def watch_the_queue(settings: Settings, slots: int | None = None, stop: threading.Event | None = None) -> None:
    """In every worker, every quarter of ``heartbeat_timeout_s`` (at most 30 s): put the running jobs whose
    worker was lost back in the queue (``jobs.recovery``) and wake the workers for them; while this
    node has free GPUs (free slots on a CPU node) and jobs are queued, send a wake-up per free one
    (``wake_idle``), so that jobs whose messages the broker lost (a restart of Redis without persistence,
    a job submitted while it was down) start without a worker restart; send the webhook deliveries
    that are due (a new event's, or one whose message was lost); and note that this node is up
    (``nodes.node_seen``: the cluster view tells live nodes by it)."""
    stop = stop or threading.Event()
    db = settings.worker_database()
    interval = max(0.2, min(settings.heartbeat_timeout_s / 4, 30.0))
    # After an outage of the database, every heartbeat is as old as the outage: recovery waits a heartbeat
    # timeout after this worker last failed to reach it, so that the live workers write theirs first.
    unreachable_at = float("-inf")
    while not stop.wait(interval):
        try:
            if time.monotonic() - unreachable_at > settings.heartbeat_timeout_s:
                for job_id in recover_lost(db, settings):
                    enqueue(settings, job_id)
            with db.session() as session:
                nodes.node_seen(session, settings.worker_name)
            start_joins(settings, db)
            wake_idle(settings, db, slots or startup_wake_ups(settings))
            dispatch_due_webhooks(settings, db)
        except (*UNREACHABLE, KombuError, OSError) as error:  # the database or the broker is away for now
            if isinstance(error, UNREACHABLE):
                unreachable_at = time.monotonic()
            log.warning("looking at the queue failed (%s: %s); trying again in %.0f s", type(error).__name__,
                        error, interval)
        except Exception:  # a bug of ours: logged whole, and the watch goes on
            log.exception("looking at the queue failed; trying again in %.0f s", interval)


def start_joins(settings: Settings, db) -> list[threading.Thread]:
    """Join the jobs spread over several nodes that have leases on this node (``jobs.placement``), each in
    a thread of its own beside the watch: it starts this node's ranks, follows them to their end and
    releases this node's part (the launcher's worker holds the job's slot; the GPUs are leased already)."""
    with db.session() as session:
        owed = placement.joins_owed(session, settings.worker_name)
    started = []
    for join in owed:
        thread = threading.Thread(target=_join, args=(settings, join), name=f"lomo-join-{join.job_id}", daemon=True)
        thread.start()
        started.append(thread)
    return started


def _join(settings: Settings, join: placement.Join) -> None:
    with logs.context(job_id=join.job_id):
        try:
            JobRunner(settings).join(join)
        except Exception:  # the launcher sees the node's failure or its silence, and ends the job
            log.exception("job %s: joining it failed", join.job_id)


def wake_idle(settings: Settings, db, slots: int) -> int:
    """Send one wake-up (not re-sent: they do not multiply) per free slot of this worker that has a free
    GPU of this node to start a job on (a free CPU rank, with ``cpu_ranks``; per free slot on a CPU node
    without), up to the number of queued jobs;
    returns how many were sent."""
    with db.session() as session:
        queued = lifecycle.queued_job_ids(session)
        if not queued:
            return 0
        free = slots - lifecycle.running_on_worker(session, settings.worker_name)
        total = settings.rank_slots()
        if total is not None:
            free = min(free, total - len(leases.leased_devices(session, settings.worker_name)))
    wake = queued[:max(free, 0)]
    for job_id in wake:
        enqueue(settings, job_id, poll=False)
    return len(wake)


def start_node(settings: Settings, slots: int | None = None) -> None:
    """Register this node's GPUs, take back the leases of jobs that ended without releasing them, and
    wake the workers for what is queued.

    A message is a wake-up and the queue decides what runs, so a starting worker needs only enough of
    them to fill its own slots (one per GPU): jobs whose messages were lost (submitted while the broker
    was down) start in queue order, and restarts do not multiply the messages in the broker."""
    db = settings.worker_database()
    slowdown = None
    if not settings.gpu_memory_gib:  # a CPU node: does it multiply bf16 natively? (bf16 jobs crawl if not)
        from lomo_core.cpu_probe import probe_bf16_matmul

        probe = probe_bf16_matmul()
        slowdown = round(probe.slowdown, 2)
        log.info("bf16 matmul on this CPU: %.2f ms against %.2f ms in fp32 (%s)", probe.bf16_ms, probe.fp32_ms,
                 "native" if probe.native else "emulated: bf16 jobs are warned to use fp32")
    try:
        with db.session() as session:
            nodes.register_node(session, settings.worker_name, settings.gpu_memory_gib, slowdown, settings.cpu_ranks)
    except IntegrityError:  # another worker process of this node registered it at the same moment
        with db.session() as session:
            nodes.register_node(session, settings.worker_name, settings.gpu_memory_gib, slowdown, settings.cpu_ranks)
    for job_id in recover_lost(db, settings):  # lost while no worker was up: they are queued again first
        log.info("job %s: its worker was lost; it is queued again", job_id)
    with db.session() as session:
        returned = leases.release_orphans(session, settings.worker_name)
        queued = lifecycle.queued_job_ids(session)
    if returned:
        log.info("released the GPUs of ended job(s) %s", ", ".join(returned))
    wake = queued[:slots or startup_wake_ups(settings)]
    for job_id in wake:
        enqueue(settings, job_id, poll=False)
    if wake:
        log.info("%d job(s) queued: sent %d wake-up(s), one per slot of this worker", len(queued), len(wake))


def startup_wake_ups(settings: Settings) -> int:
    """How many wake-ups a starting worker sends when its pool's size is not known: one per GPU (per CPU
    rank, with ``cpu_ranks``), as ``lomo worker`` runs by default."""
    return settings.rank_slots() or 1
