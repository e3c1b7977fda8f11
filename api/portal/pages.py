"""The portal's pages: jobs (list, one job, compare), the cluster, files and models.

Pages are rendered here from the jobs layer, with the same scopes as the REST API (a user sees their own
objects, an admin everyone's). Their live parts are fragments that htmx fetches again every few seconds
while a job is active; the charts' scripts read the REST API itself (``/v1/...``) with the session's cookie.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from api.deps import DatabaseDep, SessionDep, SessionRoute, SettingsDep
from api.portal.auth import PageCaller
from api.portal.render import render, to_datetime
from api.routers.jobs import send_webhooks, wake
from api.views import checkpoint_object, eval_object, event_object, job_object
from jobs import catalog, cluster, errors, files, lifecycle, results, users
from jobs.models import Job, User
from jobs.states import JobStatus

router = APIRouter(route_class=SessionRoute, include_in_schema=False)

#: what to do about a failed job, by its error code (the message says what happened)
SUGGESTIONS = {
    "out_of_memory": "Lower batch_size or max_seq_len, turn on gradient_checkpointing or set loss_chunk_size, "
                     "or ask for more GPUs; the new-job form shows the prediction before you submit.",
    "process_killed": "If the host ran out of memory: lower batch_size or max_seq_len, or turn on "
                      "gradient_checkpointing, then submit it again.",
    "nan_loss": "Lower the learning rate (learning_rate_multiplier or lr), or set clip_grad_norm.",
    "invalid_training_file": "Fix the training file at the line named, upload it again and submit a new job.",
    "file_not_found": "A file of the job was deleted: upload it again and submit a new job.",
    "training_file_not_found": "The training file was deleted: upload it again and submit a new job.",
    "validation_file_not_found": "The validation file was deleted: upload it again and submit a new job.",
    "model_not_found": "The model is no longer registered or was deleted: choose another model.",
    "invalid_model": "The model folder cannot be trained: ask an admin to check its registration.",
    "invalid_hyperparameters": "Change the setting named in the message and submit the job again.",
    "device_unavailable": "The node lacks the devices the job asked for: ask for fewer GPUs, or ask an admin.",
    "worker_lost": "The job lost its worker more often than the service retries: ask an admin to check the "
                   "nodes, then submit it again (New job like this).",
    "internal_error": "This is a fault of the service: tell an admin, with the job id.",
}

JOB_LIST_LIMIT = 50


def _owner_names(session, owner_ids: list[str]) -> dict[str, str]:
    """The names of the users of ``owner_ids`` (lists show whose each row is): one query for just those
    users, as the jobs list polls every few seconds."""
    wanted = set(owner_ids)
    if not wanted:
        return {}
    names = dict(session.execute(select(User.id, User.name).where(User.id.in_(wanted))).all())
    return {i: names.get(i, i) for i in wanted}


def _metadata_filter(text: str | None) -> dict[str, str]:
    """``key=value`` pairs, separated by commas: ``case=demo, team=nlp``."""
    pairs = {}
    for part in (text or "").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def _job_rows(session, caller, status: str | None, user: str | None, meta: str | None, after: str | None):
    owner = caller.listing(session, user or None)
    rows, more = lifecycle.list_jobs(session, owner, after or None, JOB_LIST_LIMIT, status or None,
                                     _metadata_filter(meta))
    peaks = results.measured_peaks(session, [r.id for r in rows])
    names = _owner_names(session, [r.owner_id for r in rows])
    return [{"job": job_object(r), "owner": names[r.owner_id], "measured_peak": peaks.get(r.id),
             "predicted_peak": _predicted_peak(r)} for r in rows], more


def _predicted_peak(job: Job) -> int | None:
    predicted = job.predicted_memory or {}
    return (predicted.get("per_device") or {}).get("peak_bytes") if predicted.get("available") else None


@router.get("/")
def home(_caller: PageCaller):
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, caller: PageCaller, status: str | None = Query(None),
              user: str | None = Query(None, max_length=200), meta: str | None = Query(None, max_length=2000),
              after: str | None = Query(None, max_length=64), fragment: bool = False):
    problem, rows, more = None, [], False
    if status and status not in {s.value for s in JobStatus}:
        problem = f"status {status[:40]!r} is not one of: " + ", ".join(s.value for s in JobStatus)
    else:
        try:
            rows, more = _job_rows(session, caller, status, user, meta, after)
        except (errors.InvalidRequest, errors.Forbidden) as e:
            problem = str(e)
    context = {"rows": rows, "more": more, "problem": problem, "status": status or "", "user": user or "",
               "meta": meta or "", "after": after or "", "statuses": [s.value for s in JobStatus],
               # the admins' user filter is on the page, not in the rows that polls fetch
               "user_names": [u.name for u, _ in users.list_users(session)] if caller.is_admin and not fragment
               else []}
    return render(request, "_job_rows.html" if fragment else "jobs.html", caller, nav="jobs", **context)


def _act(session, db, settings, caller, job_id: str, action: str, background: BackgroundTasks) -> None:
    if action == "cancel":
        job = lifecycle.cancel_job(session, caller.scope, job_id)
        if job.status == JobStatus.CANCELLED.value:
            background.add_task(send_webhooks, db, settings)
    elif action == "pause":
        lifecycle.pause_job(session, caller.scope, job_id)
    else:
        lifecycle.resume_job(session, caller.scope, job_id)
        session.commit()  # queued before the wake-up is sent
        wake(db, settings, job_id)


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, job_id: str, action: str, session: SessionDep, db: DatabaseDep,
               settings: SettingsDep, caller: PageCaller, background: BackgroundTasks):
    """Cancel, pause or resume from a page; then to the job's page, which shows what happened."""
    if action not in ("cancel", "pause", "resume"):
        return render(request, "error.html", caller, status_code=404, message=f"no action {action[:40]!r}")
    back = f"/jobs/{job_id}"
    try:
        _act(session, db, settings, caller, job_id, action, background)
    except errors.NotFound:
        return render(request, "error.html", caller, status_code=404, message=f"no job {job_id[:64]!r}")
    except errors.Conflict as e:
        return render(request, "error.html", caller, status_code=409, message=str(e), back=back)
    return RedirectResponse(back, status_code=303)


