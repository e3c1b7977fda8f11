"""Each request's database session (``api.deps``): no request holds a connection while it waits for one of
the thread pool's 40 threads, so more requests at once than threads, against fewer connections than
requests, all get their answers instead of waiting for each other until the pool gives up; and every route
of the app ends its transaction in its own thread (``SessionRoute``)."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi.routing import APIRoute

from api.app import create_app
from api.deps import SessionRoute
from jobs.db import close_database
from jobs.settings import Settings
from tests.conftest import admin_key, create_postgres_database, drop_postgres_database
from tests.e2e.live_service import api_in_thread


def api_routes(routes) -> list[APIRoute]:
    """The app's API routes, those of included routers too (FastAPI keeps those as the routers)."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += api_routes(route.original_router.routes)
    return found


def test_every_route_of_the_app_ends_its_transactions_in_its_own_thread(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "var", device="cpu"))
    routes = api_routes(app.routes)
    assert len(routes) > 40
    assert [route.path for route in routes if not isinstance(route, SessionRoute)] == []


def test_more_requests_than_threads_share_one_connection_and_all_are_answered(tmp_path):
    database_url = create_postgres_database()
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, device="cpu",
                        db_pool_size=1, db_max_overflow=0)  # one connection for the whole API
    try:
        with api_in_thread(settings) as url:
            auth = {"Authorization": f"Bearer {admin_key(settings)}"}

            async def clients() -> list[int]:
                limits = httpx.Limits(max_connections=120, max_keepalive_connections=120)
                async with httpx.AsyncClient(base_url=url, headers=auth, timeout=25, limits=limits) as c:
                    paths = ["/v1/fine_tuning/jobs", "/v1/files", "/v1/me", "/v1/cluster"] * 30  # 120 at once
                    answers = await asyncio.gather(*(c.get(path) for path in paths), return_exceptions=True)
                return [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]

            started = time.monotonic()
            statuses = asyncio.run(clients())
            took = time.monotonic() - started
        # Were a connection held across a wait for a thread, the 40 threads would all wait for it while
        # its request waited for a thread, until the pool's 30 s timeout answered them with errors.
        assert statuses == [200] * 120, {s for s in statuses if s != 200}
        assert took < 20, f"{took:.1f} s for 120 requests"
    finally:
        close_database(database_url)
        drop_postgres_database(database_url)
