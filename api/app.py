"""The REST API (v1): ``create_app`` wires the routers (``api.routers``), the error handlers
(``api.errors``) and the typed dependencies (``api.deps``). Routes validate input, call ``jobs``, and
shape the answer (``api.views``).

Run with ``lomo serve`` or ``uvicorn --factory api.app:create_app``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from api import errors
from api.routers import estimates, files, health, jobs, models
from jobs.db import database
from jobs.settings import Settings, get_settings
from lomo_core import __version__


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.auto_migrate:
            from jobs.migrate import upgrade

            upgrade(settings.resolved_database_url())
        yield

    app = FastAPI(
        title="LOMO fine-tuning service", version=__version__, lifespan=lifespan,
        description="Full-parameter fine-tuning jobs with LOMO / AdaLomo. The job routes follow the shape "
                    "of OpenAI's fine-tuning API; metrics, memory and evals are this service's own.",
    )
    app.state.settings = settings
    app.state.db = database(settings.resolved_database_url())
    errors.install(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    for module in (health, files, jobs, estimates, models):
        app.include_router(module.router)
    return app