def _job_context(session, settings, caller, job_id: str) -> dict[str, Any]:
    row = lifecycle.get_job(session, caller.scope, job_id)
    job = job_object(row)
    evals, _ = results.list_evals(session, caller.scope, job_id, limit=1000)
    checkpoints, _ = results.list_checkpoints(session, caller.scope, job_id, limit=100)
    memory = results.memory_summary(session, caller.scope, job_id)
    by_score: dict[tuple[str, str, str], dict[str, Any]] = {}
    for score in (eval_object(e) for e in evals):
        entry = by_score.setdefault((score.task, score.split, score.metric),
                                    {"task": score.task, "split": score.split, "metric": score.metric,
                                     "examples": score.examples, "checkpoints": []})
        if score.model in ("base", "fine_tuned"):
            entry[score.model] = score.value
        else:
            entry["checkpoints"].append((score.model, score.value))
    for entry in by_score.values():
        if "base" in entry and "fine_tuned" in entry:
            entry["delta"] = entry["fine_tuned"] - entry["base"]
    owner = _owner_names(session, [row.owner_id])[row.owner_id]
    return {"job": job, "owner": owner, "scores": list(by_score.values()),
            "checkpoints": [checkpoint_object(c, row) for c in checkpoints], "memory": memory,
            "predicted_peak": _predicted_peak(row),
            "measured_peak": max((m["peak_bytes"] for m in memory["measured"]), default=None),
            "suggestion": SUGGESTIONS.get(job.error.code) if job.error else None,
            "downloadable": bool(job.fine_tuned_model) and row.model_deleted_at is None}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, session: SessionDep, settings: SettingsDep, caller: PageCaller,
             fragment: str | None = Query(None, pattern="^(live|events)$")):
    try:
        context = _job_context(session, settings, caller, job_id)
    except errors.NotFound:
        return render(request, "error.html", caller, status_code=404,
                      message=f"There is no job {job_id[:64]!r} of yours.")
    if fragment == "events" or fragment is None:
        rows, more = results.list_events(session, caller.scope, job_id, limit=200)
        context["events"], context["more_events"] = [event_object(e) for e in rows], more
    name = {"live": "_job_live.html", "events": "_job_events.html"}.get(fragment or "", "job.html")
    return render(request, name, caller, nav="jobs", **context)


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, caller: PageCaller,
                 ids: list[str] = Query(default_factory=list, max_length=12)):
    chosen, missing = [], []
    for job_id in dict.fromkeys(i.strip() for i in ids if i.strip()):
        try:
            chosen.append(lifecycle.get_job(session, caller.scope, job_id[:64]))
        except errors.NotFound:
            missing.append(job_id[:64])
    jobs = [job_object(j) for j in chosen]
    settings_rows = _differences(jobs)
    scores: dict[tuple[str, str, str], dict[str, Any]] = {}
    for job in chosen:
        evals, _ = results.list_evals(session, caller.scope, job.id, limit=1000)
        for e in evals:
            entry = scores.setdefault((e.task, e.split, e.metric), {"task": e.task, "metric": e.metric, "jobs": {}})
            if e.model_ref in ("base", "fine_tuned"):
                entry["jobs"].setdefault(job.id, {})[e.model_ref] = e.value
    recent, _more = lifecycle.list_jobs(session, caller.scope, limit=30)
    return render(request, "compare.html", caller, nav="compare", jobs=jobs, rows=settings_rows, missing=missing,
                  scores=list(scores.values()), recent=[job_object(r) for r in recent],
                  chosen_ids=[j.id for j in jobs])


