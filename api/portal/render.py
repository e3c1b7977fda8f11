"""The portal's templates (Jinja2, autoescaped) and the filters they format figures with."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

#: every page's Content-Security-Policy: scripts, styles, fonts and data from this service only, so no
#: page can load or send anything elsewhere
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")

#: a job's status as shown: a symbol and a word as well as a colour, readable without colour
STATUS_MARKS = {"validating_files": "…", "queued": "◷", "running": "▶", "pausing": "⏸", "paused": "⏸", "succeeded": "✓",
                "failed": "✗", "cancelled": "⊘"}
ACTIVE = frozenset({"validating_files", "queued", "running", "pausing"})


def to_datetime(moment: datetime | int | float | None) -> datetime | None:
    if moment is None:
        return None
    if isinstance(moment, int | float):
        return datetime.fromtimestamp(moment, timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def when(moment: datetime | int | float | None) -> str:
    """``2026-12-02 13:05 UTC``; an empty string for none."""
    moment = to_datetime(moment)
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def span(seconds: float | None) -> str:
    """A duration as people say it: ``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 4 h``."""
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago(moment: datetime | int | float | None) -> str:
    moment = to_datetime(moment)
    if moment is None:
        return ""
    delta = (datetime.now(timezone.utc) - moment).total_seconds()
    return f"in {span(-delta)}" if delta < 0 else f"{span(delta)} ago"


def size(count: int | float | None) -> str:
    """Bytes as ``812 B``, ``1.5 KiB``, ``2.31 GiB``."""
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.{2 if value < 10 else 1}f} {unit}"
        value /= 1024
    return f"{value} TiB"


def number(value: Any) -> str:
    """A figure of a table: floats with four significant digits, the rest as they are."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def as_json(value: Any) -> Markup:
    """Data for a page's script, in a ``<script type="application/json">`` block: ``<``, ``>`` and ``&``
    escaped so that no value can end the block."""
    text = json.dumps(value, sort_keys=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


templates.env.filters.update(when=when, ago=ago, size=size, number=number, as_json=as_json, span=span)
templates.env.globals.update(STATUS_MARKS=STATUS_MARKS, ACTIVE=ACTIVE)


def render(request: Request, name: str, caller: Any, status_code: int = 200, **context: Any):
    """A page (or a fragment of one, for htmx) for ``caller`` (None on the sign-in page)."""
    values = {"caller": caller, "status_code": status_code, **context}
    response = templates.TemplateResponse(request, name, values, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response
