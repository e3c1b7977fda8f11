"""The REST API (v1): ``create_app`` wires the routers (``api.routers``), the error handlers
(``api.errors``) and the typed dependencies (``api.deps``). Routes validate input, call ``jobs``, and
shape the answer (``api.views``).

Run with ``lomo serve`` or ``uvicorn --factory api.app:create_app``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, metrics, portal
from api.access import RequestObserver
from api.routers import admin, cluster, estimates, files, health, jobs, models, webhooks
from jobs import logs
from jobs.settings import Settings, get_settings
from lomo_core import __version__

log = logging.getLogger("lomo.api")


def bootstrap_admin_key(settings: Settings, db) -> None:
    """At the first start (no API key exists yet): the local user becomes an admin, and its new key is
    written to ``settings.admin_key_file``, readable by its owner only (``make demo``, the CLI on this
    machine and the tests read it there). Nothing is ever open without a key."""
    import os

    from jobs.users import bootstrap_admin

    with db.session() as session:
        made = bootstrap_admin(session, settings.default_user)
    if made is None:
        return
    path = settings.admin_key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(made.secret + "\n")
    os.chmod(path, 0o600)
    log.warning("first start: user %r is the admin; its API key (%s) is in %s (readable by its owner only)",
                settings.default_user, made.key.id, path.resolve())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_format)  # each API process's lines as JSON when asked (a no-op for text)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.auto_migrate:
            from jobs.migrate import upgrade

            upgrade(settings.resolved_database_url())
        bootstrap_admin_key(settings, app.state.db)
        yield

    app = FastAPI(
        title="LOMO fine-tuning service", version=__version__, lifespan=lifespan,
        description="Full-parameter fine-tuning jobs with LOMO / AdaLomo. The job routes follow the shape "
                    "of OpenAI's fine-tuning API; metrics, memory and evals are this service's own.",
    )
    app.state.settings = settings
    app.state.db = settings.api_database()
    errors.install(app)
    app.add_middleware(RequestObserver)

    for module in (health, files, jobs, estimates, models, webhooks, admin, cluster):
        app.include_router(module.router)
    app.include_router(admin.me)
    app.include_router(metrics.router)
    portal.install(app)
    return app
