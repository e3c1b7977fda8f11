"""One error shape for every answer that is not a success: ``{"error": {"message", "type", "code",
"param", "details"}}`` (OpenAI's, with ``details`` listing every problem and its field or line).

401 without a valid API key, 403 for a route of admins, 422 for input that is wrong (the field or the line
named), 404 for unknown ids (and another user's), 409 for a request that conflicts with a job's state,
413 for an upload over the limit, 415 for a body of the wrong kind, 429 over a quota (the limit, its
value and the use named), 503 (with Retry-After) while the database cannot be reached. Anything a
client sends gets one of these, not a 500; a 500 is a bug of ours and says only its exception's type.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from jobs import errors
from jobs.db import UNREACHABLE, is_unreachable

log = logging.getLogger("lomo.api")

#: the error answers a route declares in the OpenAPI document
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                                           422: {"model": ErrorResponse}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorResponse}}
FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {"model": ErrorResponse}}
OVER_QUOTA: dict[int | str, dict[str, Any]] = {429: {"model": ErrorResponse}}
UNSUPPORTED: dict[int | str, dict[str, Any]] = {415: {"model": ErrorResponse}}
TOO_LARGE: dict[int | str, dict[str, Any]] = {413: {"model": ErrorResponse}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   details: list[dict[str, Any]] | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"message": message, "type": kind, "code": code, "param": param, "details": details or []}
    return JSONResponse(status_code=status, content={"error": body})


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    whole_body = [e for e in exc.errors() if tuple(e.get("loc", ())) == ("body",)]
    if whole_body and kind and kind != "application/json" and not kind.endswith("+json"):
        return error_response(415, f"the request body must be JSON (Content-Type: application/json), not {kind[:80]}",
                              "unsupported_media_type")
    details = []
    for item in exc.errors():
        param = _param_of(tuple(item.get("loc", ())))
        message = item.get("msg", "invalid value").removeprefix("Value error, ")
        if item.get("type") == "json_invalid":
            param, message = None, f"the request body is not valid JSON: {item.get('ctx', {}).get('error', '')}"
        details.append({"param": param, "message": message})
    first = details[0] if details else {"param": None, "message": "invalid request"}
    text = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
    return error_response(422, text, "invalid_request", first["param"], details)


async def _invalid(_request: Request, exc: errors.InvalidRequest) -> JSONResponse:
    details = [{"param": p.param, "message": p.message, "line": p.line} for p in exc.problems]
    return error_response(422, str(exc), exc.code, exc.problems[0].param, details)


async def _not_found(_request: Request, exc: errors.NotFound) -> JSONResponse:
    return error_response(404, str(exc), f"{exc.kind}_not_found", "id")


async def _unauthorized(_request: Request, exc: errors.Unauthorized) -> JSONResponse:
    response = error_response(401, str(exc), exc.code)
    response.headers["www-authenticate"] = "Bearer"
    response.headers["x-should-retry"] = "false"
    return response


async def _forbidden(_request: Request, exc: errors.Forbidden) -> JSONResponse:
    response = error_response(403, str(exc), exc.code, exc.param, kind="permission_error")
    response.headers["x-should-retry"] = "false"
    return response


async def _unsupported(_request: Request, exc: errors.UnsupportedMediaType) -> JSONResponse:
    return error_response(415, str(exc), "unsupported_media_type", exc.param)


async def _over_quota(_request: Request, exc: errors.QuotaExceeded) -> JSONResponse:
    # Not to be retried by the SDK (it retries a 429 by default): the use falls only when jobs end or
    # files are deleted, and the message says which.
    response = error_response(429, str(exc), "quota_exceeded", exc.quota,
                              [{"param": exc.quota, "message": str(exc), "limit": exc.limit, "used": exc.used}],
                              kind="quota_error")
    response.headers["x-should-retry"] = "false"
    return response


async def _conflict(_request: Request, exc: errors.Conflict) -> JSONResponse:
    # The openai SDK retries a 409 on its own unless told not to: a state conflict does not pass by retrying.
    response = error_response(409, str(exc), exc.code)
    response.headers["x-should-retry"] = "false"
    return response


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), code)


async def _unreachable(request: Request, exc: Exception) -> JSONResponse:
    # A database restart or a lost connection: the client (the openai SDK included) tries again after a
    # moment; a job created with an Idempotency-Key is created once however often it is sent.
    if not is_unreachable(exc):  # a missing table, a bad statement: a bug (or a migration not applied)
        return await _internal(request, exc)
    log.warning("the database cannot be reached: %s", type(exc).__name__)
    response = error_response(503, "the service's database cannot be reached right now; try again in a few "
                                   "seconds", "database_unavailable", kind="server_error")
    response.headers["retry-after"] = "2"
    return response


def caller_of(request: Request) -> str:
    """The caller as logs name them: the user and the public id of their key, never the key."""
    user, key = getattr(request.state, "user", None), getattr(request.state, "key_id", None)
    return f"user {user} (key {key})" if user else "no authenticated caller"


async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug of ours, never client input
    log.exception("unhandled error in %s %s, %s", request.method, request.url.path, caller_of(request))
    return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                          "internal_error", kind="server_error")


async def _data_error(request: Request, exc: DataError) -> JSONResponse:
    # A value the database refuses (a NUL byte in text, a string over its column, a number out of range)
    # that validation let through: the client's input, so a 422, never a 500; logged to be bounded at
    # the field next time.
    log.warning("the database refused a value of %s %s from %s: %s", request.method, request.url.path,
                caller_of(request), str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__)
    return error_response(422, "a value of the request cannot be stored (too long, out of range, or with a NUL "
                               "byte)", "invalid_request")


class ControlCharactersInUrl:
    """ASGI middleware: a path or query string with a control character (NUL, a newline...) is answered
    422 at once; no id or parameter of this API has one, and the database refuses NUL in text."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            from urllib.parse import unquote

            raw = scope.get("path", "") + "?" + unquote(scope.get("query_string", b"").decode("latin-1"))
            if any(ord(c) < 32 or ord(c) == 127 for c in raw):
                response = error_response(422, "the URL holds a control character (NUL, a newline...): no id or "
                                               "parameter of this API has one", "invalid_request")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_middleware(ControlCharactersInUrl)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(errors.InvalidRequest, _invalid)
    app.add_exception_handler(errors.NotFound, _not_found)
    app.add_exception_handler(errors.Conflict, _conflict)
    app.add_exception_handler(errors.Unauthorized, _unauthorized)
    app.add_exception_handler(errors.Forbidden, _forbidden)
    app.add_exception_handler(errors.QuotaExceeded, _over_quota)
    app.add_exception_handler(errors.UnsupportedMediaType, _unsupported)
    app.add_exception_handler(StarletteHTTPException, _http)
    for unreachable in UNREACHABLE:
        app.add_exception_handler(unreachable, _unreachable)
    app.add_exception_handler(Exception, _internal)
