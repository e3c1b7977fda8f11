"""``/health``: the database answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SessionDep, SettingsDep
from jobs.db import ping
from lomo_core import __version__

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    ping(session)
    return {"status": "ok", "version": __version__, "embedded": settings.embedded}
