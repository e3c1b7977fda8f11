"""The service's figures for Prometheus, read from the database of record at each scrape.

Whatever the workers did (jobs run, tokens trained, GPUs leased, recoveries, webhook deliveries) is in the
shared database, so the API exports it from there: the figures are right with any number of worker
processes and nodes, and with several API processes (each reads the same rows), and nothing is lost when
a worker dies. Counters are counts of rows that are never deleted (jobs, deliveries), so they only grow.
The API's own request counts and latencies are kept in process (``api.metrics``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from jobs.db import Database
from jobs.models import GpuLease, Job, MemorySample, Node, WebhookDelivery, aware, utcnow
from jobs.settings import Settings
from jobs.states import TERMINAL, JobStatus

log = logging.getLogger("lomo.metrics")

#: job durations (start to end, seconds): a minute to a week
DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0,
                    3 * 24 * 3600.0, 7 * 24 * 3600.0)
FINISHED = tuple(s.value for s in TERMINAL)
#: the jobs whose memory is exported: those that hold GPUs
RUNS = (JobStatus.RUNNING.value, JobStatus.PAUSING.value)


class ServiceCollector(Collector):
    """Jobs by status, the queue by priority, GPUs held and free per node, nodes up, finished jobs by
    outcome with their durations, tokens trained, recoveries and preemptions, webhook deliveries, and the
    predicted and measured peak memory of each running job. A database that cannot be read
    gives ``lomo_database_up 0`` and nothing else, never a failed scrape."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings

    def describe(self) -> list[Metric]:
        return []  # figures are read at each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("lomo_database_up", "1 when the scrape could read the service's database")
        try:
            with self.db.session() as session:
                families = list(self._families(session))
        except Exception as e:  # the database away: say so, and keep the scrape's other figures
            log.warning("metrics: the database could not be read: %s: %s", type(e).__name__, e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        took = GaugeMetricFamily("lomo_metrics_collect_seconds", "Time this scrape took to read the database")
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _families(self, session: Session) -> Iterator[Metric]:
        yield from self._jobs(session)
        yield from self._gpus(session)
        yield from self._deliveries(session)
        yield from self._memory(session)

    def _jobs(self, session: Session) -> Iterator[Metric]:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        by_status = GaugeMetricFamily("lomo_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        yield by_status
        finished = CounterMetricFamily("lomo_jobs_finished", "Jobs that ended, by outcome", labels=["status"])
        for status in FINISHED:
            finished.add_metric([status], counts.get(status, 0))
        yield finished

        queue = GaugeMetricFamily("lomo_queue_depth", "Queued jobs by priority", labels=["priority"])
        gpus_wanted = GaugeMetricFamily("lomo_queue_gpus", "GPUs the queued jobs ask for, by priority",
                                        labels=["priority"])
        for priority, jobs, gpus in session.execute(
                select(Job.priority, func.count(), func.coalesce(func.sum(Job.gpus), 0))
                .where(Job.status == JobStatus.QUEUED.value).group_by(Job.priority).order_by(Job.priority)):
            queue.add_metric([str(priority or 0)], jobs)
            gpus_wanted.add_metric([str(priority or 0)], gpus)
        yield queue
        yield gpus_wanted

        durations = HistogramMetricFamily("lomo_job_duration_seconds", "Time from a job's start to its end, by "
                                          "outcome (jobs that started)", labels=["status"])
        # bucketed by the database: a scrape costs the same with ten finished jobs or a year of them
        seconds = _seconds_between(session, Job.started_at, Job.finished_at)
        columns = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in DURATION_BUCKETS]
        rows = {status: figures for status, *figures in session.execute(
            select(Job.status, *columns).where(Job.status.in_(FINISHED), Job.started_at.is_not(None),
                                               Job.finished_at.is_not(None)).group_by(Job.status))}
        for status in FINISHED:
            count, total, *cumulative = rows.get(status, [0, 0.0] + [0] * len(DURATION_BUCKETS))
            buckets = [(f"{bound:g}", int(n)) for bound, n in zip(DURATION_BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", int(count)))
            durations.add_metric([status], buckets, float(total))
        yield durations

        tokens, recoveries, preemptions = session.execute(
            select(func.coalesce(func.sum(Job.trained_tokens), 0), func.coalesce(func.sum(Job.recoveries), 0),
                   func.coalesce(func.sum(Job.preemptions), 0))).one()
        for name, text, value in (
                ("lomo_trained_tokens", "Tokens trained, all jobs", tokens),
                ("lomo_job_recoveries", "Times a job was recovered after its worker was lost", recoveries),
                ("lomo_job_preemptions", "Times a job was preempted by one of higher priority", preemptions)):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter

    def _gpus(self, session: Session) -> Iterator[Metric]:
        held = dict(session.execute(select(GpuLease.node, func.count()).where(GpuLease.released_at.is_(None))
                                    .group_by(GpuLease.node)).all())
        gpus = GaugeMetricFamily("lomo_gpus", "GPUs of each node, leased to a job or free", labels=["node", "state"])
        up = GaugeMetricFamily("lomo_node_up", "1 while a worker of the node was seen within the heartbeat "
                               "timeout", labels=["node"])
        seen = GaugeMetricFamily("lomo_node_seen_timestamp_seconds", "When a worker of the node was last seen",
                                 labels=["node"])
        live_after = utcnow() - timedelta(seconds=self.settings.heartbeat_timeout_s)
        for node in session.scalars(select(Node).order_by(Node.name)):
            total = len(node.gpu_memory_gib or [])
            taken = held.get(node.name, 0)
            gpus.add_metric([node.name, "leased"], taken)
            gpus.add_metric([node.name, "free"], max(total - taken, 0))
            up.add_metric([node.name], 1 if aware(node.seen_at) >= live_after else 0)
            seen.add_metric([node.name], aware(node.seen_at).timestamp())
        yield gpus
        yield up
        yield seen

    def _deliveries(self, session: Session) -> Iterator[Metric]:
        counts = dict(session.execute(select(WebhookDelivery.status, func.count())
                                      .group_by(WebhookDelivery.status)).all())
        pending = GaugeMetricFamily("lomo_webhook_deliveries_pending", "Webhook deliveries not yet made")
        pending.add_metric([], counts.get("pending", 0))
        yield pending
        done = CounterMetricFamily("lomo_webhook_deliveries", "Webhook deliveries that ended, by outcome",
                                   labels=["status"])
        for status in ("delivered", "failed"):
            done.add_metric([status], counts.get(status, 0))
        yield done

    def _memory(self, session: Session) -> Iterator[Metric]:
        """Per job that runs (or is pausing), its predicted peak per device and the largest measured so far.
        Only those: they are bounded by the GPUs (a series per queued job would grow with the queue, and
        Prometheus keeps every series it has seen); a queued job's prediction is in its estimate."""
        family = GaugeMetricFamily("lomo_job_peak_memory_bytes", "Peak memory per device of each running job: "
                                   "predicted, and measured so far", labels=["job", "kind"])
        active = session.execute(select(Job.id, Job.predicted_memory).where(Job.status.in_(RUNS))).all()
        ids = [job_id for job_id, _ in active]
        measured = dict(session.execute(select(MemorySample.job_id, func.max(MemorySample.peak_bytes))
                                        .where(MemorySample.job_id.in_(ids)).group_by(MemorySample.job_id)).all()
                        ) if ids else {}
        for job_id, predicted in active:
            per_device = (predicted or {}).get("per_device") or {}
            if (predicted or {}).get("available") and per_device.get("peak_bytes") is not None:
                family.add_metric([job_id, "predicted"], per_device["peak_bytes"])
            if job_id in measured:
                family.add_metric([job_id, "measured"], measured[job_id])
        yield family


def _seconds_between(session: Session, start, end):
    """SQL for the seconds from ``start`` to ``end`` (timestamp columns) in the session's database."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)
