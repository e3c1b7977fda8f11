"""Scoring a model already in memory with lm-eval, offline.

:func:`evaluate` wraps the model in lm-eval's ``HFLM`` (``pretrained=model, tokenizer=tokenizer``), builds
one task per request from :func:`lomo_core.evals.tasks.task_config` and runs each with
``lm_eval.evaluator.evaluate`` (the layer under ``simple_evaluate``: no global RNG reseeding, no git or
environment probing; the few-shot sampler is seeded per task exactly as ``simple_evaluate`` seeds it, so
scores are the same as ``simple_evaluate`` gives on the same config — the tests check equality).

Offline: :func:`prepare_offline` sets ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` before ``lm_eval`` / ``datasets`` are imported (and, if ``datasets`` was imported
earlier by someone else, flips its already-read switch too), so that anything that would reach the Hub
fails at once instead of waiting on the network. Our own task names are checked before lm-eval is even
imported: a name that is not ours is an :class:`~lomo_core.evals.files.UnknownTaskError`, never a Hub
lookup.

Truncation: lm-eval's HFLM keeps the *last* ``max_length`` tokens of a request (context + continuation)
and drops the rest from the left, with a log line per request. :class:`EvalScore` reports instead how many
documents were affected: a multiple-choice / loglikelihood document counts when any of its requests has
``len(context tokens) + len(continuation tokens) > max_length + 1`` (the +1: the last token is only
predicted, never fed), the tokens being those HFLM itself computes (``_encode_pair``, ``max_length`` the
value HFLM resolved); a perplexity document counts when it is longer than ``max_length`` tokens, i.e.
lm-eval split it into windows that do not see each other. The counts are taken from the requests lm-eval
actually sends (few-shot examples included) by a thin ``HFLM`` subclass that looks at them before
delegating; it changes nothing in the scoring.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lomo_core.evals.files import EvalInputError
from lomo_core.evals.tasks import SPLIT, TASK_PREFIX, EvalRequest, check_request, task_config

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass
class EvalScore:
    """One metric of one task: the shape of the service's ``eval_results`` rows."""

    task: str
    split: str
    metric: str
    value: float
    examples: int  # documents scored (MultiRC: answer options)
    model_ref: str
    truncated: int  # documents whose input lm-eval cut (or windowed) to fit max_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvalRunError(RuntimeError):
    """lm-eval failed on inputs that passed our checks (a bug here or there, not a user error)."""


def prepare_offline() -> None:
    """Make every Hugging Face library in this process refuse the network (call before importing them)."""
    import sys

    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    if "huggingface_hub" in sys.modules:  # imported already: its constants were read at import time
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            datasets.config.HF_DATASETS_OFFLINE = True


