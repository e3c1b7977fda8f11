"""Engine and session scope. SQLite by default, Postgres in production."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
log = logging.getLogger("lomo.db")

#: Postgres connections each process's engine keeps open, and how many more it opens under load (an API
#: process serves up to 40 requests at once, anyio's thread pool; Postgres allows 100 connections by default).
#: The settings ``db_pool_size`` / ``db_max_overflow`` default to these.
DEFAULT_POOL = (10, 20)
#: the errors among which a database that cannot be reached for now is found (see ``is_unreachable``)
UNREACHABLE = (OperationalError, InterfaceError)
#: Postgres: connection exceptions (class 08), the server shutting down or restarting, a session ended for
#: idling in a transaction, a lock not granted in time, and a transaction to try again
_TRANSIENT_STATES = ("57P01", "57P02", "57P03", "25P03", "55P03", "40001", "40P01")


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached for now (a restart, a lost connection, SQLite
    locked), not that the request is wrong (a missing table, a bad statement: those are not retried)."""
    if isinstance(error, InterfaceError):
        return True
    if not isinstance(error, OperationalError):
        return False
    if getattr(error, "connection_invalidated", False):
        return True
    state = getattr(error.orig, "sqlstate", None)
    if state:
        return state.startswith("08") or state in _TRANSIENT_STATES
    text = str(error.orig).lower()
    return any(word in text for word in ("locked", "connect", "closed", "terminat", "timeout", "timed out"))


def make_engine(url: str, idle_transaction_timeout_s: float | None = None,
                pool: tuple[int, int] = DEFAULT_POOL) -> Engine:
    """The engine of ``url``. With ``idle_transaction_timeout_s`` (Postgres), the server ends a session
    whose transaction has waited that long for its client: a worker frozen or cut off in the middle of a
    write then holds no lock on a job's row, and the job can be recovered. ``pool``: the connections
    kept open and how many more may be opened under load (Postgres; SQLite opens one per thread)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # pragma: no cover - exercised by every test
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")  # the API and the worker write concurrently
            cursor.close()

        return engine
    # A cut network (no answer at all, unlike a restart) is noticed in seconds, not in TCP's 15 minutes:
    # connecting gives up after 10 s, and a connection whose sent data has no answer for 30 s is closed.
    options: dict[str, object] = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                                  "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30000}
    if idle_transaction_timeout_s:
        options["options"] = f"-c idle_in_transaction_session_timeout={int(idle_transaction_timeout_s * 1000)}"
    return create_engine(url, pool_pre_ping=True, pool_size=pool[0], max_overflow=pool[1], connect_args=options)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed when the block ends normally, rolled back on an exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class Database:
    """An engine and its session factory for one URL."""

    def __init__(self, url: str, idle_transaction_timeout_s: float | None = None,
                 pool: tuple[int, int] = DEFAULT_POOL) -> None:
        self.url = url
        self.engine = make_engine(url, idle_transaction_timeout_s, pool)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self):  # -> context manager of a Session in a transaction
        return session_scope(self.sessions)


_databases: dict[tuple[str, int, float | None, tuple[int, int]], Database] = {}


def database(url: str, idle_transaction_timeout_s: float | None = None,
             pool: tuple[int, int] = DEFAULT_POOL) -> Database:
    """One Database per URL (and idle-transaction timeout and pool, see ``make_engine``) and process (a
    forked worker child must not reuse its parent's connections)."""
    key = (url, os.getpid(), idle_transaction_timeout_s, pool)
    if key not in _databases:
        _databases[key] = Database(url, idle_transaction_timeout_s, pool)
    return _databases[key]


def close_database(url: str) -> None:
    """Dispose of this process's engines for ``url`` (tests do this before dropping a database)."""
    for key in [k for k in _databases if k[:2] == (url, os.getpid())]:
        _databases.pop(key).engine.dispose()


def ping(session: Session) -> None:
    """Raise when the database cannot answer."""
    session.execute(text("SELECT 1"))


def retrying(action: Callable[[], T], what: str, give_up_after_s: float, first_wait_s: float = 0.5,
             longest_wait_s: float = 5.0) -> T:
    """``action()``, tried again with a growing wait (``first_wait_s`` doubling up to ``longest_wait_s``)
    while the database cannot be reached, for up to ``give_up_after_s``; then its last error is raised.
    ``action`` must be a whole transaction (a failed one was rolled back, so trying it again is safe)."""
    started, wait, failures = time.monotonic(), first_wait_s, 0
    while True:
        try:
            result = action()
        except UNREACHABLE as error:
            if not is_unreachable(error):
                raise
            failures += 1
            if time.monotonic() - started + wait > give_up_after_s:
                raise
            if failures == 1:
                log.warning("%s: the database cannot be reached (%s); trying again for up to %.0f s", what,
                            type(error).__name__, give_up_after_s)
            time.sleep(wait)
            wait = min(wait * 2, longest_wait_s)
            continue
        if failures:
            log.warning("%s: done after the database came back (%d tries)", what, failures + 1)
        return result
