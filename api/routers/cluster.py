"""``/v1/cluster``: the lab's nodes and who holds their GPUs, the queue in the order it runs, and a timeline of
GPU leases (``jobs.cluster``), for every authenticated caller; only admins see other users' job ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query

from api.cluster_schemas import ClusterObject
from api.deps import CallerDep, SessionDep, SessionRoute, SettingsDep
from api.errors import ERRORS
from api.views import unix
from jobs.cluster import cluster_view

router = APIRouter(route_class=SessionRoute, prefix="/v1", tags=["cluster"])

#: the longest lease timeline one may ask for: a month
MAX_HOURS = 24 * 31


@router.get("/cluster", response_model=ClusterObject, responses=ERRORS,
            summary="The nodes and who holds their GPUs, the queue in order, and the recent GPU leases")
def get_cluster(session: SessionDep, settings: SettingsDep, caller: CallerDep,
                hours: float = Query(24.0, gt=0, le=MAX_HOURS,
                                     description="the window of the lease timeline, in hours")) -> Any:
    view = cluster_view(session, settings, caller.scope, hours, me=caller.user_id)
    return ClusterObject.model_validate(_unix_times(view))


def _unix_times(value: Any) -> Any:
    """``value`` with every datetime in it as unix seconds."""
    if isinstance(value, datetime):
        return unix(value)
    if isinstance(value, dict):
        return {key: _unix_times(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unix_times(item) for item in value]
    return value
