"""Evaluation of causal LMs on the user's own files, with EleutherAI's lm-evaluation-harness, offline.

Tasks (``TASKS``): the SuperGLUE tasks ``boolq``, ``cb``, ``copa``, ``rte``, ``wic``, ``wsc``, ``multirc``
on files in the original SuperGLUE JSONL format, ``perplexity`` on held-out text and ``lambada``
(last-word accuracy and perplexity). Prompts, choices and metrics follow lm-eval's own tasks; see
:mod:`lomo_core.evals.tasks` for where and why they depart from them (MultiRC's target and F1a / EM).

Importing this package is light (no torch, no lm-eval): :func:`check_eval_file` and
:func:`check_request` are meant for the API, at upload and submission. :func:`evaluate` and
:func:`load_model` import torch / transformers / lm-eval when called.

    from lomo_core.evals import EvalRequest, evaluate, load_model

    model, tokenizer = load_model("out/model")
    scores = evaluate(model, tokenizer, [EvalRequest("boolq", "val.jsonl", limit=100)], model_ref="fine_tuned")
"""

from __future__ import annotations

from typing import Any

from lomo_core.evals.files import (
    TASKS,
    EvalFileError,
    EvalInputError,
    UnknownTaskError,
    check_eval_file,
    read_eval_docs,
)
from lomo_core.evals.tasks import METRICS, EvalRequest, check_request, metric_in_range, task_config

__all__ = [
    "TASKS", "METRICS", "EvalRequest", "EvalScore", "EvalInputError", "EvalFileError", "UnknownTaskError",
    "EvalRunError", "check_eval_file", "check_request", "read_eval_docs", "task_config", "metric_in_range",
    "evaluate", "load_model", "make_lm", "run_task", "scores_from_results", "token_counter", "prepare_offline",
]

_RUNNER = {"EvalScore", "EvalRunError", "evaluate", "load_model", "make_lm", "run_task", "scores_from_results",
           "token_counter", "prepare_offline"}


def __getattr__(name: str) -> Any:
    # runner.py itself imports nothing heavy at module level, but keeping it out of the package import
    # makes "check_eval_file needs no torch" hold by construction
    if name in _RUNNER:
        from lomo_core.evals import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'lomo_core.evals' has no attribute {name!r}")
