"""``GET /metrics``: the service's figures in Prometheus' text format. Prometheus sends, as a bearer token
(``authorization: {type: Bearer, credentials_file: ...}`` in its scrape config), either the deployment's
``LOMO_METRICS_TOKEN``, checked without the database so that a scrape still answers (``lomo_database_up 0``)
while the database is down, or an admin's API key.

Two sources. The jobs, queue, GPUs, nodes, outcomes, tokens, recoveries and deliveries come from the
database (``jobs.metrics``), so they are the same whichever API process answers and count what every worker
did. The API's own requests (counts by route and status, latency histograms) are counted in the process
that served them; with several API processes (``lomo serve --workers N``) each writes its figures to a
shared folder and any of them answers for all (prometheus-client's multiprocess mode:
``PROMETHEUS_MULTIPROC_DIR``, which ``lomo serve`` sets to ``data_dir/prometheus`` and empties at start).
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from api.deps import DatabaseDep, SessionRoute, get_admin, get_caller
from jobs.metrics import ServiceCollector

router = APIRouter(route_class=SessionRoute, tags=["operations"])

#: the folder of multiprocess mode, when several API processes serve
MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
#: request latencies: a millisecond to ten seconds (a job read is expected in tens of milliseconds)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_requests = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("lomo_http_requests", "API requests by method, route and status",
                   ["method", "route", "status"], registry=_requests)
LATENCY = Histogram("lomo_http_request_duration_seconds", "API request latency by method and route, to the end "
                    "of the response", ["method", "route"], buckets=LATENCY_BUCKETS, registry=_requests)


def route_of(scope: dict[str, Any]) -> str:
    """The route's template (``/v1/fine_tuning/jobs/{job_id}``), never the raw path: ids and unknown paths
    would make a new series each."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    return "/static" if scope.get("path", "").startswith("/static/") else "unmatched"


def observe(method: str, route: str, status: int, seconds: float) -> None:
    """Count one request served (``api.access.RequestObserver`` calls it for each)."""
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


def _request_figures() -> bytes:
    if os.environ.get(MULTIPROC):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(_requests)


def scraper(request: Request, db: DatabaseDep) -> None:
    """The metrics token (no database needed), or else an admin's key (401 / 403 as for any admin route)."""
    token = request.app.state.settings.metrics_token
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
        return
    with db.session() as session:
        get_admin(get_caller(request, session))


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
            dependencies=[Depends(scraper)],
            summary="The service's figures for Prometheus (the metrics token, or an admin's key)")
def metrics(request: Request) -> Response:
    service = CollectorRegistry()
    service.register(ServiceCollector(request.app.state.db, request.app.state.settings))
    return Response(_request_figures() + generate_latest(service), media_type=CONTENT_TYPE_LATEST)
