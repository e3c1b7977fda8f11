"""The user's evaluation files: checking them (light: no torch, no lm-eval) and reading them into documents.

Formats accepted, one task at a time (``TASKS``):

- SuperGLUE tasks (``boolq``, ``cb``, ``copa``, ``rte``, ``wic``, ``wsc``, ``multirc``): JSONL in the
  *original* SuperGLUE release format (what ``super.gluebenchmark.com`` and FewGLUE distribute), one
  record a line. That format differs from the Hugging Face ``super_glue`` dataset that lm-eval's own
  prompts are written against: CB / RTE labels are strings (``"entailment"``), BoolQ / WiC / WSC labels
  are booleans, WSC keeps its spans in a nested ``target`` object and MultiRC nests
  ``passage -> questions -> answers``. :func:`read_eval_docs` converts each record to the Hugging Face
  shape (integer class labels in the Hub's ``ClassLabel`` order, flat WSC spans, one MultiRC document per
  answer option), so that lm-eval's prompt templates apply unchanged.
- ``perplexity``: ``.txt`` (one document per non-empty line: ``wiki_demo.txt`` holds one article a
  line; unlike training's ``.txt`` reader, lines are not joined into paragraphs, so that ``limit`` counts
  documents one can see) or ``.jsonl`` with a non-empty ``text`` string per record (for multi-line
  documents).
- ``lambada``: JSONL with ``context`` and ``continuation`` strings (the last word), as in the
  ``lambada_openai.jsonl`` of llm-foundry's local evaluation data.

Labels are required: a record without one cannot be scored, so a test split without labels is refused
(the error says so) rather than silently scoring nothing.

:func:`check_eval_file` is what the API calls at upload / submission: it reads the whole file, reports
up to ``max_problems`` bad lines (each naming the 1-based line and the field), and counts the rest so
the message says how many more there were.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SUPERGLUE_TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc", "multirc")
TASKS = (*SUPERGLUE_TASKS, "perplexity", "lambada")
MAX_PROBLEMS = 20

# the Hugging Face super_glue ClassLabel orders (lm-eval's choices are indexed by these)
CB_LABELS = ("entailment", "contradiction", "neutral")
RTE_LABELS = ("entailment", "not_entailment")


class EvalInputError(ValueError):
    """An evaluation request that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems) or ["invalid evaluation input"]
        super().__init__("; ".join(self.problems))


class UnknownTaskError(EvalInputError):
    """A task name that is not one of ``TASKS`` (refused before lm-eval is imported or asked)."""

    def __init__(self, task: Any):
        self.task = task
        super().__init__([f"unknown task {task!r}; known tasks: {', '.join(TASKS)}"])


class EvalFileError(EvalInputError):
    """A file that cannot be evaluated: each problem names the file, the 1-based line and the field."""


def require_task(task: Any) -> str:
    """The task name, or :class:`UnknownTaskError` naming it and listing the known ones."""
    if not isinstance(task, str) or task not in TASKS:
        raise UnknownTaskError(task)
    return task


# ---------------------------------------------------------------------------------------------- fields
class _Bad(Exception):
    """One problem in one record (a field path and what is wrong with it)."""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _get(record: dict, path: str) -> Any:
    """``record["a"]["b"]`` for ``path == "a.b"``; a missing key is reported with its full path."""
    value: Any = record
    walked = []
    for key in path.split("."):
        walked.append(key)
        if not isinstance(value, dict):
            raise _Bad(f"field {'.'.join(walked[:-1])!r}: expected an object, got {_type_name(value)}")
        if key not in value:
            raise _Bad(f"field {'.'.join(walked)!r}: missing")
        value = value[key]
    return value


