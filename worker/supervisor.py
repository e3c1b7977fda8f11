"""Run one job: claim it, start its training process, stream its records to the database, end it.

The training runs in a child process (``worker.runner``) so that a crash, an out-of-memory kill or a
cancellation never takes the worker down with it. This module is the only place that decides a job's
final status from what the child reported and how it exited.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jobs import admission, catalog, events, files, leases, lifecycle, logs, placement, scheduler, telemetry
from jobs import devices as devices_mod
from jobs.db import UNREACHABLE, Database, is_unreachable, retrying
from jobs.models import File, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus

log = logging.getLogger("lomo.worker")
LOG_FILE = "train.log"
#: in a job's folder: the attempt that runs it now (``worker.runner`` stops when it is not its own)
ATTEMPT_FILE = ".attempt"


@dataclass
class ChildReport:
    """What the supervised process said and how it ended."""

    returncode: int
    final: dict[str, Any] | None  # the last "done" / "cancelled" / "error" line
    cancel_requested: bool
    killed: bool  # we had to SIGKILL it after the grace period
    val: list[tuple[int, float]] = field(default_factory=list)
    validation_rows: int = 0
    fenced: bool = False  # the job was recovered elsewhere meanwhile: this attempt was stopped, ends nothing
    pause_sent: bool = False  # the child was asked to checkpoint and stop
    abandoned: bool = False  # the database stayed away too long: stopped, the job is left to recovery
    node_failure: dict[str, Any] | None = None  # spread over nodes: another node failed or was lost
    stopped_for_node: bool = False  # this node's ranks were stopped because of ``node_failure``


class JobRunner:
    def __init__(self, settings: Settings, db: Database | None = None, command: list[str] | None = None) -> None:
        self.settings = settings
        self.db = db or settings.worker_database()
        #: the training process; tests replace it to check supervision with a process that misbehaves
        self.command = command or [sys.executable, "-m", "worker.runner"]

    # ------------------------------------------------------------------------------------------ entry
    def run(self, job_id: str, poll: bool = True) -> str:
        """Start the next job this node can run (see ``jobs.scheduler``), run it to its end, and wake the
        workers for what its GPUs can start next.

        A task message is a wake-up: ``job_id`` is the job it was sent for, but the queue decides what
        runs. Every job sends one message when it is created. A message that finds jobs waiting but
        none that can start here now is sent again after ``requeue_delay_s`` (when ``poll``) as long as
        the job it was sent for is queued, so every queued job keeps a message that polls for it, and
        messages do not multiply; a job that ends also sends immediate wake-ups that are not re-sent.
        Returns the final status of the job that ran ("preempted" when it paused for a job of higher
        priority and is queued again), "waiting" when queued jobs wait for GPUs, or "skipped" when the
        queue is empty.
        """
        worker = f"{self.settings.worker_name}:{os.getpid()}"
        kind, _count, device_bytes = self.settings.device_inventory()
        node_size = self.settings.rank_slots()  # GPUs, or CPU ranks with LOMO_CPU_RANKS; None: not counted
        try:
            started = scheduler.start_next(self.db, self.settings.worker_name, node_size, worker,
                                           self.settings.backfill_limit,
                                           device_bytes=device_bytes if kind == "cuda" else None,
                                           preempt_min_run_s=(self.settings.preempt_min_run_s
                                                              if self.settings.preempt else None),
                                           quota_settings=self.settings,
                                           heartbeat_timeout_s=self.settings.heartbeat_timeout_s)
        except Exception:  # the database failed us: keep the wake-up alive, and let Celery log the error
            if poll:
                self._send(job_id, countdown=max(self.settings.requeue_delay_s, 1.0), poll=True)
            raise
        if started is None:
            with self.db.session() as session:
                queued = bool(lifecycle.queued_job_ids(session))
            if not queued:
                log.info("message for %s: no queued job to run", job_id)
                return "skipped"
            # A message keeps polling while its own job waits: every queued job has its poller, and the
            # messages of jobs that have started (by another wake-up) end here instead of multiplying.
            if poll and self._queued(job_id):
                self._send(job_id, countdown=self.settings.requeue_delay_s, poll=True)
            return "waiting"
        if poll and started.job_id != job_id and self._queued(job_id):
            # this message started another job: its own job keeps a poller meanwhile
            self._send(job_id, countdown=self.settings.requeue_delay_s, poll=True)
        with logs.context(job_id=started.job_id):  # the worker's log lines of this run name the job
            return self._run_started(started)

    def _run_started(self, started: scheduler.Started) -> str:
        """Run the job the scheduler started here to its end (``run``)."""
        job_id, attempt = started.job_id, started.attempt
        devices = started.devices if self.settings.gpu_memory_gib else None  # CPU ranks are not devices
        log.info("job %s: attempt %d starts%s%s", job_id, attempt,
                 f" on GPU(s) {', '.join(map(str, devices))}" if devices else "",
                 f", launching across {len(started.placement)} nodes" if started.placement else "")
        fenced = abandoned = False
        patience = self.settings.db_outage_s  # how long each write below waits for a database that is away
        try:
            prepared = retrying(lambda: self._prepare(job_id, attempt), f"job {job_id}: preparing", patience)
            if isinstance(prepared, lifecycle.Outcome):
                outcome = prepared
            else:
                config_path, output_dir, names = prepared
                nodes = None
                if started.placement:  # spread over nodes: this one launches; the others join its rendezvous
                    nodes = retrying(lambda: self._rendezvous(job_id, attempt, config_path, started.placement),
                                     f"job {job_id}: its rendezvous", patience)
                report = self.supervise(job_id, config_path, output_dir, devices, attempt, nodes=nodes)
                fenced, abandoned = report.fenced, report.abandoned
                final_kind = (report.final or {}).get("kind")
                if nodes and not (fenced or abandoned or report.cancel_requested or report.node_failure) \
                        and final_kind not in ("done", "paused"):
                    report.node_failure = self._after_spread_failure(job_id)
                lost = report.node_failure if (report.node_failure or {}).get("code") == "node_lost" else None
                if lost and not (fenced or abandoned) and (report.final or {}).get("kind") != "done":
                    return self._requeue_lost_node(job_id, attempt, lost["message"], len(devices or [1]))
                outcome = (lifecycle.Outcome(JobStatus.FAILED) if fenced or abandoned else
                           retrying(lambda: self._outcome(job_id, report, output_dir, names), f"job {job_id}",
                                    patience))
        except telemetry.Fenced:  # recovered elsewhere while this worker was stalled before its start
            fenced = True
        except UNREACHABLE as e:  # away for longer than db_outage_s: the job is not failed, but left to recovery
            if not is_unreachable(e):
                raise
            log.exception("job %s: the database stayed unreachable; the job is left to recovery", job_id)
            abandoned = True
        except Exception as e:  # a bug of ours: the job still ends, with what happened
            log.exception("job %s: the worker failed", job_id)
            outcome = lifecycle.Outcome(JobStatus.FAILED, "internal_error",
                                        f"the worker failed: {type(e).__name__}: {e}")
        if abandoned:  # its leases and its end are recovery's, once the database is back
            return "abandoned"
        retrying(lambda: self._release(job_id, attempt), f"job {job_id}: releasing its GPUs", patience)
        if fenced:
            log.warning("job %s: attempt %d was recovered elsewhere meanwhile; it was stopped", job_id, attempt)
            return "fenced"
        outcome.error_message = public_text(outcome.error_message)
        if outcome.status is JobStatus.SUCCEEDED:  # the final model as the last checkpoint, the metrics CSV
            try:
                outcome.result_files = retrying(lambda: self._publish(job_id), f"job {job_id}: results", patience)
            except Exception as e:  # the job still ends: its model is there, only the extras are missing
                log.exception("job %s: its results could not be published", job_id)
                with self.db.session() as session:
                    events.add_event(session, job_id, f"the metrics file and the final checkpoint could not be "
                                                      f"recorded ({type(e).__name__}); the model is kept", "warning")
        ended, waiting = retrying(lambda: self._finish(job_id, outcome, attempt), f"job {job_id}: its end", patience)
        for _ in range(min(waiting, len(devices) if devices is not None else 1)):
            self._send(job_id, countdown=None, poll=False)  # what the freed GPUs can start, now
        if ended is JobStatus.QUEUED:  # preempted: queued again, it keeps a message that polls for it
            self._send(job_id, countdown=self.settings.requeue_delay_s, poll=True)
            log.info("job %s: preempted, queued again", job_id)
            return "preempted"
        log.info("job %s: attempt %d ended %s", job_id, attempt, outcome.status.value)
        return outcome.status.value

    def _requeue_lost_node(self, job_id: str, attempt: int, why: str, freed: int) -> str:
        """A node of the job's placement was lost and this node's ranks were stopped: the job is recovered
        like one whose worker was lost (``jobs.recovery.requeue_after_node_loss``); its GPUs are free."""
        from jobs.recovery import requeue_after_node_loss

        def requeue() -> str | None:
            with self.db.session() as session:
                return requeue_after_node_loss(session, self.settings, job_id, attempt, why)

        status = retrying(requeue, f"job {job_id}: back to the queue", self.settings.db_outage_s)
        if status == JobStatus.QUEUED.value:  # it keeps a message that polls for it
            self._send(job_id, countdown=self.settings.requeue_delay_s, poll=True)
        for _ in range(freed):
            self._send(job_id, countdown=None, poll=False)  # what the freed GPUs can start, now
        log.warning("job %s: %s; the job is %s", job_id, why, status or "no longer this attempt's")
        return "requeued" if status == JobStatus.QUEUED.value else (status or "fenced")

    def _release(self, job_id: str, attempt: int, node: str | None = None) -> None:
        with self.db.session() as session:
            leases.release(session, job_id, attempt, node)

    def _rendezvous(self, job_id: str, attempt: int, config_path: Path,
                    where: list[tuple[str, int]]) -> dict[str, Any]:
        """This node launches a job spread over ``where``: a free port for the rendezvous, written on the
        job with the run's config for the joining nodes; the ``Nodes`` of this node (rank 0)."""
        with socket.socket() as probe:  # the port the launcher's store listens on; free now
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        nodes = {"count": len(where), "rank": 0, "per_node": where[0][1], "master_addr": self.settings.node_address,
                 "master_port": port, "rendezvous_timeout_s": self.settings.rendezvous_timeout_s,
                 "run_id": f"{job_id}-{attempt}"}
        with self.db.session() as session:
            placement.mark_ready(session, job_id, attempt, nodes["master_addr"], port, nodes["rendezvous_timeout_s"],
                                 json.loads(config_path.read_text()))
        return nodes

    # ------------------------------------------------------------------------------------------ join
    def join(self, join: placement.Join) -> str:
        """Run this node's part of a job spread over several nodes that another node launches
        (``jobs.placement``): take the join, wait for the launcher's rendezvous, start this node's ranks
        and follow them to their end; a failure is reported on the job for the launcher to end it. This
        node's leases are released at the end. Returns how it ended: "joined", "failed", "ended" (the job
        ended or was stopped meanwhile) or "taken" (another process of this node joined)."""
        node, settings = self.settings.worker_name, self.settings
        job_id, attempt, rank = join.job_id, join.attempt, join.node_rank
        with self.db.session() as session:
            if not placement.claim_join(session, join, node, f"{node}:{os.getpid()}"):
                return "taken"
        log.info("job %s: node rank %d of attempt %d joins", job_id, rank, attempt)
        try:
            deadline = time.monotonic() + settings.rendezvous_timeout_s
            while True:
                with self.db.session() as session:
                    try:
                        ready = placement.rendezvous(session, job_id, attempt)
                    except LookupError:
                        return "ended"
                    devices = placement.leased_here(session, job_id, attempt, node)
                if ready:
                    break
                if time.monotonic() > deadline:
                    self._node_failed(join, "rendezvous_failed", f"its launcher did not start within "
                                                                 f"{settings.rendezvous_timeout_s} s")
                    return "failed"
                time.sleep(min(settings.flush_interval_s, 1.0))
            output_dir = Path(ready["config"]["output_dir"])
            output_dir.mkdir(parents=True, exist_ok=True)
            config_path = output_dir / f"job-config-node-{rank}.json"
            config_path.write_text(json.dumps(ready["config"], indent=2))
            nodes = {"count": len(ready["nodes"]), "rank": rank, "per_node": ready["per_node"],
                     "master_addr": ready["master_addr"], "master_port": ready["master_port"],
                     "rendezvous_timeout_s": ready["rendezvous_timeout_s"], "run_id": f"{job_id}-{attempt}"}
            report = self.supervise(job_id, config_path, output_dir, devices if settings.gpu_memory_gib else None,
                                    attempt, nodes=nodes)
            final = report.final or {}
            if report.fenced or report.cancel_requested:
                return "ended"
            if report.returncode == 0 and final.get("kind") in ("joined", "paused"):
                return "joined"
            code, message = ((final.get("code", "training_failed"), public_text(final.get("message", "")))
                             if final.get("kind") == "error" else
                             _died(report.returncode, output_dir / f"train-node-{rank}.log"))
            self._node_failed(join, code, public_text(message) or code)
            return "failed"
        finally:
            retrying(lambda: self._release(job_id, attempt, node), f"job {job_id}: releasing this node's part",
                     settings.db_outage_s)

    def _node_failed(self, join: placement.Join, code: str, message: str) -> None:
        log.error("job %s: node rank %d failed (%s): %s", join.job_id, join.node_rank, code, message)
        with self.db.session() as session:
            placement.report_failure(session, join.job_id, join.attempt, self.settings.worker_name, join.node_rank,
                                     code, message)

    def _publish(self, job_id: str) -> list[str]:
        with self.db.session() as session:
            return telemetry.publish_results(session, self.settings, job_id)

    def _finish(self, job_id: str, outcome: lifecycle.Outcome, attempt: int) -> tuple[JobStatus | None, int]:
        """End the job; (the status it is left in, how many jobs are queued)."""
        with self.db.session() as session:
            ended = lifecycle.finish_job(session, job_id, outcome, attempt)
            return ended, len(lifecycle.queued_job_ids(session))

    def _queued(self, job_id: str) -> bool:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            return job is not None and job.status == JobStatus.QUEUED.value

    def _send(self, job_id: str, countdown: float | None, poll: bool) -> None:
        from jobs.queue import enqueue

        try:
            enqueue(self.settings, job_id, countdown=countdown, poll=poll)
        except Exception as e:  # the jobs are queued in the database: a starting worker re-sends them
            log.warning("could not send a wake-up: %s", e)

    # ------------------------------------------------------------------------------------------ prepare
    def _prepare(self, job_id: str,
                 attempt: int | None = None) -> lifecycle.Outcome | tuple[Path, Path, dict[str, str]]:
        """Resolve the model and files on this node and write the run's config; or the reason it can't."""
        settings = self.settings
        with self.db.session() as session:
            job = session.get(Job, job_id)
            try:
                model = catalog.resolve_reference(session, settings, job.owner_id, job.model)
            except catalog.UnusableModel as e:
                return lifecycle.Outcome(JobStatus.FAILED, "model_not_found", str(e), "model")
            if model is None:
                return lifecycle.Outcome(
                    JobStatus.FAILED, "model_not_found",
                    f"model {job.model!r} is not a registered model on {settings.worker_name} (no folder with a "
                    "config.json by that name: gone, or not readable by this worker) nor a fine-tuned model of the "
                    "job's owner", "model")
            paths: dict[str, Path | None] = {}
            names: dict[str, str] = {}
            for param, file_id in (("training_file", job.training_file_id),
                                   ("validation_file", job.validation_file_id)):
                if file_id is None:
                    paths[param] = None
                    continue
                row = session.get(File, file_id)
                path = files.file_path(settings, row)
                if row.deleted_at is not None or not path.is_file():
                    return lifecycle.Outcome(JobStatus.FAILED, "file_not_found",
                                           f"file {file_id} is gone from the service's storage", param)
                paths[param], names[str(path)] = path, file_id
            values = admission.train_config_values(settings, job_id, model, job.method, job.hyperparameters,
                                                 paths["training_file"], paths["validation_file"], gpus=job.gpus)
        output_dir = Path(values["output_dir"])
        output_dir.mkdir(parents=True, exist_ok=True)
        resume = _latest_complete_checkpoint(output_dir)
        if resume is not None:  # an earlier attempt of this job saved one: continue from it, bit for bit
            values["resume_from"] = resume
            step = int(resume.name[5:])
            with self.db.session() as session:
                if attempt is not None:  # (raises Fenced when the job is another attempt's by now)
                    telemetry.record_progress(session, job_id, [], attempt=attempt)
                # what the lost attempt did up to its checkpoint but had not reported yet is in its own log
                telemetry.backfill(session, job_id, step, str(resume), _logged_records(output_dir, step))
                events.add_event(session, job_id, f"resuming from the checkpoint at step {step}")
        evals = []
        with self.db.session() as session:
            for spec in session.get(Job, job_id).evals or []:
                resolved = dict(spec)
                for name in ("file", "fewshot_file"):
                    if spec.get(name):
                        row = session.get(File, spec[name])
                        path = files.file_path(settings, row)
                        if row.deleted_at is not None or not path.is_file():
                            return lifecycle.Outcome(JobStatus.FAILED, "file_not_found",
                                                   f"file {spec[name]} is gone from the service's storage", "evals")
                        resolved[name], names[str(path)] = str(path), spec[name]
                evals.append(resolved)
        (output_dir / "evals.json").write_text(json.dumps(evals, indent=2))
        config_path = output_dir / "job-config.json"
        config_path.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
                                          indent=2))
        return config_path, output_dir, names

    # ------------------------------------------------------------------------------------------ supervise
    def supervise(self, job_id: str, config_path: Path, output_dir: Path,
                  devices: list[int] | None = None, attempt: int | None = None,
                  nodes: dict[str, Any] | None = None) -> ChildReport:
        """Start the child, turn its lines into rows every ``flush_interval_s``, stop it when cancelled.
        With ``devices``, the child sees only those GPUs (``CUDA_VISIBLE_DEVICES``). With ``attempt``,
        every write checks that the job is still running in that attempt; when it is not (the job was
        recovered by another worker), the child is killed and nothing more is written.

        With ``nodes`` (``lomo_core.zero3.launch.Nodes``' fields), the child runs this node's part of a job
        spread over several nodes (``jobs.placement``). As its launcher (rank 0) it is stopped when another
        node fails or is lost (``ChildReport.node_failure``). As a joining node it writes no records and no
        heartbeat (the launcher's are the job's), only looks whether the job still runs in ``attempt``, and
        logs to ``train-node-R.log``.

        The child dies with this process: it is given this process's pid and asks for a SIGTERM when its
        parent dies, however it dies (``worker.runner``); it then kills its whole process group (its ranks
        too), since nothing is left to watch it. It is fenced on disk too: the job's folder names the
        attempt that owns it (``.attempt``), and a child that finds another attempt named there (its job
        was recovered elsewhere while this worker was frozen or cut off) kills its process group within
        half a second, long before the new attempt's training process has loaded its model."""
        settings = self.settings
        joining = nodes is not None and nodes["rank"] > 0
        fence = []
        if attempt is not None:
            # Still this attempt's (a worker that stalled past the heartbeat timeout before this point finds
            # the job recovered elsewhere: it starts nothing), and the job's folder names the attempt that
            # owns it, never an older one: an older training process still alive stops.
            with self.db.session() as session:
                try:
                    if joining:
                        telemetry.still_running(session, job_id, attempt)
                    else:
                        telemetry.record_progress(session, job_id, [], attempt=attempt)
                    if _folder_attempt(output_dir) > attempt:
                        raise telemetry.Fenced(job_id)
                except telemetry.Fenced:
                    return ChildReport(returncode=0, final=None, cancel_requested=False, killed=False, fenced=True)
                (output_dir / ATTEMPT_FILE).write_text(str(attempt))
            fence = ["--attempt", str(attempt)]
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "LOMO_JOB_ID": job_id}  # the training process's log lines name their job
        if devices is not None:
            # lease indices are nvidia-smi's, which number GPUs in PCI bus order; CUDA must read them alike
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            env["CUDA_VISIBLE_DEVICES"] = devices_mod.visible_ids(devices)
        if nodes is not None:
            fence += ["--nodes", json.dumps(nodes)]
        log_name = f"train-node-{nodes['rank']}.log" if joining else LOG_FILE
        with (output_dir / log_name).open("ab") as log_file:
            child = subprocess.Popen(
                [*self.command, str(config_path), "--fd", str(write_fd), "--parent", str(os.getpid()), *fence],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: a kill reaches anything it started
            )
        os.close(write_fd)
        report = ChildReport(returncode=0, final=None, cancel_requested=False, killed=False)
        pending: list[tuple[str, int, dict[str, Any]]] = []
        partial = b""
        eof = False
        last_flush = 0.0
        term_sent_at: float | None = None
        outage: list[float] = []  # while the database cannot be reached: since when, when to try again
        try:
            while not eof:
                ready, _, _ = select.select([read_fd], [], [], settings.flush_interval_s)
                if ready:
                    chunk = os.read(read_fd, 1 << 16)
                    eof = not chunk
                    partial += chunk
                    *lines, partial = partial.split(b"\n")
                    for line in lines:
                        self._take(line, pending, report)
                now = time.monotonic()
                due = now >= outage[1] if outage else now - last_flush >= settings.flush_interval_s
                if eof or due:
                    try:
                        if joining:
                            cancel, pause, trouble = self._still_running(job_id, attempt), False, None
                            pending = []  # the launcher's records are the job's
                        else:
                            cancel, pause, trouble = self._write(job_id, pending, attempt, outage,
                                                                 not report.pause_sent, nodes is not None)
                    except telemetry.Fenced:
                        report.fenced = True
                        _signal_group(child, signal.SIGKILL)
                        break
                    except UNREACHABLE as error:  # keep the records; the training goes on meanwhile
                        if not is_unreachable(error):
                            raise
                        if not outage:
                            log.warning("job %s: the database cannot be reached (%s); the records are kept and "
                                        "written when it is back (for up to %.0f s)", job_id, type(error).__name__,
                                        settings.db_outage_s)
                            outage[:] = [now, now]
                        outage[1] = now + min(max(outage[1] - outage[0], settings.flush_interval_s) * 2, 5.0)
                        if now - outage[0] > settings.db_outage_s:
                            self._abandon(job_id, child, report, now - outage[0])
                            break
                        if eof:  # the run ended meanwhile: what is left is written once the database is back
                            self._write_when_back(job_id, pending, attempt, outage, report, child)
                            break
                        cancel = pause = False
                        trouble = None
                    else:
                        pending, last_flush, outage = [], now, []
                    if trouble is not None and report.node_failure is None and term_sent_at is None:
                        report.node_failure, report.stopped_for_node, term_sent_at = trouble, True, now
                        log.error("job %s: %s; stopping this node's ranks", job_id, trouble["message"])
                        _signal_group(child, signal.SIGTERM)
                    if pause and not cancel and not report.cancel_requested:
                        report.pause_sent = True
                        log.info("job %s: pause requested, the training process checkpoints and stops", job_id)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child.pid, signal.SIGUSR1)  # the runner alone: it has the handler
                    if cancel and not report.cancel_requested:
                        report.cancel_requested, term_sent_at = True, now
                        log.info("job %s: cancellation requested, stopping the training process", job_id)
                        _signal_group(child, signal.SIGTERM)
                if term_sent_at is not None and not report.killed and now - term_sent_at > settings.cancel_grace_s:
                    log.warning("job %s: the training process did not stop in %.0fs, killing it", job_id,
                                settings.cancel_grace_s)
                    _signal_group(child, signal.SIGKILL)
                    report.killed = True
            report.returncode = child.wait()
        finally:
            os.close(read_fd)
            if child.poll() is None:  # the worker itself is being stopped
                _signal_group(child, signal.SIGKILL)
                child.wait()
        return report

    def _write(self, job_id: str, pending: list[tuple[str, int, dict[str, Any]]], attempt: int | None,
               outage: list[float], check_pause: bool,
               spread: bool = False) -> tuple[bool, bool, dict[str, Any] | None]:
        """Write the records (one transaction, with the heartbeat); (cancel asked, pause asked, and for a job
        ``spread`` over nodes that this one launched, another node's failure or loss)."""
        if outage:  # the job's events say what happened while the database was away
            pending = [("event", 0, {"message": f"the database could not be reached for "
                                                f"{time.monotonic() - outage[0]:.0f} s; the {len(pending)} "
                                                "records of that time were kept by the worker and written when "
                                                "it came back", "level": "warning"}), *pending]
        with self.db.session() as session:
            cancel = telemetry.record_progress(session, job_id, pending, attempt=attempt)
            pause = check_pause and telemetry.pause_requested(session, job_id)
            trouble = placement.problem(session, job_id, self._live_after()) if spread else None
        return cancel, pause, trouble

    def _still_running(self, job_id: str, attempt: int | None) -> bool:
        with self.db.session() as session:
            return telemetry.still_running(session, job_id, attempt)

    def _live_after(self) -> datetime:
        return utcnow() - timedelta(seconds=self.settings.heartbeat_timeout_s)

    def _write_when_back(self, job_id: str, pending: list, attempt: int | None, outage: list[float],
                         report: ChildReport, child: subprocess.Popen) -> None:
        """The run's last records, once the database is back (within ``db_outage_s`` of the outage's start)."""
        left = self.settings.db_outage_s - (time.monotonic() - outage[0])
        try:
            retrying(lambda: self._write(job_id, pending, attempt, outage, False), f"job {job_id}", max(left, 0.0))
        except telemetry.Fenced:
            report.fenced = True
        except UNREACHABLE:
            self._abandon(job_id, child, report, time.monotonic() - outage[0])

    def _abandon(self, job_id: str, child: subprocess.Popen, report: ChildReport, silent_s: float) -> None:
        log.error("job %s: the database has been unreachable for %.0f s (LOMO_DB_OUTAGE_S); the training process "
                  "is stopped and the job is left to recovery, which resumes it from its latest checkpoint",
                  job_id, silent_s)
        report.abandoned = True
        _signal_group(child, signal.SIGKILL)

    @staticmethod
    def _take(line: bytes, pending: list, report: ChildReport) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
            kind, step, payload = record["kind"], int(record["step"]), record["payload"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable line from the training process: %r", line[:200])
            return
        if kind in ("done", "cancelled", "paused", "error", "joined"):
            report.final = {"kind": kind, **payload}
            return
        if kind == "val":
            report.val.append((step, float(payload["loss"])))
        if kind == "start":
            report.validation_rows = int(payload.get("validation_rows") or 0)
        pending.append((kind, step, payload))

    # ------------------------------------------------------------------------------------------ outcome
    def _outcome(self, job_id: str, report: ChildReport, output_dir: Path, names: dict[str, str]) -> lifecycle.Outcome:
        final = report.final or {}
        kind = final.get("kind")
        if kind == "done" and report.returncode == 0:
            self._record_validation(job_id, report)
            name = None
            if final.get("model_dir"):  # the child saved the model in output_dir/"model"; clients get its name
                with self.db.session() as session:
                    job = session.get(Job, job_id)
                    name = catalog.fine_tuned_name(job.model, job.suffix, job.id)
            return lifecycle.Outcome(JobStatus.SUCCEEDED, fine_tuned_model=name)
        if kind == "paused" and report.returncode == 0 and not report.cancel_requested:
            with self.db.session() as session:
                events.add_event(session, job_id, f"training process stopped after its checkpoint at step "
                                                  f"{final.get('step')}")
            return lifecycle.Outcome(JobStatus.PAUSED)
        if kind == "cancelled" or report.cancel_requested:
            how = "killed after the grace period" if report.killed else "stopped at a step boundary"
            with self.db.session() as session:
                events.add_event(session, job_id, f"training process {how}")
            return lifecycle.Outcome(JobStatus.CANCELLED)
        failure = report.node_failure
        if failure is not None and (report.stopped_for_node or kind != "error" or _unspecific(final)):
            # this node's ranks were stopped for it, or failed without saying why: that node's error. (When
            # they said why, that is the root cause: the launch reads the reports of every node's ranks.)
            return lifecycle.Outcome(JobStatus.FAILED, failure["code"], f"node {failure['node']} (node rank "
                                     f"{failure['node_rank']}) failed: {failure['message']}")
        if kind == "error":
            message = final.get("message", "")
            for path, file_id in names.items():  # name the uploaded file, not where the node keeps it
                message = message.replace(path, f"file {file_id}")
            field_name = final.get("field")
            code = final.get("code", "training_failed")
            if code == "out_of_memory":
                message += self._memory_figures(job_id)
            return lifecycle.Outcome(JobStatus.FAILED, code, message,
                                   admission.param_for_field(field_name) if field_name else None)
        code, message = _died(report.returncode, output_dir / LOG_FILE)
        if code == "process_killed" and report.returncode == -signal.SIGKILL:
            message += self._memory_figures(job_id)
        return lifecycle.Outcome(JobStatus.FAILED, code, message)

    def _after_spread_failure(self, job_id: str) -> dict[str, Any] | None:
        """This node's ranks of a job spread over nodes failed: what the other nodes say. A live node's
        worker is seen again within a quarter of ``heartbeat_timeout_s`` (its watch), and reports its own
        ranks' failure within seconds; a node not seen for ``heartbeat_timeout_s`` since is lost (its
        worker died with its ranks, and ours failed on the lost connection). None: every node is up and
        none reported a failure."""
        since = utcnow()
        deadline = time.monotonic() + self.settings.heartbeat_timeout_s + 1.0
        while True:
            with self.db.session() as session:
                failure = placement.problem(session, job_id, since)
            if failure is None or failure["code"] != "node_lost" or time.monotonic() > deadline:
                return failure  # reported, every node seen since (all is said), or one not seen for too long
            time.sleep(0.5)

    def _memory_figures(self, job_id: str) -> str:
        """What the memory model predicted and what the device has, for an out-of-memory failure."""
        with self.db.session() as session:
            predicted = session.get(Job, job_id).predicted_memory or {}
        if not predicted.get("available"):
            return ""
        return (f" (predicted peak {predicted['per_device_gib']} GiB per device on {predicted.get('gpus') or 1} "
                f"{predicted['device']} device(s) of {predicted['device_bytes'] / 1024**3:.2f} GiB each)")

    def _record_validation(self, job_id: str, report: ChildReport) -> None:
        """The validation loss before (step 0) and after training, stored as the job's first evaluation."""
        if not report.val:
            return
        with self.db.session() as session:
            points = [("base", report.val[0])] if report.val[0][0] == 0 else []
            points.append(("fine_tuned", report.val[-1]))
            for model_ref, (_step, loss) in points:
                for metric, value in (("loss", loss), ("perplexity", math.exp(min(loss, 50)))):
                    telemetry.record_eval(session, job_id, "validation_loss", "validation", metric, value,
                                        report.validation_rows, model_ref)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"|:,;()]+/)+([^\s'\"|:,;()]*)")


