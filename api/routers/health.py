"""Probes: ``/health`` (the database answers; kept for existing checks), ``/healthz`` (the process is
alive, nothing else is asked) and ``/readyz`` (the database, the migrations, the broker and a recent
worker, each named when it fails: 503). None needs a key; none says where the parts are."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import DatabaseDep, SessionDep, SessionRoute, SettingsDep
from jobs import readiness
from jobs.db import ping
from lomo_core import __version__

router = APIRouter(route_class=SessionRoute, tags=["health"])


@router.get("/health")
def health(session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    ping(session)
    return {"status": "ok", "version": __version__, "embedded": settings.embedded}


@router.get("/healthz", summary="Liveness: the API process answers (it asks nothing of the database)")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: the database, its migrations, the broker and a recent worker",
            responses={503: {"description": "a check failed; the body names it"}})
async def readyz(db: DatabaseDep, settings: SettingsDep) -> JSONResponse:
    found = await run_in_threadpool(readiness.checks, db, settings)
    ok = all(check.ok for check in found)
    return JSONResponse(status_code=200 if ok else 503,
                        content={"status": "ready" if ok else "not_ready", "version": __version__,
                                 "checks": {check.name: check.as_dict() for check in found}})
