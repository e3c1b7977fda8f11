"""Typed dependencies of the routes: the settings, a database session, and who is calling (the user of
the request's API key; see ``jobs.users``).

The session is a transaction per request, committed when the route returns (before the response is
sent, so a failed commit is the client's error answer, not a lost write) and rolled back on an error.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from jobs import logs
from jobs.db import Database
from jobs.errors import Forbidden, InvalidRequest, NotFound, Problem, Unauthorized
from jobs.settings import Settings

log = logging.getLogger("lomo.api")


# ``async``: FastAPI runs a plain function dependency in its thread pool, a hop each; these only read state
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.db


async def get_session(db: Annotated[Database, Depends(get_database)]) -> AsyncIterator[Session]:
    """The request's session (see the module's docstring). Made on the event loop (a Session connects only
    when first used); a route of ``SessionRoute`` ends its transaction in its own thread, so what is left
    here is closing a session that holds no connection. Were one still open (a route of another kind),
    it is ended in the thread pool."""
    session = db.sessions()
    try:
        yield session
    except BaseException:
        await _finish(session, False)
        raise
    await _finish(session, True)


async def _finish(session: Session, commit: bool) -> None:
    if session.in_transaction():
        await run_in_threadpool(_end, session, commit)
    else:
        session.close()


def _end(session: Session, commit: bool, close: bool = True) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        if close:
            session.close()


class SessionRoute(APIRoute):
    """The routes of this API: a plain-function route commits its request's session (or rolls it back, on
    an error) in its own thread, before it returns.

    FastAPI runs plain functions in a pool of 40 threads and ends a dependency's session in another trip
    to that pool; a request that held its database connection while it waited for that trip could, under
    load, wait forever: every thread waiting for a connection, every connection held by a request waiting
    for a thread. So no request holds a connection while it waits for a thread: the caller's lookup
    (``get_caller``) ends its transaction too."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _ending_transactions(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _ending_transactions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # FastAPI reads the parameters of the function it wraps
    def call(*args: Any, **kwargs: Any) -> Any:
        sessions = [value for value in kwargs.values() if isinstance(value, Session)]
        try:
            result = endpoint(*args, **kwargs)
        except BaseException:
            for session in sessions:
                _end(session, False, close=False)
            raise
        for session in sessions:
            _end(session, True, close=False)
        return result

    return call


@dataclass(frozen=True)
class Caller:
    """Who sends the request: the owner of what it creates and the only one who sees it (or an admin, who
    sees and acts on every user's)."""

    user_id: str
    is_admin: bool = False
    key_id: str | None = None  # the public id of the key the request came with (logs name the caller by it)

    @property
    def scope(self) -> str | None:
        """Whose rows the request may read and act on, as the jobs layer takes it: the caller's own, or
        every user's (None) for an admin."""
        return None if self.is_admin else self.user_id

    def __str__(self) -> str:
        return f"user {self.user_id} (key {self.key_id})"

    def listing(self, session: Session, user: str | None) -> str | None:
        """Whose rows a list shows: an admin's lists show every user's, or those of ``user`` (a name or
        an id); a user's lists show their own, and ``user`` may only name themselves."""
        if user is None:
            return self.scope
        from jobs import users

        try:
            found = users.get_user(session, user).id
        except NotFound:
            found = None
        if self.is_admin:
            if found is None:
                raise InvalidRequest([Problem("user", f"no user named {user[:100]!r}")])
            return found
        if found != self.user_id:
            raise Forbidden("only admins list other users' objects; leave out 'user' for your own",
                            param="user")
        return self.user_id


#: the cookie that holds a portal session's token (``api.portal``)
SESSION_COOKIE = "lomo_session"
#: methods that change nothing: a cookie-authenticated request with any other must come from the portal's own pages
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_caller(request: Request, session: Annotated[Session, Depends(get_session, scope="function")]) -> Caller:
    """The user of the request's API key (``Authorization: Bearer <key>``, as the openai SDK sends it), or
    of the portal session in its cookie (the portal's pages and their scripts); none, or one that
    authenticates no one, is a 401.

    It reads in the request's own session (the route's ``SessionDep``) and ends the transaction (keeping
    the key's noted use whatever the route does): the connection goes back to the pool before the trip to
    the route's thread (see ``SessionRoute``)."""
    from jobs import users

    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            return session_caller(request, session, token)
        raise Unauthorized("no API key: send it as 'Authorization: Bearer <key>' (the openai SDK's api_key; the "
                           "lomo CLI's --api-key or LOMO_API_KEY)", code="missing_api_key")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    found = users.authenticate(session, presented.strip())
    if found is None:
        key_id = users.key_id_of(presented.strip())
        log.info("refused API key %s", key_id or "(not one of this service's)")
        raise Unauthorized("the API key is not valid: unknown, revoked, or of a disabled user")
    return _caller(request, session, *found)


def _caller(request: Request, session: Session, user, key) -> Caller:
    session.commit()
    request.state.key_id, request.state.user = key.id, user.name  # what logs name the caller by
    logs.note(user=user.name)
    return Caller(user.id, bool(user.is_admin), key.id)


def same_origin(request: Request) -> bool:
    """Whether the request was sent by a page of this service (its ``Origin``, or else its ``Referer``, is
    this host, or the ``public_url`` a proxy serves it at): a cookie goes with every request to the host,
    so a change made on a session's authority must come from the portal itself, never from another site's
    form or script."""
    from urllib.parse import urlsplit

    own = {request.headers.get("host", "")}
    public = request.app.state.settings.public_url  # behind a proxy that passes another Host
    if public:
        own.add(urlsplit(public).netloc)
    sent_from = request.headers.get("origin") or request.headers.get("referer") or ""
    parts = urlsplit(sent_from)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc in own


def session_caller(request: Request, session: Session, token: str) -> Caller:
    """The user of a portal session (its cookie's token); an ended one is a 401, and a change sent from
    another site is refused (403) before anything is read."""
    from jobs import portal_sessions

    if request.method not in SAFE_METHODS and not same_origin(request):
        raise Forbidden("a change made with a portal session must come from the portal's own pages "
                        "(this request's Origin is another site); scripts send an API key instead")
    found = portal_sessions.authenticate(session, token)
    if found is None:
        raise Unauthorized("the portal session has ended: sign in again", code="session_ended")
    return _caller(request, session, *found)


def get_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    """The caller of an admin's route (``/v1/admin/...``): a user's key is a 403."""
    if not caller.is_admin:
        raise Forbidden("this route is for admins (lomo users create NAME --admin)")
    return caller


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]
