"""``/v1/estimates``: what a job would need (memory per device, GPU count), without creating it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CallerDep, SessionDep, SessionRoute, SettingsDep
from api.errors import ERRORS
from jobs import admission
from jobs.schemas import JobCreate

router = APIRouter(route_class=SessionRoute, prefix="/v1/estimates", tags=["estimates"])


@router.post("", responses=ERRORS,
             summary="Predicted memory per device of a job (same body as a job), the GPU count and whether it fits")
def estimate(body: JobCreate, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> dict[str, Any]:
    return {"object": "estimate", **admission.estimate_job(session, settings, caller.user_id, body)}
