"""Typed dependencies of the routes: the settings, a database session, and who is calling.

The session is a transaction per request, committed when the route returns (before the response is
sent, so a failed commit is the client's error answer, not a lost write) and rolled back on an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from jobs.db import Database
from jobs.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.db


def get_session(db: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    with db.session() as session:
        yield session


@dataclass(frozen=True)
class Caller:
    """Who sends the request: the owner of what it creates and the only one who sees it."""

    user_id: str
    is_admin: bool = False


def get_caller(settings: Annotated[Settings, Depends(get_settings)]) -> Caller:
    # No authentication yet: every request is the deployment's local user.
    return Caller(settings.default_user)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
CallerDep = Annotated[Caller, Depends(get_caller)]
