"""What is noted of each request: its id (the client's ``X-Request-Id`` when it is a plain one, else a new
one, sent back in the answer's ``X-Request-Id``) as the context of the log lines and job events made while
it is served (``jobs.logs``); its count and latency by route (``api.metrics``); and one access line
(``lomo.access``: method, route, status, milliseconds, and the caller by user and key id, never the key)."""

from __future__ import annotations

import logging
import time

from api import metrics
from jobs import logs

log = logging.getLogger("lomo.access")


class RequestObserver:
    """ASGI middleware: each request's log context, ``X-Request-Id`` answer header, figures and access line."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = logs.request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler is answered 500 by the server

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        with logs.context(request_id=request_id) as context:
            try:
                await self.app(scope, receive, sending)
            finally:
                seconds = time.perf_counter() - started
                route = metrics.route_of(scope)
                metrics.observe(scope["method"], route, status, seconds)
                state = scope.get("state") or {}
                log.info("%s %s %d %.1f ms %s", scope["method"], route, status, seconds * 1000,
                         f"user {context.get('user')} (key {state.get('key_id')})" if context.get("user")
                         else "no authenticated caller")