def _str(record: dict, path: str, *, allow_empty: bool = False) -> str:
    value = _get(record, path)
    if not isinstance(value, str):
        raise _Bad(f"field {path!r}: expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _Bad(f"field {path!r}: empty string")
    return value


def _int(record: dict, path: str) -> int:
    value = _get(record, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"field {path!r}: expected an integer, got {_type_name(value)}")
    if value < 0:
        raise _Bad(f"field {path!r}: negative ({value})")
    return value


def _label(record: dict, path: str = "label", names: tuple[str, ...] | None = None) -> int:
    """A class label as the Hub's integer: booleans (False=0, True=1), integers in range, or one of
    ``names`` (the original SuperGLUE strings, e.g. ``"entailment"``)."""
    try:
        value = _get(record, path)
    except _Bad as e:
        if str(e).endswith(": missing"):
            raise _Bad(f"{e} (labels are needed to score: an unlabelled test split cannot be evaluated)") from None
        raise
    n = len(names) if names else 2
    if isinstance(value, bool):
        if names:
            raise _Bad(f"field {path!r}: expected one of {', '.join(map(repr, names))}, got {value!r}")
        return int(value)
    if isinstance(value, int):
        if not 0 <= value < n:
            raise _Bad(f"field {path!r}: {value} is out of range 0..{n - 1}")
        return value
    if isinstance(value, str) and names:
        if value not in names:
            raise _Bad(f"field {path!r}: expected one of {', '.join(map(repr, names))}, got {value!r}")
        return names.index(value)
    expected = f"one of {', '.join(map(repr, names))} or 0..{n - 1}" if names else "true/false or 0/1"
    raise _Bad(f"field {path!r}: expected {expected}, got {_type_name(value)}")


# ------------------------------------------------------------------------------- per task: record -> docs
def _boolq(r: dict, _: int) -> list[dict]:
    return [{"question": _str(r, "question"), "passage": _str(r, "passage"), "label": _label(r)}]


def _cb(r: dict, _: int) -> list[dict]:
    return [{"premise": _str(r, "premise"), "hypothesis": _str(r, "hypothesis"), "label": _label(r, names=CB_LABELS)}]


def _rte(r: dict, _: int) -> list[dict]:
    return [{"premise": _str(r, "premise"), "hypothesis": _str(r, "hypothesis"),
             "label": _label(r, names=RTE_LABELS)}]


def _copa(r: dict, _: int) -> list[dict]:
    question = _str(r, "question")
    if question not in ("cause", "effect"):
        raise _Bad(f"field 'question': expected 'cause' or 'effect', got {question!r}")
    return [{"premise": _str(r, "premise"), "choice1": _str(r, "choice1"), "choice2": _str(r, "choice2"),
             "question": question, "label": _label(r)}]


def _wic(r: dict, _: int) -> list[dict]:
    doc = {"word": _str(r, "word"), "sentence1": _str(r, "sentence1"), "sentence2": _str(r, "sentence2")}
    for i in ("1", "2"):
        start, end = _int(r, "start" + i), _int(r, "end" + i)
        if not start < end <= len(doc["sentence" + i]):
            raise _Bad(f"fields 'start{i}'/'end{i}': span {start}..{end} is not inside sentence{i} "
                       f"({len(doc['sentence' + i])} characters)")
        doc["start" + i], doc["end" + i] = start, end
    doc["label"] = _label(r)
    return [doc]


def _wsc(r: dict, _: int) -> list[dict]:
    text = _str(r, "text")
    doc = {"text": text, "span1_index": _int(r, "target.span1_index"), "span2_index": _int(r, "target.span2_index"),
           "span1_text": _str(r, "target.span1_text"), "span2_text": _str(r, "target.span2_text")}
    words = len(text.split())
    for i in ("1", "2"):
        if doc[f"span{i}_index"] >= words:
            raise _Bad(f"field 'target.span{i}_index': {doc[f'span{i}_index']} is past the last word of 'text' "
                       f"({words} words)")
    doc["label"] = _label(r)
    return [doc]


def _multirc(r: dict, line: int) -> list[dict]:
    """One document per answer option (lm-eval's unit); ``question_id`` groups a question's options for EM."""
    paragraph = _str(r, "passage.text")
    questions = _get(r, "passage.questions")
    if not isinstance(questions, list) or not questions:
        raise _Bad(f"field 'passage.questions': expected a non-empty array, got {_type_name(questions)}")
    docs = []
    for qi, q in enumerate(questions):
        where = f"passage.questions[{qi}]"
        if not isinstance(q, dict):
            raise _Bad(f"field {where!r}: expected an object, got {_type_name(q)}")
        try:
            question = _str(q, "question")
            answers = _get(q, "answers")
        except _Bad as e:
            raise _Bad(str(e).replace("field '", f"field '{where}.", 1)) from None
        if not isinstance(answers, list) or not answers:
            raise _Bad(f"field '{where}.answers': expected a non-empty array, got {_type_name(answers)}")
        for ai, a in enumerate(answers):
            at = f"{where}.answers[{ai}]"
            if not isinstance(a, dict):
                raise _Bad(f"field {at!r}: expected an object, got {_type_name(a)}")
            try:
                docs.append({"paragraph": paragraph, "question": question, "answer": _str(a, "text"),
                             "label": _label(a), "question_id": f"{line}.{qi}"})
            except _Bad as e:
                raise _Bad(str(e).replace("field '", f"field '{at}.", 1)) from None
    return docs


def _lambada(r: dict, _: int) -> list[dict]:
    return [{"context": _str(r, "context"), "continuation": _str(r, "continuation")}]


def _text(r: dict, _: int) -> list[dict]:
    return [{"text": _str(r, "text")}]


_READERS: dict[str, Callable[[dict, int], list[dict]]] = {
    "boolq": _boolq, "cb": _cb, "copa": _copa, "rte": _rte, "wic": _wic, "wsc": _wsc, "multirc": _multirc,
    "perplexity": _text, "lambada": _lambada,
}


# ---------------------------------------------------------------------------------------------- reading
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; a missing file / bad encoding is an EvalFileError."""
    if not path.exists():
        raise EvalFileError([f"{path}: no such file"])
    if not path.is_file():
        raise EvalFileError([f"{path}: not a file"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise EvalFileError([f"{path.name} line {line}: not UTF-8 text ({e.reason})"]) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _parse(task: str, path: str | Path, max_problems: int) -> tuple[int, list[dict]]:
    """``(records, docs)`` of a valid file; otherwise EvalFileError with up to ``max_problems`` lines."""
    task = require_task(task)
    path = Path(path)
    reader = _READERS[task]
    records, docs, problems, bad = 0, [], [], 0
    plain_text = task == "perplexity" and path.suffix == ".txt"
    if task == "perplexity" and path.suffix not in (".txt", ".jsonl"):
        raise EvalFileError([f"{path.name}: perplexity reads .txt (one document a line) or .jsonl (a 'text' "
                             f"field a record), not {path.suffix or 'a file without extension'!r}"])
    for number, line in _lines(path):
        try:
            if plain_text:
                docs.append({"text": line})
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(f"invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(record, dict):
                    raise _Bad(f"expected a JSON object, got {_type_name(record)}")
                docs.extend(reader(record, number))
            records += 1
        except _Bad as e:
            bad += 1
            if len(problems) < max_problems:
                problems.append(f"{path.name} line {number}: {e}")
    if bad > len(problems):
        problems.append(f"... and {bad - len(problems)} more bad lines ({bad} in all)")
    if problems:
        raise EvalFileError(problems)
    if records == 0:
        raise EvalFileError([f"{path.name}: no records (the file is empty)"])
    return records, docs


def check_eval_file(task: str, path: str | Path, *, max_problems: int = MAX_PROBLEMS) -> int:
    """Validate a user's file for ``task`` and return its number of records (lines; for ``multirc``
    passages, each holding several questions and answer options).

    Light on purpose (it imports neither torch nor lm-eval): the API calls it at upload and at job
    submission. Raises :class:`UnknownTaskError` for a task that is not in ``TASKS`` and
    :class:`EvalFileError` listing up to ``max_problems`` bad lines, e.g.
    ``val.jsonl line 5: field 'passage': missing``.
    """
    return _parse(task, path, max_problems)[0]


def read_eval_docs(task: str, path: str | Path) -> list[dict[str, Any]]:
    """The file's documents in the Hugging Face ``super_glue`` shape (see the module docstring); for
    ``perplexity`` ``{"text"}``, for ``lambada`` ``{"context", "continuation"}``."""
    return _parse(task, path, MAX_PROBLEMS)[1]
