"""The Celery app of the workers: ``lomo worker`` (or ``celery -A worker.app worker``).

One task, ``lomo.run_job(job_id)``. Messages are acknowledged only when the job has ended
(``acks_late``) and a worker takes one at a time (prefetch 1); a duplicated or re-delivered message
is harmless because the job is claimed with one conditional UPDATE. When a worker starts it applies
the migrations and sends a wake-up per slot while jobs are queued, so a job whose message was lost
still runs, and restarting workers does not multiply messages.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_init, worker_ready
from sqlalchemy.exc import IntegrityError

from jobs import leases, lifecycle, nodes
from jobs.db import database
from jobs.queue import RUN_JOB, enqueue, make_celery
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
    return JobRunner(settings).run(job_id, poll=poll)


@worker_init.connect
def _migrate(**_kwargs) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        from jobs.migrate import upgrade

        upgrade(settings.resolved_database_url())


@worker_ready.connect
def _at_start(sender=None, **_kwargs) -> None:
    start_node(settings, getattr(getattr(sender, "controller", None), "concurrency", None))
    threading.Thread(target=watch_for_lost_jobs, args=(settings,), name="lomo-recovery", daemon=True).start()


def watch_for_lost_jobs(settings: Settings, stop: threading.Event | None = None) -> None:
    """In every worker: every quarter of ``heartbeat_timeout_s`` (at most 30 s), put the running jobs whose
    worker was lost back in the queue (``jobs.recovery``) and wake the workers for them."""
    stop = stop or threading.Event()
    db = database(settings.resolved_database_url())
    interval = max(0.2, min(settings.heartbeat_timeout_s / 4, 30.0))
    while not stop.wait(interval):
        try:
            for job_id in recover_lost(db, settings):
                enqueue(settings, job_id)
        except Exception:  # the database or the broker is away for now: look again at the next round
            log.exception("looking for jobs whose worker was lost failed; trying again in %.0f s", interval)


def start_node(settings: Settings, slots: int | None = None) -> None:
    """Register this node's GPUs, take back the leases of jobs that ended without releasing them, and
    wake the workers for what is queued.

    A message is a wake-up and the queue decides what runs, so a starting worker needs only enough of
    them to fill its own slots (one per GPU): jobs whose messages were lost (submitted while the broker
    was down) start in queue order, and restarts do not multiply the messages in the broker."""
    db = database(settings.resolved_database_url())
    try:
        with db.session() as session:
            nodes.register_node(session, settings.worker_name, settings.gpu_memory_gib)
    except IntegrityError:  # another worker process of this node registered it at the same moment
        with db.session() as session:
            nodes.register_node(session, settings.worker_name, settings.gpu_memory_gib)
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
    """How many wake-ups a starting worker sends when its pool's size is not known: one per GPU, as
    ``lomo worker`` runs by default."""
    return max(len(settings.gpu_memory_gib), 1)