def _differences(jobs) -> list[dict[str, Any]]:
    """The settings of the jobs side by side, each row marked when they differ."""
    if not jobs:
        return []
    flat = []
    for job in jobs:
        values = {"model": job.model, "optimizer": job.optimizer, "training_file": job.training_file,
                  "validation_file": job.validation_file, "seed": job.seed, "gpus": job.gpus,
                  "priority": job.priority, "suffix": job.suffix, "status": job.status}
        values.update({k: v for k, v in job.hyperparameters.model_dump().items() if k != "optimizer"})
        flat.append(values)
    names = list(dict.fromkeys(name for values in flat for name in values))
    rows = []
    for name in names:
        cells = [values.get(name) for values in flat]
        rows.append({"name": name, "cells": cells, "differs": len({repr(c) for c in cells}) > 1})
    return rows


@router.get("/cluster")
def cluster_page(request: Request, session: SessionDep, settings: SettingsDep, caller: PageCaller,
                 hours: float = Query(24.0, gt=0, le=24 * 31)):
    view = cluster.cluster_view(session, settings, caller.scope, hours, me=caller.user_id)
    now = datetime.now(timezone.utc)
    timeline = [{"lane": f"{lease['node']} · GPU {lease['device_index']}", "user": lease["user"], "job": lease["job"],
                 "start": to_datetime(lease["started_at"]).timestamp() * 1000,
                 "end": to_datetime(lease["released_at"] or now).timestamp() * 1000} for lease in view["leases"]]
    window = {"from": (now - timedelta(hours=hours)).timestamp() * 1000, "to": now.timestamp() * 1000,
              "leases": timeline}
    return render(request, "cluster.html", caller, nav="cluster", view=view, hours=hours, timeline=window)


@router.get("/files")
def files_page(request: Request, session: SessionDep, caller: PageCaller):
    rows, more = files.list_files(session, caller.scope, limit=500)
    return render(request, "files.html", caller, nav="files", files=rows, more=more,
                  names=_owner_names(session, [r.owner_id for r in rows]))


def _removed(request: Request, caller, remove, what: str, name: str, back: str):
    """Run ``remove`` (a delete of the jobs layer); back to the list, or a page that says why not."""
    try:
        remove()
    except errors.NotFound:
        return render(request, "error.html", caller, status_code=404, message=f"no {what} {name[:300]!r}")
    except (catalog.ModelNotDeletable, errors.Conflict) as e:
        return render(request, "error.html", caller, status_code=409, message=str(e), back=back)
    return RedirectResponse(back, status_code=303)


@router.post("/files/{file_id}/delete")
def delete_file(request: Request, file_id: str, session: SessionDep, settings: SettingsDep, caller: PageCaller):
    return _removed(request, caller, lambda: files.delete_file(session, settings, caller.scope, file_id), "file",
                    file_id, "/files")


@router.get("/models")
def models_page(request: Request, session: SessionDep, settings: SettingsDep, caller: PageCaller):
    entries = catalog.list_models(session, settings, caller.scope)
    return render(request, "models.html", caller, nav="models",
                  models=[catalog.describe_model(session, settings, caller.scope, e) for e in entries])


@router.post("/models/{model_id:path}/delete")
def delete_model(request: Request, model_id: str, session: SessionDep, settings: SettingsDep, caller: PageCaller):
    return _removed(request, caller, lambda: catalog.delete_model(session, settings, caller.scope, model_id),
                    "model", model_id, "/models")