def public_text(text: str | None) -> str | None:
    """A message for clients: no path of the node's disk (an absolute path, of the data folder or of a
    traceback's source file, is cut to its last part)."""
    if not text:
        return text
    return _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}" if m.group(1) else "...", text)


def _logged_records(output_dir: Path, until: int) -> list[tuple[str, int, dict[str, Any]]]:
    """The train and val records of the job's own ``metrics.jsonl`` (every attempt appends to it) up to
    step ``until``, the last of each (kind, step)."""
    path = output_dir / "metrics.jsonl"
    found: dict[tuple[str, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                kind, step = record.pop("kind"), int(record.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short by the kill
            if kind in ("train", "val") and step <= until:
                found[(kind, step)] = record
    return [(kind, step, payload) for (kind, step), payload in sorted(found.items(), key=lambda kv: kv[0][1])]


def _latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint of a job's folder that was written to its end (``lomo_core.train`` writes a
    checkpoint under a temporary name and renames it when complete, so a half-written one never counts)."""
    root = output_dir / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def _folder_attempt(output_dir: Path) -> int:
    """The attempt a job's folder names as its owner (0: none yet)."""
    try:
        return int((output_dir / ATTEMPT_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _unspecific(final: dict[str, Any]) -> bool:
    """A failure of ranks that says nothing of its cause (no rank reported one, or they never met)."""
    return final.get("code") == "rendezvous_failed" or (
        final.get("code") == "internal_error" and str(final.get("message", "")).startswith("the ranks exited"))


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)


def _died(returncode: int, log_path: Path) -> tuple[str, str]:
    """Code and message for a training process that ended without saying why."""
    tail = ""
    if log_path.is_file():
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        tail = "; log: " + " | ".join(lines[-3:])[-600:] if lines else ""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = (" - usually the host ran out of memory and the kernel's OOM killer stopped it"
                if returncode == -signal.SIGKILL else "")
        return "process_killed", f"the training process was killed by {name}{hint}{tail}"
    return "internal_error", f"the training process exited with status {returncode}{tail}"
