"""The new-job form: its fields (with defaults and help), the memory prediction as the form changes, and
the submission. The form becomes the REST API's own request body (``jobs.schemas.JobCreate``) and goes
through the same checks (``jobs.lifecycle.create_job``, ``jobs.admission.estimate_job``); each problem is
shown beside the field it names. Files are uploaded by the page's script through ``POST /v1/files``
itself, so an upload is checked exactly as the API checks it."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api.deps import DatabaseDep, SessionDep, SessionRoute, SettingsDep
from api.portal.auth import PageCaller
from api.portal.render import render
from api.routers.jobs import wake
from jobs import admission, catalog, errors, files, idempotency, lifecycle
from jobs.schemas import AUTO_EPOCHS, BASE_LEARNING_RATE, JobCreate
from lomo_core.config import TrainConfig

router = APIRouter(route_class=SessionRoute, include_in_schema=False)


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    help: str
    kind: str = "int"  # int | float | count_or_auto | number_or_auto | choice | flag | text
    choices: tuple[str, ...] = ()
    advanced: bool = False

    @property
    def default(self) -> Any:
        field = TrainConfig.model_fields.get(self.name)
        return field.default if field is not None else None

    @property
    def placeholder(self) -> str:
        """What an empty field means (the job's setting when it is left out)."""
        if self.name in EMPTY_MEANS:
            return EMPTY_MEANS[self.name]
        return "unset" if self.default is None else str(self.default)


#: what an empty field means where it is not TrainConfig's default (``jobs.schemas.JobCreate.train_values``)
EMPTY_MEANS = {"n_epochs": f"{AUTO_EPOCHS} (auto)", "batch_size": str(TrainConfig.model_fields["batch_size"].default),
               "learning_rate_multiplier": "1", "lr": "base rate × multiplier"}
_LR = ", ".join(f"{k} {v:g}" for k, v in BASE_LEARNING_RATE.items())
#: the hyperparameters the form asks for, in order (the rest of the API's take their defaults)
HYPERPARAMETERS = (
    Field("optimizer", "Optimizer", "LOMO fuses the update into the backward pass: no gradients or optimizer "
          "state are kept. AdaLomo adds an adaptive step (factored second moments). sgd and adamw are "
          "baselines that hold gradients (and adamw its state).", "choice", ("lomo", "adalomo", "sgd", "adamw")),
    Field("n_epochs", "Epochs", "Passes over the training file; auto is 1.", "count_or_auto"),
    Field("batch_size", "Batch size", "Examples per step (over all GPUs); auto picks the largest of 1, 2, 4 … 64 "
          "that the memory model says fits.", "count_or_auto"),
    Field("learning_rate_multiplier", "Learning-rate multiplier", f"A multiple of the optimizer's base rate ({_LR}).",
          "number_or_auto"),
    Field("max_steps", "Max steps", "Stop after this many steps (overrides epochs)."),
    Field("max_seq_len", "Max sequence length", "Tokens per example; longer ones are cut. Memory grows with it."),
    Field("dtype", "Precision", "fp32, or bf16 / fp16 parameters (half the memory; fp16 uses loss scaling).",
          "choice", ("fp32", "bf16", "fp16")),
    Field("gradient_checkpointing", "Gradient checkpointing", "Recompute activations in the backward pass: "
          "less memory, about a third more time.", "flag"),
    Field("lr_schedule", "Schedule", "How the learning rate changes over the run.", "choice",
          ("constant", "linear", "cosine"), advanced=True),
    Field("warmup_steps", "Warm-up steps", "Steps of linear warm-up from 0.", advanced=True),
    Field("lr", "Learning rate (absolute)", "Instead of the multiplier: the learning rate itself.", "float",
          advanced=True),
    Field("min_lr_ratio", "Final lr ratio", "Final lr / lr, for the linear and cosine schedules.", "float",
          advanced=True),
    Field("clip_grad_norm", "Clip gradient norm", "Clip the global gradient norm to this (LOMO then makes two "
          "backward passes).", "float", advanced=True),
    Field("clip_grad_value", "Clip gradient value", "Clip each gradient element to ± this.", "float", advanced=True),
    Field("weight_decay", "Weight decay", "Decoupled weight decay.", "float", advanced=True),
    Field("loss_chunk_size", "Loss chunk size", "Compute the loss this many tokens at a time, never holding all "
          "the logits (the peak of a large vocabulary).", advanced=True),
    Field("packing", "Packing", "Pack several short examples into each sequence.", "flag", advanced=True),
    Field("shuffle", "Shuffle", "Shuffle the examples each epoch.", "flag", advanced=True),
    Field("data_format", "Data format", "auto tells chat / instruction / text files apart.", "choice",
          ("auto", "instruct", "text"), advanced=True),
    Field("validation_split", "Validation split", "Hold out this fraction of the training file (when there is "
          "no validation file).", "float", advanced=True),
    Field("eval_every", "Validate every", "Validation loss every N steps (and at the end).", advanced=True),
    Field("save_every", "Checkpoint every", "A checkpoint every N steps.", advanced=True),
    Field("keep_checkpoints", "Keep checkpoints", "How many recent checkpoints are kept.", advanced=True),
)
FIELDS = {f.name: f for f in HYPERPARAMETERS}
#: the job's own fields (not hyperparameters) the form has
JOB_FIELDS = ("model", "training_file", "validation_file", "suffix", "seed", "priority", "gpus", "metadata")
EVAL_ROWS = 3
ROW = "_row"  # the form row an evaluation came from, kept with it until the body is sent
EVAL_TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc", "multirc", "perplexity", "lambada")
_INT = re.compile(r"^[+-]?\d+$")


def _number(text: str, kind: str) -> Any:
    """A form's text as the API's JSON would carry it: numbers as numbers, "auto" as is; anything else stays
    text, for the API's validation to name."""
    if kind in ("count_or_auto", "number_or_auto") and text.lower() == "auto":
        return "auto"
    if _INT.match(text):
        return int(text)
    if kind in ("float", "number_or_auto"):
        try:
            return float(text)
        except ValueError:
            return text
    return text


def request_body(form: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The REST body of a filled-in form, and the problems the form itself finds (a metadata line without
    '='), by field."""
    problems: dict[str, str] = {}
    hyper: dict[str, Any] = {}
    for field in HYPERPARAMETERS:
        text = (form.get(field.name) or "").strip()
        if not text:
            continue
        if field.kind == "flag":
            hyper[field.name] = text == "on"
        elif field.kind in ("choice", "text"):
            hyper[field.name] = text
        else:
            hyper[field.name] = _number(text, field.kind)
    body: dict[str, Any] = {"model": (form.get("model") or "").strip(),
                            "training_file": (form.get("training_file") or "").strip(),
                            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}
    for name in ("validation_file", "suffix"):
        if (form.get(name) or "").strip():
            body[name] = form[name].strip()
    for name in ("seed", "priority", "gpus"):
        text = (form.get(name) or "").strip()
        if text:
            body[name] = _number(text, "int")
    metadata = {}
    for number, line in enumerate((form.get("metadata") or "").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            problems["metadata"] = f"line {number}: write key=value, one pair a line"
            break
        metadata[key.strip()] = value.strip()
    if metadata:
        body["metadata"] = metadata
    evals = []
    for row in range(EVAL_ROWS):
        task = (form.get(f"eval_{row}_task") or "").strip()
        if not task:
            if (form.get(f"eval_{row}_file") or "").strip():
                problems[f"eval_{row}_task"] = "choose the task this file is scored on"
            continue
        spec: dict[str, Any] = {"task": task, "file": (form.get(f"eval_{row}_file") or "").strip(),
                                ROW: row}
        limit = (form.get(f"eval_{row}_limit") or "").strip()
        if limit:
            spec["limit"] = _number(limit, "int")
        evals.append(spec)
    if evals:
        body["evals"] = evals
    return body, problems


def rows_of(body: dict[str, Any]) -> list[int]:
    """The form row of each of ``body``'s evaluations (rows left empty are not sent), taken out of the
    body: ``evals[i]`` of a problem is form row ``rows_of(body)[i]``."""
    return [spec.pop(ROW) for spec in body.get("evals", [])]


def form_of_job(job) -> dict[str, str]:
    """The form filled in from a job (``new job like this``): its model, files, the settings it ran with that
    the form has (each hyperparameter, priority, seed, suffix, metadata, the first evaluations) and its
    learning rate as a multiplier; the GPU count is left to the memory model again."""
    values = {"model": job.model, "training_file": job.training_file_id,
              "validation_file": job.validation_file_id or "", "suffix": job.suffix or "",
              "seed": str(job.hyperparameters.get("seed", "")), "priority": str(job.priority or 0), "gpus": "",
              "metadata": "\n".join(f"{k}={v}" for k, v in (job.metadata_ or {}).items()),
              "optimizer": job.method}
    resolved = dict(job.hyperparameters)
    resolved["n_epochs"] = resolved.pop("epochs", "")
    base = BASE_LEARNING_RATE.get(job.method)
    for field in HYPERPARAMETERS:
        if field.name in ("optimizer", "learning_rate_multiplier", "lr"):
            continue
        value = resolved.get(field.name)
        if value is None:
            continue
        values[field.name] = ("on" if value else "off") if field.kind == "flag" else str(value)
    if base and resolved.get("lr") is not None:
        values["learning_rate_multiplier"] = f"{resolved['lr'] / base:.6g}"
    for row, spec in enumerate((job.evals or [])[:EVAL_ROWS]):
        values[f"eval_{row}_task"] = spec.get("task", "")
        values[f"eval_{row}_file"] = spec.get("file", "")
        values[f"eval_{row}_limit"] = str(spec.get("limit") or "")
    return values


def field_of(param: str | None, rows: list[int] | None = None) -> str | None:
    """The form field a problem's ``param`` names (``method.supervised.hyperparameters.lr`` -> ``lr``,
    ``evals[1].file`` -> ``eval_1_file``, or the field of the form row ``rows[1]`` that evaluation came
    from); None for a problem of the whole job."""
    if not param:
        return None
    tokens = [t for t in re.split(r"[.\[\]]", param) if t]
    if "evals" in tokens:
        at = tokens.index("evals")
        rest = tokens[at + 1:]
        if rest and rest[0].isdigit():
            index = int(rest[0])
            row = rows[index] if rows is not None and index < len(rows) else index
            name = rest[1] if len(rest) > 1 and rest[1] in ("task", "file", "limit") else "task"
            return f"eval_{row}_{name}"
        return "eval_0_task"
    for token in reversed(tokens):
        if token in FIELDS or token in JOB_FIELDS:
            return token
    return None


def problems_of(error: Exception, rows: list[int] | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """The problems of a refused request, by form field (``rows``: the form row of each evaluation); and
    those of no field."""
    by_field: dict[str, list[str]] = {}
    general: list[str] = []
    if isinstance(error, ValidationError):
        items = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in error.errors()]
    elif isinstance(error, errors.InvalidRequest):
        # a job too large for the deployment is a problem of the whole job, not of its model field
        whole = error.code == "insufficient_memory"
        items = [(None if whole else p.param, p.message) for p in error.problems]
    else:
        items = [(getattr(error, "quota", None), str(error))]
    for param, message in items:
        name = field_of(param, rows)
        (by_field.setdefault(name, []) if name else general).append(message)
    return by_field, general


def _choices(session, settings, caller) -> dict[str, Any]:
    models = catalog.list_models(session, settings, caller.user_id)
    mine, _ = files.list_files(session, caller.user_id, limit=500)
    return {"base_models": [m.id for m in models if m.is_base], "tuned_models": [m.id for m in models if not m.is_base],
            "training_files": [f for f in mine if f.purpose == "fine-tune"],
            "eval_files": [f for f in mine if f.purpose == "eval"]}


def _page(request, session, settings, caller, values, by_field=None, general=None, status_code=200):
    return render(request, "new_job.html", caller, status_code=status_code, nav="new", values=values,
                  idempotency_key=values.get("idempotency_key") or secrets.token_urlsafe(16),
                  fields=HYPERPARAMETERS, errors=by_field or {}, general=general or [], eval_rows=range(EVAL_ROWS),
                  eval_tasks=EVAL_TASKS, **_choices(session, settings, caller))


@router.get("/jobs/new")
def new_job_page(request: Request, session: SessionDep, settings: SettingsDep, caller: PageCaller,
                 like: str | None = Query(None, max_length=64), model: str | None = Query(None, max_length=300)):
    values: dict[str, str] = {"model": model} if model else {}
    general = []
    if like:
        try:
            values = form_of_job(lifecycle.get_job(session, caller.scope, like))
        except errors.NotFound:
            general.append(f"There is no job {like!r} of yours to start from.")
    return _page(request, session, settings, caller, values, general=general)


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


@router.post("/jobs/new")
async def submit_job(request: Request, db: DatabaseDep, settings: SettingsDep, caller: PageCaller):
    """Create the job of the form. The form carries an idempotency key of its own (made when it was shown),
    so a second click or a resent form gives the job the first one made, not a second job."""
    values = await _form(request)
    body, form_problems = request_body(values)
    rows = rows_of(body)
    key = (values.get("idempotency_key") or "")[:64] or None

    def create() -> Any:
        with db.session() as session:
            earlier = idempotency.recall(session, caller.user_id, lifecycle.CREATE_ROUTE, key)
            if earlier is not None:
                return earlier
            if form_problems:
                return _page(request, session, settings, caller, values, {k: [v] for k, v in form_problems.items()},
                             status_code=422)
            try:
                job = lifecycle.create_job(session, settings, caller.user_id, JobCreate.model_validate(body), key)
            except (ValidationError, errors.InvalidRequest, errors.QuotaExceeded) as e:
                session.rollback()
                by_field, general = problems_of(e, rows)
                return _page(request, session, settings, caller, values, by_field, general,
                             status_code=429 if isinstance(e, errors.QuotaExceeded) else 422)
            return job.id

    try:
        answer = await run_in_threadpool(create)
    except IntegrityError:  # the same form sent twice at once: the other request made the job
        with db.session() as session:
            answer = idempotency.recall(session, caller.user_id, lifecycle.CREATE_ROUTE, key)
        if answer is None:
            raise
    if not isinstance(answer, str):
        return answer
    wake(db, settings, answer)
    return RedirectResponse(f"/jobs/{answer}", status_code=303)


@router.post("/jobs/new/estimate")
async def estimate(request: Request, db: DatabaseDep, settings: SettingsDep, caller: PageCaller):
    """The memory prediction of the form as it is now, and its problems beside their fields (htmx swaps the
    panel in, and each field's message out of band)."""
    values = await _form(request)
    body, form_problems = request_body(values)
    rows = rows_of(body)

    def predict() -> tuple[dict[str, Any] | None, dict[str, list[str]], list[str]]:
        by_field = {k: [v] for k, v in form_problems.items()}
        if not body["model"] or not body["training_file"]:
            return None, by_field, []
        with db.session() as session:
            try:
                return admission.estimate_job(session, settings, caller.user_id, JobCreate.model_validate(body)), \
                    by_field, []
            except (ValidationError, errors.InvalidRequest) as e:
                found, general = problems_of(e, rows)
                return None, {**found, **by_field}, general

    result, by_field, general = await run_in_threadpool(predict)
    field_names = [*JOB_FIELDS, *FIELDS,
                   *(f"eval_{r}_{n}" for r in range(EVAL_ROWS) for n in ("task", "file", "limit"))]
    return render(request, "_estimate.html", caller, estimate=result, errors=by_field, general=general,
                  field_names=field_names, ready=bool(body["model"] and body["training_file"]))