def load_model(path: str | Path, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face folder on disk (never the Hub), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EvalInputError([f"model: {path} is not a Hugging Face model folder (no config.json)"])
    prepare_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EvalInputError([f"model: {path} has no usable tokenizer ({type(e).__name__}: {e})"]) from None
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    model.eval()
    return model, tokenizer


@cache
def _counting_lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        """HFLM that records, per (task, document), whether lm-eval will cut the document's input."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.truncated_docs: dict[str, set[int]] = defaultdict(set)

        def _note(self, request: Any, tokens: int, limit: int) -> None:
            if tokens > limit:
                self.truncated_docs[request.task_name].add(request.doc_id)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            for request in requests:
                context, continuation = request.args[:2]
                if context == "":
                    tokens = 1 + len(self.tok_encode(continuation, add_special_tokens=False))
                else:
                    context_enc, continuation_enc = self._encode_pair(context, continuation)
                    tokens = len(context_enc) + len(continuation_enc)
                self._note(request, tokens, self.max_length + 1)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            for request in requests:
                self._note(request, len(self.tok_encode(request.args[0])), self.max_length)
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    return CountingHFLM


class _DropTruncationWarnings(logging.Filter):
    """HFLM logs one warning per truncated request; the count is reported in EvalScore.truncated instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Combined length of context")


@contextlib.contextmanager
def _quiet_truncation() -> Iterator[None]:
    logger = logging.getLogger("lm_eval.models.huggingface")
    flt = _DropTruncationWarnings()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def make_lm(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """lm-eval's ``HFLM`` around a model in memory (the truncation-counting subclass).

    The tokenizer is copied: HFLM sets a pad token on the tokenizer it is given (the unk or eos token),
    which would otherwise leak into the caller's training code.
    """
    prepare_offline()
    # HFLM takes the model's own device when given a model object (its `device` argument is ignored then)
    return _counting_lm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                                max_length=max_length)


def token_counter(lm: Any) -> Callable[[str], int]:
    """The number of tokens lm-eval scores in a perplexity document: ``len(lm.tok_encode(text))``."""
    return lambda text: len(lm.tok_encode(text))


def run_task(lm: Any, config: dict[str, Any], *, limit: int | None = None,
             fewshot_seed: int = FEWSHOT_SEED) -> dict[str, Any]:
    """One generated task through ``lm_eval.evaluator.evaluate``: its raw results dict."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_defaults=False).load([config])
    for task in loaded["tasks"].values():
        task.set_fewshot_seed(seed=fewshot_seed)
    results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    if results is None:
        raise EvalRunError("lm-eval returned no results (not rank 0?)")
    return results


def scores_from_results(results: dict[str, Any], task: str, *, model_ref: str, truncated: int = 0) -> list[EvalScore]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": "N/A", ...}`` as EvalScores (the filter suffix
    dropped; lm-eval's stderr entries left out)."""
    name = TASK_PREFIX + task
    row = results["results"][name]
    examples = int(results["n-samples"][name]["effective"])
    scores = []
    for key, value in row.items():
        metric, _, _filter = key.partition(",")
        if not _filter or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        scores.append(EvalScore(task=task, split=SPLIT, metric=metric, value=float(value), examples=examples,
                                model_ref=model_ref, truncated=truncated))
    return scores


def evaluate(model: Any, tokenizer: Any, requests: Sequence[EvalRequest], *, model_ref: str,
             max_length: int | None = None, batch_size: int = 8,
             on_task: Callable[[str, int, int], None] | None = None) -> list[EvalScore]:
    """Score ``model`` (a ``transformers`` causal LM in memory) on each request, in order.

    Every request is checked before anything runs (:class:`~lomo_core.evals.files.EvalInputError`).
    ``max_length`` defaults to what HFLM reads from the model config (``max_position_embeddings``...).
    ``on_task(task, index, total)`` is called as each task starts (``index`` from 0), for progress events.
    The model is put in eval mode for the run and given back in the mode it came in.
    """
    requests = list(requests)
    for request in requests:
        check_request(request)
    if batch_size < 1:
        raise EvalInputError([f"batch_size: expected a positive integer, got {batch_size!r}"])
    if max_length is not None and max_length < 2:
        raise EvalInputError([f"max_length: expected an integer >= 2, got {max_length!r}"])
    was_training = model.training  # read before HFLM puts the model in eval mode
    scores: list[EvalScore] = []
    try:
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
        with tempfile.TemporaryDirectory(prefix="lomo-eval-") as tmp, _quiet_truncation():
            for index, request in enumerate(requests):
                if on_task is not None:
                    on_task(request.task, index, len(requests))
                config = task_config(request, Path(tmp) / f"{index}-{request.task}", count_tokens=token_counter(lm))
                lm.truncated_docs.clear()
                results = run_task(lm, config, limit=request.limit)
                truncated = len(lm.truncated_docs.get(TASK_PREFIX + request.task, ()))
                scores += scores_from_results(results, request.task, model_ref=model_ref, truncated=truncated)
    finally:
        model.train(was_training)
    return scores
