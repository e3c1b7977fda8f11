"""Log lines of the API, the workers and the training processes: plain text, or with ``LOMO_LOG_FORMAT=json``
one JSON object per line (``time``, ``level``, ``logger``, ``message``, and ``job_id``, ``user`` and
``request_id`` where they are known), for a log shipper to parse.

What a line is about comes from its context: the API's middleware opens a request's context (its id from
the client's ``X-Request-Id`` or a new one, and the user once the key is checked), a worker opens a job's
while it runs it, and a training process is told its job by ``LOMO_JOB_ID``. A job's events made during a
request carry the request's id (``jobs.events.add_event``), so a client's request can be followed into
the job it made.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

#: what a log line is about; a dict shared by the threads a request's handlers run in
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lomo_log_context", default=None)
#: a client's own request id is taken when it is plain (letters, digits, '.', '_', '-', at most 128)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
FORMATS = ("text", "json")


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a plain one, else a new id."""
    if header and _REQUEST_ID.match(header):
        return header
    return f"req_{secrets.token_hex(8)}"


@contextlib.contextmanager
def context(**values: Any) -> Iterator[dict[str, Any]]:
    """A context for the log lines (and job events) of the code inside: ``request_id``, ``user``,
    ``job_id``. It is a dict, so code that learns more (who the caller is) adds it with ``note``."""
    outer = _context.get()
    current = {**(outer or {}), **{k: v for k, v in values.items() if v is not None}}
    token = _context.set(current)
    try:
        yield current
    finally:
        _context.reset(token)


def note(**values: Any) -> None:
    """Add to the current context (a no-op outside one)."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in values.items() if v is not None})


def current(name: str) -> Any:
    """A value of the current context: ``request_id``, ``user`` or ``job_id`` (``LOMO_JOB_ID`` in a
    training process)."""
    found = (_context.get() or {}).get(name)
    if found is None and name == "job_id":
        return os.environ.get("LOMO_JOB_ID") or None
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the exception, when there is one, as ``exception`` (its traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        for name in ("job_id", "user", "request_id"):
            value = getattr(record, name, None) or current(name)
            if value is not None:
                line[name] = value
        line["process"] = record.process
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def json_wanted(kind: str | None = None) -> bool:
    """Whether log lines are JSON (``kind``, else ``LOMO_LOG_FORMAT``); a value that is neither is refused
    with its name."""
    kind = (kind or os.environ.get("LOMO_LOG_FORMAT") or "text").lower()
    if kind not in FORMATS:
        raise ValueError(f"LOMO_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {kind!r}")
    return kind == "json"


def configure(kind: str | None = None, level: int | str = logging.INFO) -> bool:
    """With JSON logs (``kind``, else ``LOMO_LOG_FORMAT``): the process's records go to stderr as JSON, through
    one handler on the root logger, and the loggers of uvicorn and Celery that have their own hand theirs
    over. Text logs are left as each program sets them up. Returns whether JSON was set up."""
    if not json_wanted(kind):
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # library warnings become records too, not bare lines
    return True


def reformat(logger: logging.Logger) -> None:
    """With JSON logs, the handlers another library set up (Celery's) write JSON too."""
    if json_wanted():
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())


class _Lines:
    """A text stream that passes JSON lines through and turns any other line (a print, a traceback, a
    library's own log format) into a JSON record of ``logger``, so that a process's output stays one JSON
    object per line."""

    def __init__(self, stream, logger: str, level: str) -> None:
        self.stream, self.logger, self.level, self.pending = stream, logger, level, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if line.strip().startswith("{"):
            try:
                json.loads(line)
                self.stream.write(line + "\n")
                return
            except ValueError:
                pass
        if not line.strip():
            return
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "level": self.level,
                  "logger": self.logger, "message": line}
        for name in ("job_id", "user", "request_id"):
            if (value := current(name)) is not None:
                record[name] = value
        record["process"] = os.getpid()
        self.stream.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.pending:
            line, self.pending = self.pending, ""
            self._line(line)
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def wrap_standard_streams() -> None:
    """With JSON logs, whatever this process prints to stdout or stderr (libraries that keep their own
    handlers, tracebacks, prints) becomes JSON lines too (``stdout`` at info, ``stderr`` at warning)."""
    if json_wanted() and not isinstance(sys.stdout, _Lines):
        sys.stdout = _Lines(sys.stdout, "stdout", "info")
        sys.stderr = _Lines(sys.stderr, "stderr", "warning")
