"""Engine and session scope. SQLite by default, Postgres in production."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
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
    return create_engine(url, pool_pre_ping=True)


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

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self):  # -> context manager of a Session in a transaction
        return session_scope(self.sessions)


_databases: dict[tuple[str, int], Database] = {}


def database(url: str) -> Database:
    """One Database per URL and process (a forked worker child must not reuse its parent's connections)."""
    key = (url, os.getpid())
    if key not in _databases:
        _databases[key] = Database(url)
    return _databases[key]


def close_database(url: str) -> None:
    """Dispose of this process's engine for ``url`` (tests do this before dropping a database)."""
    db = _databases.pop((url, os.getpid()), None)
    if db is not None:
        db.engine.dispose()


def ping(session: Session) -> None:
    """Raise when the database cannot answer."""
    session.execute(text("SELECT 1"))
