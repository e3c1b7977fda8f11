"""lm-eval task configurations, generated at run time for the user's files.

Prompts, choices and metrics are those of lm-eval 0.4.13's own tasks (``lm_eval/tasks/super_glue/*/
default.yaml``, ``lambada/lambada_openai.yaml``, ``wikitext/wikitext.yaml``); the tests render lm-eval's
installed YAML on the same documents and check that every request string is identical. Where lm-eval
uses a template string it is repeated here verbatim (it is the prompt, not code); where it uses a Python
function (COPA, WSC) the function is written here again from its behaviour.

Data never comes from the Hub: :func:`task_config` writes the documents of the user's file (checked and
converted by :mod:`lomo_core.evals.files`) as JSONL into a work folder and points lm-eval at it with
``dataset_path: json`` + ``data_files``, with the ``datasets`` cache inside that folder too. Writing a
normalized copy rather than pointing at the user's file directly matters because ``datasets`` infers an
Arrow schema from the raw rows, and an irrelevant field with mixed types (``idx`` an integer here and a
string there) would stop the run with a pyarrow error; the copy also carries MultiRC already flattened.

Departures from lm-eval's tasks, each deliberate:

- **MultiRC target**. lm-eval's yaml lists the choices as ``[... yes, ... no]`` and takes
  ``doc_to_target: label``, which sends the Hub's label 1 ("this answer is correct") to the ``no``
  choice: its ``acc`` counts the model right when it rejects a correct answer. Here the gold choice is
  ``yes`` for a correct answer (index ``1 - label``); the prompts and choices are unchanged.
- **MultiRC metrics**. SuperGLUE scores MultiRC with F1a and EM, which lm-eval's task does not compute
  (its ``acc`` is per answer option). Each answer option is one lm-eval document (the nested record is
  flattened by :func:`lomo_core.evals.files.read_eval_docs`); ``process_results`` returns the per-option
  prediction (the ``yes`` continuation more likely than ``no``), and two aggregations turn them into
  ``f1a`` (binary F1 over all answer options, "correct" the positive class) and ``em`` (the fraction of
  questions whose options are all predicted right). ``acc`` (per option) is kept. ``limit`` counts answer
  options, as lm-eval's ``limit`` counts documents: a question cut by the limit is judged on the options
  that were scored.
- **CB F1** is the macro average of the three per-class F1 scores as lm-eval's ``cb_multi_fi`` computes
  it (a class with no gold and no predicted example scores 0, as scikit-learn's default does).
- **perplexity** is lm-eval's wikitext recipe (``loglikelihood_rolling`` over each document, word / byte
  perplexity and bits per byte, words counted as lm-eval counts them) without wikitext's detokenizer,
  plus ``token_perplexity`` and ``loss`` (mean negative log-likelihood per token, nats) over the tokens
  the model actually scored (``HFLM.tok_encode`` of the document, BOS included when the tokenizer adds
  one). Few-shot is refused for it, as lm-eval refuses it.
- **lambada** is lm-eval's ``lambada_openai``: the context is the passage without its last word, the
  target ``" " + last word``; the file gives them as ``context`` / ``continuation``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomo_core.evals.files import (
    MAX_PROBLEMS,
    SUPERGLUE_TASKS,
    EvalFileError,
    EvalInputError,
    check_eval_file,
    read_eval_docs,
    require_task,
)

TASK_PREFIX = "lomo_"  # lm-eval task names: lomo_boolq, ... (never one of lm-eval's registered names)
SPLIT = "validation"  # the user's file is the split scored; a fewshot_file is "train"


@dataclass
class EvalRequest:
    """One evaluation: ``task`` on ``file``; ``limit`` documents at most (the first ones); ``num_fewshot``
    labelled examples drawn from ``fewshot_file`` (same format) in front of each prompt."""

    task: str
    file: str | Path
    limit: int | None = None
    num_fewshot: int = 0
    fewshot_file: str | Path | None = None


def check_request(request: EvalRequest, *, max_problems: int = MAX_PROBLEMS) -> int:
    """Validate a request without loading anything heavy; return the number of records in its file.

    Few-shot needs a ``fewshot_file``: lm-eval would otherwise draw the examples from the evaluated
    file itself, and a held-out score should not see its own split.
    """
    task = require_task(request.task)
    problems = []
    if request.limit is not None and (isinstance(request.limit, bool) or not isinstance(request.limit, int)
                                      or request.limit < 1):
        problems.append(f"limit: expected a positive integer, got {request.limit!r}")
    if isinstance(request.num_fewshot, bool) or not isinstance(request.num_fewshot, int) or request.num_fewshot < 0:
        problems.append(f"num_fewshot: expected an integer >= 0, got {request.num_fewshot!r}")
    elif request.num_fewshot > 0 and task == "perplexity":
        problems.append("num_fewshot: perplexity scores whole documents; few-shot examples do not apply")
    elif request.num_fewshot > 0 and request.fewshot_file is None:
        problems.append("num_fewshot: few-shot examples need a fewshot_file (a labelled file in the same format)")
    if problems:
        raise EvalInputError(problems)
    records = check_eval_file(task, request.file, max_problems=max_problems)
    if request.num_fewshot > 0:
        shots = check_eval_file(task, request.fewshot_file, max_problems=max_problems)
        available = len(read_eval_docs(task, request.fewshot_file)) if task == "multirc" else shots
        if available < request.num_fewshot:
            raise EvalFileError([f"{Path(request.fewshot_file).name}: {available} examples, fewer than "
                                 f"num_fewshot={request.num_fewshot}"])
    return records


# --------------------------------------------------------------------------------------------- prompts
def _copa_text(doc: dict) -> str:
    connector = "because" if doc["question"] == "cause" else "therefore"
    return doc["premise"].strip()[:-1] + " " + connector  # the premise's final period dropped


def _copa_choice_text(choice: str) -> str:
    return " " + choice[0].lower() + choice[1:]


def _copa_choices(doc: dict) -> list[str]:
    return [_copa_choice_text(doc["choice1"]), _copa_choice_text(doc["choice2"])]


def _copa_target(doc: dict) -> str:
    return _copa_choices(doc)[doc["label"]]


def _wsc_text(doc: dict) -> str:
    """The passage with the pronoun starred (``span2_index`` counts words), then the question."""
    from lm_eval.utils import general_detokenize

    text, pronoun, noun = doc["text"], doc["span2_text"], doc["span1_text"]
    before = " ".join(text.split()[: doc["span2_index"]])
    after = text[len(before) + len(pronoun) + 1:]
    passage = general_detokenize(f"{before} *{pronoun}*{after}")
    return (f"Passage: {passage}\n"
            f'Question: In the passage above, does the pronoun "*{pronoun}*" refer to "*{noun}*"?\n'
            "Answer:")


def _multirc_choices(doc: dict) -> list[str]:
    return [f"{doc['answer']}\nIs the answer correct? yes", f"{doc['answer']}\nIs the answer correct? no"]


def _multirc_target(doc: dict) -> int:
    return 0 if doc["label"] == 1 else 1  # index into _multirc_choices: a correct answer's gold is "yes"


def _lambada_target(doc: dict) -> str:
    word = doc["continuation"]
    return word if word[:1].isspace() or doc["context"][-1:].isspace() else " " + word


def _text_target(doc: dict) -> str:
    return doc["text"]


# --------------------------------------------------------------------------------------------- metrics
def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def cb_macro_f1(items: Sequence[tuple[int, int]]) -> float:
    """Mean of the per-class F1 of CB's three classes; items are lm-eval's ``(gold, pred)`` pairs."""
    scores = []
    for c in range(3):
        tp = sum(1 for g, p in items if g == c and p == c)
        fp = sum(1 for g, p in items if g != c and p == c)
        fn = sum(1 for g, p in items if g == c and p != c)
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / 3


def multirc_f1a(items: Sequence[tuple[int, int]]) -> float:
    """Binary F1 over all answer options, "correct" the positive class; items are ``(pred, gold)``."""
    tp = sum(1 for p, g in items if p and g)
    fp = sum(1 for p, g in items if p and not g)
    fn = sum(1 for p, g in items if g and not p)
    return _f1(tp, fp, fn)


def multirc_em(items: Sequence[tuple[str, int, int]]) -> float:
    """Fraction of questions whose scored options are all predicted right; items ``(question, pred, gold)``."""
    right: dict[str, bool] = defaultdict(lambda: True)
    for question, pred, gold in items:
        right[question] = right[question] and pred == gold
    return sum(right.values()) / len(right) if right else 0.0


def _multirc_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, Any]:
    lls = [ll for ll, _ in results]
    pred = 1 if lls.index(max(lls)) == 0 else 0  # argmax, first on ties (as np.argmax): choice 0 is "yes"
    gold = doc["label"]
    return {"acc": float(pred == gold), "f1a": (pred, gold), "em": (doc["question_id"], pred, gold)}


def mean_nll(items: Sequence[tuple[float, int]]) -> float:
    """Negative log-likelihood per token (nats): ``-sum(loglikelihood) / sum(tokens)``."""
    return -sum(ll for ll, _ in items) / sum(n for _, n in items)


def _perplexity_results(count_tokens: Callable[[str], int] | None):
    def process(doc: dict, results: list[float]) -> dict[str, Any]:
        (ll,) = results
        text = doc["text"]
        words = len(re.split(r"\s+", text))  # lm-eval's count_words
        out = {"word_perplexity": (ll, words), "byte_perplexity": (ll, len(text.encode("utf-8"))),
               "bits_per_byte": (ll, len(text.encode("utf-8")))}
        if count_tokens is not None:
            tokens = count_tokens(text)
            out.update(token_perplexity=(ll, tokens), loss=(ll, tokens))
        return out

    return process


def _metric(name: str, aggregation: Any, higher_is_better: bool) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


ACC = _metric("acc", "mean", True)

# lm-eval's own templates (super_glue/*/default.yaml), verbatim
_SUPERGLUE: dict[str, dict[str, Any]] = {
    "boolq": {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
              "doc_to_choice": ["no", "yes"], "metric_list": [ACC]},
    "cb": {"doc_to_text": "{{premise}}\nQuestion: {{hypothesis}}. True, False, or Neither?\nAnswer:",
           "doc_to_target": "label", "doc_to_choice": ["True", "False", "Neither"],
           "metric_list": [ACC, _metric("f1", cb_macro_f1, True)]},
    "copa": {"doc_to_text": _copa_text, "doc_to_target": _copa_target, "doc_to_choice": _copa_choices,
             "metric_list": [ACC]},
    "rte": {"doc_to_text": "{{premise}}\nQuestion: {{hypothesis}} True or False?\nAnswer:", "doc_to_target": "label",
            "doc_to_choice": ["True", "False"], "metric_list": [ACC]},
    "wic": {"doc_to_text": "Sentence 1: {{sentence1}}\nSentence 2: {{sentence2}}\nQuestion: Is the word "
                           "'{{sentence1[start1:end1]}}' used in the same way in the two sentences above?\nAnswer:",
            "doc_to_target": "label", "doc_to_choice": ["no", "yes"], "metric_list": [ACC]},
    "wsc": {"doc_to_text": _wsc_text, "doc_to_target": "label", "doc_to_choice": ["no", "yes"],
            "metric_list": [ACC]},
    "multirc": {"doc_to_text": "{{paragraph}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": _multirc_target,
                "doc_to_choice": _multirc_choices, "process_results": _multirc_results,
                "metric_list": [ACC, _metric("f1a", multirc_f1a, True), _metric("em", multirc_em, True)]},
}

METRICS = {  # the metrics each task reports (EvalScore.metric)
    **{task: [m["metric"] for m in spec["metric_list"]] for task, spec in _SUPERGLUE.items()},
    "perplexity": ["word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "loss"],
    "lambada": ["perplexity", "acc"],
}


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def task_config(request: EvalRequest, workdir: str | Path, *,
                count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """The lm-eval task configuration (a dict for ``TaskManager.load`` / ``simple_evaluate(tasks=[...])``)
    for ``request``, with its documents written under ``workdir``.

    ``count_tokens`` (``perplexity`` only) gives the number of tokens the model scores in a document
    (``HFLM.tok_encode``); without it the token-level metrics are left out. The file is checked first
    (:class:`~lomo_core.evals.files.EvalInputError` on a bad one).
    """
    check_request(request)
    task, workdir = request.task, Path(workdir)
    data_files = {SPLIT: str(workdir / f"{SPLIT}.jsonl")}
    _write_jsonl(workdir / f"{SPLIT}.jsonl", read_eval_docs(task, request.file))
    if request.num_fewshot > 0:
        data_files["train"] = str(workdir / "train.jsonl")
        _write_jsonl(workdir / "train.jsonl", read_eval_docs(task, request.fewshot_file))
    config: dict[str, Any] = {
        "task": TASK_PREFIX + task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files, "cache_dir": str(workdir / "datasets-cache")},
        "validation_split": SPLIT,
        "num_fewshot": request.num_fewshot,
        "metadata": {"version": 1.0, "source_file": str(request.file)},
    }
    if request.num_fewshot > 0:
        config.update(training_split="train", fewshot_split="train")
    if task in SUPERGLUE_TASKS:
        config.update(output_type="multiple_choice", **_SUPERGLUE[task])
    elif task == "lambada":
        config.update(output_type="loglikelihood", doc_to_text="{{context}}", doc_to_target=_lambada_target,
                      metric_list=[_metric("perplexity", "perplexity", False), ACC])
    else:  # perplexity
        metrics = [_metric("word_perplexity", "weighted_perplexity", False),
                   _metric("byte_perplexity", "weighted_perplexity", False),
                   _metric("bits_per_byte", "bits_per_byte", False)]
        if count_tokens is not None:
            metrics += [_metric("token_perplexity", "weighted_perplexity", False), _metric("loss", mean_nll, False)]
        config.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target=_text_target,
                      process_results=_perplexity_results(count_tokens), metric_list=metrics)
    return config


def metric_in_range(metric: str, value: float) -> bool:
    """Whether a metric's value is possible at all (used by tests and as a guard on lm-eval's output)."""
    if math.isnan(value):
        return False
    if metric in ("acc", "f1", "f1a", "em"):
        return 0.0 <= value <= 1.0
    if metric.endswith("perplexity"):
        return value >= 1.0
    return value >= 0.0  # bits_per_byte, loss
