"""Signing in to the portal with an API key, and out again; who a page's request comes from.

A sign-in exchanges the key for a portal session (``jobs.portal_sessions``): the browser keeps the
session's random token in an http-only, SameSite=Lax cookie (``Secure`` over HTTPS and on this host's
loopback), never the key itself, so no script of a page can read it. Lax lets a link from elsewhere (a
chat, a webhook's message) open a page signed in; changes made on a session's authority must come from
the portal's own pages whatever the cookie does (``api.deps.same_origin``).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from api.deps import (
    SESSION_COOKIE,
    Caller,
    DatabaseDep,
    SessionDep,
    SessionRoute,
    SettingsDep,
    same_origin,
    session_caller,
)
from api.portal.render import render
from jobs import portal_sessions
from jobs.errors import Unauthorized

log = logging.getLogger("lomo.portal")
router = APIRouter(route_class=SessionRoute, include_in_schema=False)


class SignInRequired(Exception):
    """A page was asked for without a live portal session: the answer is the sign-in page."""


def page_caller(request: Request, session: SessionDep) -> Caller:
    """The signed-in user of a page's request; without a session (or with one that ended) the browser is
    sent to the sign-in page."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise SignInRequired
    try:
        return session_caller(request, session, token)
    except Unauthorized:
        raise SignInRequired from None


PageCaller = Annotated[Caller, Depends(page_caller)]


def _came_from(request: Request) -> str | None:
    """The page to come back to after signing in: this page; for htmx's requests (a fragment, an estimate),
    the page they were made from (``HX-Current-URL``)."""
    if request.headers.get("hx-request"):
        parts = urlsplit(request.headers.get("hx-current-url", ""))
        return parts.path + (f"?{parts.query}" if parts.query else "") if parts.path else None
    if request.method == "GET":
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return None


def sign_in_redirect(request: Request) -> Response:
    """The answer to a page request without a live session: to the sign-in page, coming back after (an
    htmx request of a page left open is told to load the sign-in page instead of swapping it in). A cookie
    is dropped only when it was sent and is no longer valid."""
    target = "/signin"
    back = _came_from(request)
    if back and _local_path(back) == back and urlsplit(back).path not in ("/", "/signin"):
        target += "?next=" + quote(back, safe="")
    if request.headers.get("hx-request"):
        response: Response = Response(status_code=204, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _local_path(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never ``//host`` or a URL elsewhere)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    return target


def _secure(request: Request, settings) -> bool:
    if settings.portal_secure_cookie is not None:
        return settings.portal_secure_cookie
    if settings.public_url:
        return settings.public_url.startswith("https://")
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/signin")
def sign_in_page(request: Request, next: str | None = None):  # noqa: A002 - the query parameter's name
    return render(request, "signin.html", None, next=_local_path(next))


@router.post("/signin")
def sign_in(request: Request, db: DatabaseDep, settings: SettingsDep,
            key: Annotated[str, Form(max_length=500)] = "", next: Annotated[str, Form(max_length=2000)] = "/jobs"):
    if not same_origin(request):
        return render(request, "signin.html", None, status_code=403, next=_local_path(next),
                      error="sign in from this service's own sign-in page")
    with db.session() as session:
        portal_sessions.sign_out(session, request.cookies.get(SESSION_COOKIE))  # a new sign-in ends the old one
        made = portal_sessions.sign_in(session, key.strip(), settings.portal_session_hours)
    if made is None:
        log.info("portal sign-in refused")
        return render(request, "signin.html", None, status_code=401, next=_local_path(next),
                      error="This API key is not valid: unknown, revoked, or of a disabled user.")
    token, user = made
    log.info("portal sign-in of user %s", user.name)
    response = RedirectResponse(_local_path(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(settings.portal_session_hours * 3600), path="/",
                        httponly=True, samesite="lax", secure=_secure(request, settings))
    return response


@router.post("/signout")
def sign_out(request: Request, db: DatabaseDep):
    if not same_origin(request):  # another site cannot sign a user out either
        return RedirectResponse("/jobs", status_code=303)
    with db.session() as session:
        portal_sessions.sign_out(session, request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
