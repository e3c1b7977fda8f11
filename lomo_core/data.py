"""Training data: instruction (SFT) and plain-text datasets, loss masking, padding / packing, batch order.

Accepted files (format detected from the first record, or forced with ``data_format``):

- JSONL (one object a line) or a JSON array of objects, each one of:

  - chat ``messages`` (OpenAI's chat format): a list of ``{"role", "content"}`` with role ``system``,
    ``user`` or ``assistant``; ``content`` is a string or a list of text parts
    (``{"type": "text", "text": ...}``, joined with nothing between them). The messages are rendered
    with the tokenizer's chat template (the fallback ``<|role|>\\ncontent\\n`` without one), and the loss
    is taken on what the template adds for each assistant message, unless that message has
    ``"weight": 0`` (OpenAI's per-message weight: ``0`` or ``1``, on assistant messages only, default
    ``1``; the key is not shown to the template);
  - ``prompt`` / ``completion`` (OpenAI's legacy format) or ``prompt`` / ``response``: the two strings
    are joined as they are, loss on the completion / response only;
  - Alpaca's ``instruction`` / ``input`` / ``output``: loss on the output only;
  - ``text``: plain text, loss on every token;
- ``.txt``: plain text, one document per blank-line-separated paragraph block.

The tokenizer's BOS token (never trained) and EOS token (trained) frame every example, when it has them.

Function calling is refused: top-level ``tools`` / ``functions``, messages with ``tool_calls`` /
``function_call`` and messages of role ``tool`` / ``function`` (null or empty values count as absent),
as are content parts other than text (images, audio, files). A chat needs at least one non-empty
assistant message of weight 1. Every problem is reported with the file and line (or array index) it
comes from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
FORMATS = ("auto", "instruct", "text")
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_FALLBACK = "<|{role}|>\n{content}\n"
CHAT_ROLES = ("system", "user", "assistant")
INSTRUCT_KEYS = frozenset({"prompt", "completion", "instruction", "messages"})


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


# ---------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path, errors: list[tuple[int, str]] | None = None) -> list[tuple[int, Any]]:
    """Return ``(line_number, record)`` pairs; plain-text files give ``{"text": block}`` records.

    A JSONL line that does not parse raises, or, when an ``errors`` list is given, is added to it and
    skipped (so that a file check can report every bad line at once).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".txt":
        records, line_no, block, start = [], 0, [], 1
        for line_no, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                if not block:
                    start = line_no
                block.append(line)
            elif block:
                records.append((start, {"text": "\n".join(block)}))
                block = []
        if block:
            records.append((start, {"text": "\n".join(block)}))
        return records
    if raw.lstrip().startswith("["):
        try:
            array = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return [(i, rec) for i, rec in enumerate(array, start=1)]
    records = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            if errors is None:
                raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
            errors.append((line_no, f"invalid JSON: {e.msg} (column {e.colno})"))
    return records


def detect_format(record: Any) -> str:
    """``text`` for records that only carry text; everything else is read as instruction data."""
    if isinstance(record, dict) and "text" in record and not INSTRUCT_KEYS & set(record):
        return "text"
    return "instruct"


