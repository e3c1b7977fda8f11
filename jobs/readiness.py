"""Whether the service can do its work now (``GET /readyz``): the database answers, its schema is at the
migrations' head, the broker answers, and a worker was seen recently. Each check is timed and says what
failed in words, never with a URL or a password."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import func, select, text

from jobs.db import Database
from jobs.models import Node, utcnow
from jobs.settings import Settings

#: how long the broker has to answer (seconds)
BROKER_TIMEOUT_S = 2.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    ms: float

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "ms": round(self.ms, 2)}


@lru_cache
def migrations_head() -> str:
    """The revision the migrations end at (read once from the migrations folder)."""
    from alembic.script import ScriptDirectory

    from jobs.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


def _timed(name: str, probe) -> Check:
    started = time.perf_counter()
    try:
        ok, detail = probe()
    except Exception as e:  # the check failed: its kind of error, not its text (which may hold a URL)
        ok, detail = False, f"{type(e).__name__}: cannot be reached"
    return Check(name, ok, detail, (time.perf_counter() - started) * 1000)


def checks(db: Database, settings: Settings) -> list[Check]:
    """Every check, in order; those that need the database are failed at once when it does not answer."""
    found: dict[str, object] = {}

    def database() -> tuple[bool, str]:
        with db.session() as session:
            session.execute(text("SELECT 1"))
        try:  # a database with no schema yet answers too: the migrations check says what is missing
            with db.session() as session:
                found["revision"] = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
                live_after = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
                found["nodes"] = session.scalar(select(func.count()).select_from(Node)
                                                .where(Node.seen_at >= live_after))
        except Exception:
            found["revision"] = None
        return True, "answers"

    results = [_timed("database", database)]
    if not results[0].ok:
        results += [Check(name, False, "not checked: the database does not answer", 0.0)
                    for name in ("migrations", "broker", "workers")]
        return results
    head = migrations_head()
    revision = found.get("revision")
    results.append(Check("migrations", revision == head,
                         f"at {revision} (the head)" if revision == head else
                         f"at {revision or 'no revision'}, the head is {head}: run `python -m jobs.migrate`", 0.0))
    results.append(_timed("broker", lambda: _broker(settings)))
    nodes = int(found.get("nodes") or 0)
    results.append(Check("workers", nodes > 0,
                         f"{nodes} node(s) seen in the last {settings.heartbeat_timeout_s:g} s" if nodes else
                         f"no worker seen in the last {settings.heartbeat_timeout_s:g} s: start `lomo worker`", 0.0))
    return results


def _broker(settings: Settings) -> tuple[bool, str]:
    url = settings.resolved_broker_url()
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=BROKER_TIMEOUT_S, socket_timeout=BROKER_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
        return True, "answers"
    if url.startswith("sqla+"):  # the embedded broker: a database file of kombu's SQLAlchemy transport
        from sqlalchemy import create_engine

        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return True, "answers (the embedded broker)"
    from kombu import Connection

    with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_S)
    return True, "answers"
