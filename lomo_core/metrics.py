"""Where the training loop's numbers go. The loop calls ``sink.write(kind, step, payload)``; it never
prints, logs to a file or writes SQL itself. The CLI plugs in a progress bar, tests a list, the job
worker a database writer.

Kinds: ``train`` (loss, lr, tokens_per_s, grad_norm, ...), ``val`` (loss, perplexity), ``memory``
(a MemoryReport as a dict), ``checkpoint`` (path), ``event`` (message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricSink(Protocol):
    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ListSink:
    """Keeps every record in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, Any]]] = []

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.records.append((kind, step, dict(payload)))

    def close(self) -> None:
        pass

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [{"step": step, **payload} for k, step, payload in self.records if k == kind]


class JsonlSink:
    """Appends one JSON object per record to a file (``metrics.jsonl`` in the output folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self._file.write(json.dumps({"kind": kind, "step": step, **payload}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressBarSink:
    """A rich progress bar with the latest loss, lr and throughput (the CLI's sink)."""

    def __init__(self, total_steps: int | None = None, console: Any = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, info="")
        self._progress.start()
        self._val = ""

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "start":
            self._progress.update(self._task, total=payload["total_steps"], completed=payload["step"])
        elif kind == "train":
            info = f"loss {payload['loss']:.4f}  lr {payload['lr']:.2e}  {payload['tokens_per_s']:.0f} tok/s"
            self._progress.update(self._task, completed=step, info=info + self._val)
        elif kind == "val":
            self._val = f"  val {payload['loss']:.4f}"
        elif kind in ("event", "checkpoint"):
            self._progress.console.log(payload.get("message") or payload.get("path"))

    def close(self) -> None:
        self._progress.stop()


class MultiSink:
    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = list(sinks)

    def write(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(kind, step, payload)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
