"""The Celery side that the API needs: one app configured from the settings, and ``enqueue``.

The worker package registers the task implementations on the same app (``worker.app``); the API only
sends messages by task name, so it never imports the worker or torch.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from jobs.settings import Settings

log = logging.getLogger(__name__)
RUN_JOB = "lomo.run_job"
#: longer than any job: with acks_late, Redis re-delivers a message not acknowledged within this time
VISIBILITY_TIMEOUT_S = 30 * 24 * 3600


def make_celery(settings: Settings) -> Celery:
    url = settings.resolved_broker_url()
    if url.startswith("sqla+sqlite"):
        (settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = Celery("lomo", broker=url)
    transport_options = {}
    if url.startswith(("redis", "rediss")):
        transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,  # acknowledged when the job ends: a worker that dies leaves the message queued
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker takes one job at a time; the rest stay for other workers
        task_ignore_result=True,  # results live in the jobs table
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker that is away is waited for, however long
        # A lost broker connection must not stop a training job: its state is in the database, and its
        # message, if the broker gives it again, finds it claimed already (the claim is conditional).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@lru_cache(maxsize=8)
def _producer(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def enqueue(settings: Settings, job_id: str, countdown: float | None = None, poll: bool = True) -> None:
    """Send ``run_job(job_id)`` (after ``countdown`` seconds): a wake-up for the workers, which start the
    first job of the queue they can. ``poll=False`` sends one that is not re-sent when nothing can
    start. Raises when the broker cannot be reached (the job stays queued in the database: every
    starting worker sends a wake-up per slot while jobs are queued, and running workers one per free
    GPU or slot every few seconds, ``worker.app.watch_the_queue``)."""
    app = _producer(settings.model_dump_json())
    app.send_task(RUN_JOB, args=[job_id], kwargs={} if poll else {"poll": False}, queue=settings.queue,
                  countdown=countdown, retry=True,
                  retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})


DELIVER_WEBHOOK = "lomo.deliver_webhook"


def webhook_queue(settings: Settings) -> str:
    """The queue of webhook deliveries: its own, so that a delivery never waits behind a training job
    (``lomo worker`` runs a small pool of threads for it beside the training worker)."""
    return f"{settings.queue}.webhooks"


def send_delivery(settings: Settings, delivery_id: str, countdown: float | None = None) -> None:
    """Send ``deliver_webhook(delivery_id)`` (after ``countdown`` seconds). A duplicate is harmless: an
    attempt takes the delivery with a conditional UPDATE."""
    app = _producer(settings.model_dump_json())
    app.send_task(DELIVER_WEBHOOK, args=[delivery_id], queue=webhook_queue(settings), countdown=countdown,
                  retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})


def dispatch_due_webhooks(settings: Settings, db) -> int:
    """Send the task of every delivery that is due (the first attempt of an event just written, or one
    whose message was lost); returns how many were sent."""
    from jobs import webhooks

    with db.session() as session:
        ids = webhooks.due(session)
    for delivery_id in ids:
        send_delivery(settings, delivery_id)
    return len(ids)
