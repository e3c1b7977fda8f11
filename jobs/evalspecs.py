"""The evaluations a job asks for (``evals``), checked at submission: each task known, each file an
upload of the caller's that holds what its task needs; every problem names ``evals[i].field``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs.errors import NotFound, Problem
from jobs.files import file_path, get_file
from jobs.schemas import JobCreate
from jobs.settings import Settings


def checked_evals(session: Session, settings: Settings, owner: str, request: JobCreate,
                   problems: list[Problem]) -> list[dict[str, Any]]:
    """The job's evaluations with their files checked for their task (every problem names
    ``evals[i].field`` and, for a file, its line)."""
    from lomo_core.evals import TASKS, EvalInputError, EvalRequest, UnknownTaskError, check_eval_file, check_request

    checked = []
    for index, spec in enumerate(request.evals):
        where = f"evals[{index}]"
        if spec.task not in TASKS:
            problems.append(Problem(f"{where}.task", f"unknown task {spec.task!r}; known: {', '.join(TASKS)}"))
            continue
        paths: dict[str, Path | None] = {"file": None, "fewshot_file": None}
        for name in paths:
            ident = getattr(spec, name)
            if ident is None:
                continue
            try:
                paths[name] = file_path(settings, get_file(session, owner, ident))
            except NotFound:
                problems.append(Problem(f"{where}.{name}", f"no uploaded file with id {ident!r}"))
                continue
            try:
                check_eval_file(spec.task, paths[name])
            except UnknownTaskError:
                pass
            except EvalInputError as e:
                problems += [Problem(f"{where}.{name}", f"file {ident}: {p.replace(str(paths[name]), ident)}")
                             for p in e.problems]
                paths[name] = None
        if paths["file"] is None:
            continue
        try:
            check_request(EvalRequest(spec.task, paths["file"], spec.limit, spec.num_fewshot, paths["fewshot_file"]))
        except EvalInputError as e:
            problems += [Problem(f"{where}.{p.partition(':')[0]}" if p.partition(":")[0] in ("limit", "num_fewshot")
                                 else f"{where}.fewshot_file", p) for p in e.problems]
            continue
        checked.append(spec.model_dump())
    return checked