# ---- turning records into (prompt, response) segments
def _require_str(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _present(value: Any) -> bool:
    """Whether an optional field is really there: null and empty lists / objects count as absent."""
    return value is not None and value != [] and value != {}


def _function_calling(where: str, what: str) -> DataError:
    return DataError(
        f"{where}: function calling ({what}) is not supported for training yet; remove the tools or the row"
    )


def _segments(record: Any, fmt: str, where: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a record into text segments, each flagged with whether the loss is taken on it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        return [(_require_str(record, "text", where), True)]
    for key in ("tools", "functions"):
        if _present(record.get(key)):
            raise _function_calling(where, repr(key))
    if "messages" in record:
        return _chat_segments(record["messages"], where, tokenizer)
    if "instruction" in record:
        instruction = _require_str(record, "instruction", where)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        output = _require_str(record, "output", where)
        template = ALPACA_TEMPLATE_WITH_INPUT if extra.strip() else ALPACA_TEMPLATE
        return [(template.format(instruction=instruction, input=extra), False), (output, True)]
    if "completion" in record or "prompt" in record or "response" in record:
        return [(_require_str(record, "prompt", where), False), (_prompt_answer(record, where), True)]
    raise DataError(
        f"{where}: no usable fields: expected 'prompt'/'completion', 'prompt'/'response', "
        f"'instruction'/'output', 'messages' or 'text', got {sorted(record)}"
    )


def _prompt_answer(record: dict, where: str) -> str:
    """The trained half of a ``prompt`` record: its ``completion`` (OpenAI's legacy format) or ``response``."""
    if "completion" in record and "response" in record:
        raise DataError(f"{where}: both 'completion' and 'response' are given; keep one")
    if "completion" in record:
        return _require_str(record, "completion", where)
    if "response" not in record:
        raise DataError(f"{where}: missing field 'response' (or 'completion')")
    return _require_str(record, "response", where)


def _chat_segments(messages: Any, where: str, tokenizer: Any) -> list[tuple[str, bool]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    checked = [_chat_message(msg, i, where) for i, msg in enumerate(messages)]
    clean = [msg for msg, _ in checked]
    if not any(trained and msg["content"].strip() for msg, trained in checked):
        if any(msg["role"] == "assistant" and msg["content"].strip() for msg in clean):
            raise DataError(f"{where}: no non-empty assistant message to learn from: those there have weight 0")
        raise DataError(f"{where}: no non-empty assistant message to learn from")

    # Render growing prefixes so each message's text is exactly what the template adds for it.
    segments, previous = [], ""
    for i, (_, trained) in enumerate(checked):
        rendered = _render_chat(clean[: i + 1], tokenizer, where)
        if not rendered.startswith(previous):
            raise DataError(f"{where}: the chat template does not render messages incrementally")
        segments.append((rendered[len(previous):], trained))
        previous = rendered
    return segments


def _chat_message(msg: Any, i: int, where: str) -> tuple[dict, bool]:
    """Check ``messages[i]``; return it as the template sees it (text content, no ``weight``) and
    whether the loss is taken on it (an assistant message of weight 1)."""
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise DataError(f"{where}: messages[{i}] must be an object with a string 'role'")
    role = msg["role"]
    if role in ("tool", "function"):
        raise _function_calling(where, f"messages[{i}] has role {role!r}")
    for key in ("tool_calls", "function_call"):
        if _present(msg.get(key)):
            raise _function_calling(where, f"messages[{i}].{key}")
    if role not in CHAT_ROLES:
        raise DataError(f"{where}: messages[{i}].role {role!r} is not system/user/assistant")
    # ``weight`` is ours to read, not the template's; the function-calling keys left here are empty.
    clean = {key: value for key, value in msg.items() if key not in ("weight", "tool_calls", "function_call")}
    clean["content"] = _message_text(msg.get("content"), i, where)
    weight = _message_weight(msg, i, where)
    return clean, role == "assistant" and weight == 1


def _message_text(content: Any, i: int, where: str) -> str:
    """A message's content as one string: a string as it is, a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        got = "null" if content is None else type(content).__name__
        raise DataError(f"{where}: messages[{i}].content must be a string or a list of text parts, got {got}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise DataError(f"{where}: messages[{i}].content[{j}] has type {kind!r}: only text parts can be trained")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(f'{where}: messages[{i}].content[{j}] must be {{"type": "text", "text": <string>}}')
        texts.append(part["text"])
    return "".join(texts)


def _message_weight(msg: dict, i: int, where: str) -> int:
    """OpenAI's per-message ``weight``: exactly 0 or 1 (not true/false, not 1.0), on assistant messages only."""
    if "weight" not in msg:
        return 1
    if msg["role"] != "assistant":
        raise DataError(f"{where}: messages[{i}].weight is only allowed on assistant messages, not {msg['role']!r}")
    weight = msg["weight"]
    if type(weight) is not int or weight not in (0, 1):
        raise DataError(f"{where}: messages[{i}].weight must be 0 or 1, got {json.dumps(weight)}")
    return weight


def _render_chat(messages: list[dict], tokenizer: Any, where: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError  # chat templates are Jinja; transformers needs it to render them

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as e:
            raise DataError(f"{where}: the chat template refused the messages: {e}") from None
    return "".join(CHAT_FALLBACK.format(role=m["role"], content=m["content"]) for m in messages)


# ---------------------------------------------------------------------------------------------- checking
@dataclass
class FileCheck:
    """What :func:`check_file` found: how many records, in which format, and every problem by line."""

    records: int
    format: str | None
    errors: list[tuple[int, str]]  # (line or record number, problem)
    truncated_errors: bool = False  # more problems than ``max_errors`` were found

    @property
    def ok(self) -> bool:
        return not self.errors


def _numbered_records(path: Path, errors: list[tuple[int, str]]) -> list[tuple[int, Any]]:
    """:func:`read_records`, with every problem added to ``errors`` as (line, message) instead of raised."""
    try:
        return read_records(path, errors)
    except DataError as e:  # a whole-file problem (encoding, a JSON array that does not parse)
        where, _, problem = str(e).partition(": ")
        line = where.rsplit(":", 1)[-1]
        errors.append((int(line) if line.isdigit() else 0, problem))
        return []


def check_file(
    path: str | Path, data_format: str = "auto", max_example_chars: int | None = None, max_errors: int = 50
) -> FileCheck:
    """Check every record of a data file without a tokenizer (what an upload is validated with).

    Finds what would stop training: bad JSON, missing or non-string fields, empty responses, chat
    records with nothing to learn from (no assistant message, or all of weight 0), weights other than
    0 or 1, what is not supported (function calling, content parts other than text), records of another
    format than the first, and records longer than ``max_example_chars`` characters. Chats are checked
    with the fallback template: a model's own template can still refuse one when a job runs. Length in
    tokens depends on the model and is checked when a job runs (over-long examples are truncated and
    counted there).
    """
    if data_format not in FORMATS:
        raise DataError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    path = Path(path)
    errors: list[tuple[int, str]] = []
    records = _numbered_records(path, errors)
    if not records and not errors:
        errors.append((0, "the file has no records"))
    fmt = None
    if records:
        fmt = detect_format(records[0][1]) if data_format == "auto" else data_format
    for line_no, record in records:
        try:
            segments = _segments(record, fmt, "", None)
        except DataError as e:
            errors.append((line_no, str(e).removeprefix(": ")))
            continue
        chars = sum(len(text) for text, _ in segments)
        if max_example_chars is not None and chars > max_example_chars:
            errors.append((line_no, f"the example has {chars} characters, over the limit of {max_example_chars}"))
    errors.sort(key=lambda item: item[0])
    return FileCheck(len(records), fmt, errors[:max_errors], len(errors) > max_errors)


# ---------------------------------------------------------------------------------------------- tokenising
def tokenize_record(record: Any, fmt: str, tokenizer: Any, max_length: int, where: str) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in _segments(record, fmt, where, tokenizer):
        seg = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.extend(seg)
        labels.extend(seg if trained else [IGNORE_INDEX] * len(seg))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids[:max_length], labels[:max_length])


@dataclass
class LoadedData:
    examples: list[Example]
    format: str
    truncated: int
    dropped: int  # examples whose response was cut away entirely by truncation


def load_examples(path: str | Path, tokenizer: Any, max_length: int, data_format: str = "auto") -> LoadedData:
    if data_format not in FORMATS:
        raise DataError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file has no records")
    fmt = detect_format(records[0][1]) if data_format == "auto" else data_format
    examples, truncated, dropped = [], 0, 0
    for line_no, record in records:
        where = f"{path}:{line_no}"
        full = tokenize_record(record, fmt, tokenizer, max_length=10**9, where=where)
        if len(full.input_ids) > max_length:
            truncated += 1
        example = Example(full.input_ids[:max_length], full.labels[:max_length])
        # Labels are shifted by one inside the model: position 0 never contributes to the loss.
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(
            f"{path}: no example has a response token left within max_seq_len={max_length}; "
            "raise max_seq_len or shorten the prompts"
        )
    return LoadedData(examples, fmt, truncated, dropped)


# ---------------------------------------------------------------------------------------------- batching
def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into rows of exactly ``seq_len`` tokens (the last partial row is kept)."""
    rows, ids, labels = [], [], []
    for ex in examples:
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
        while len(ids) >= seq_len:
            rows.append(Example(ids[:seq_len], labels[:seq_len]))
            ids, labels = ids[seq_len:], labels[seq_len:]
    if len(ids) > 1 and any(label != IGNORE_INDEX for label in labels[1:]):
        rows.append(Example(ids, labels))
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    import torch  # imported on use: checking a data file (the job API) does not need torch

    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchPlan:
    """A deterministic batch order: epoch ``e`` is a permutation drawn from ``seed + e``.

    The position (epoch, index) fully determines the next batch, which is what a checkpoint stores.
    """

    def __init__(self, rows: list[Example], batch_size: int, seed: int, shuffle: bool, pad_id: int):
        if not rows:
            raise DataError("no training rows")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        order = self.order(epoch)
        for index in range(start, self.batches_per_epoch):
            chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
            yield index, collate([self.rows[i] for i in chosen], self.pad_id)
