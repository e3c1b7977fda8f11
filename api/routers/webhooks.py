"""``/v1/webhook_endpoints``: a user's webhook endpoints, in OpenAI's shapes (the ``openai`` SDK's
``webhooks.create / retrieve / update / list / delete / rotate_secret / test`` work unmodified), and
each endpoint's deliveries (ours). Deliveries are signed the Standard Webhooks way (``jobs.webhooks``),
so ``openai.OpenAI().webhooks.unwrap(body, headers, secret=...)`` verifies them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerDep, SessionDep, SessionRoute, SettingsDep
from api.errors import ERRORS
from api.schemas import (
    WebhookDeliveryList,
    WebhookDeliveryObject,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointObject,
    WebhookEndpointWithSecret,
    WebhookTestResult,
)
from api.views import unix
from jobs import webhooks
from jobs.models import WebhookDelivery, WebhookEndpoint, new_id, utcnow
from jobs.schemas import Label

router = APIRouter(route_class=SessionRoute, prefix="/v1/webhook_endpoints", tags=["webhooks"])
EVENTS = ", ".join(webhooks.EVENT_TYPES)


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Label = Field(min_length=1, max_length=200)
    url: Label = Field(min_length=1, max_length=2000, description="http(s) URL that receives the deliveries")
    event_types: list[str] = Field(min_length=1, max_length=len(webhooks.EVENT_TYPES) * 2,
                                   description=f"of {EVENTS}")


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Label | None = Field(None, min_length=1, max_length=200)
    url: Label | None = Field(None, min_length=1, max_length=2000)
    event_types: list[str] | None = Field(None, min_length=1, max_length=len(webhooks.EVENT_TYPES) * 2)


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = False


class TestEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: str = Field(max_length=64, description=f"of {EVENTS}")


def endpoint_object(row: WebhookEndpoint, with_secret: bool = False) -> WebhookEndpointObject:
    fields = dict(id=row.id, name=row.name, url=row.url, event_types=list(row.event_types or []),
                  created_at=unix(row.created_at) or 0, updated_at=unix(row.updated_at),
                  signing_secret_hint=webhooks.secret_hint(row.secret))
    if with_secret:
        return WebhookEndpointWithSecret(**fields, signing_secret=row.secret)
    return WebhookEndpointObject(**fields)


def delivery_object(row: WebhookDelivery) -> WebhookDeliveryObject:
    return WebhookDeliveryObject(
        id=row.id, event_id=row.event_id, event_type=row.event_type, job_id=row.job_id, status=row.status,
        attempts=row.attempts, last_status_code=row.last_status_code, last_error=row.last_error,
        created_at=unix(row.created_at) or 0, delivered_at=unix(row.delivered_at),
        next_attempt_at=unix(row.next_attempt_at) if row.status == "pending" else None)


@router.post("", response_model=WebhookEndpointWithSecret, responses=ERRORS,
             summary="Register a webhook endpoint (its signing secret is shown this once)")
def create_endpoint(body: EndpointCreate, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    row = webhooks.create_endpoint(session, settings, caller.user_id, body.name, body.url, body.event_types)
    return endpoint_object(row, with_secret=True)


@router.get("", response_model=WebhookEndpointList, responses=ERRORS, summary="Your webhook endpoints, newest first")
def list_endpoints(session: SessionDep, caller: CallerDep,
                   after: str | None = Query(None, max_length=64,
                                             description="id of the last endpoint of the previous page"),
                   limit: int = Query(20, ge=1, le=100),
                   user: str | None = Query(None, max_length=200, description="admins: only this user's")) -> Any:
    rows, more = webhooks.list_endpoints(session, caller.listing(session, user), after, limit)
    data = [endpoint_object(r) for r in rows]
    return WebhookEndpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None)


@router.get("/{endpoint_id}", response_model=WebhookEndpointObject, responses=ERRORS)
def get_endpoint(endpoint_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return endpoint_object(webhooks.get_endpoint(session, caller.scope, endpoint_id))


@router.post("/{endpoint_id}", response_model=WebhookEndpointObject, responses=ERRORS,
             summary="Change an endpoint's name, URL or event types")
def update_endpoint(endpoint_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep,
                    body: EndpointUpdate | None = None) -> Any:
    body = body or EndpointUpdate()
    row = webhooks.update_endpoint(session, settings, caller.scope, endpoint_id, body.name, body.url,
                                   body.event_types)
    return endpoint_object(row)


@router.delete("/{endpoint_id}", response_model=WebhookEndpointDeleted, responses=ERRORS,
               summary="Delete an endpoint: it gets nothing more, its pending deliveries are dropped")
def delete_endpoint(endpoint_id: str, session: SessionDep, caller: CallerDep) -> Any:
    return WebhookEndpointDeleted(id=webhooks.delete_endpoint(session, caller.scope, endpoint_id).id)


@router.post("/{endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret, responses=ERRORS,
             summary="A new signing secret; the old one signs too for 24 hours if asked")
def rotate_secret(endpoint_id: str, session: SessionDep, caller: CallerDep,
                  body: RotateSecret | None = None) -> Any:
    row = webhooks.rotate_secret(session, caller.scope, endpoint_id,
                                 (body or RotateSecret()).keep_old_secret_active_for_24_hours)
    return endpoint_object(row, with_secret=True)


@router.post("/{endpoint_id}/test", response_model=WebhookTestResult, responses=ERRORS,
             summary="Send a sample event now (signed like a real one) and say what the receiver answered")
def test_endpoint(endpoint_id: str, body: Annotated[TestEvent, Body()], session: SessionDep, settings: SettingsDep,
                  caller: CallerDep) -> Any:
    from jobs.errors import InvalidRequest, Problem

    row = webhooks.get_endpoint(session, caller.scope, endpoint_id)
    if body.event_type not in webhooks.EVENT_TYPES:
        raise InvalidRequest([Problem("event_type", f"{body.event_type!r} is not one of {EVENTS}")])
    message = webhooks.event_body(new_id("evt"), body.event_type, "ftjob-test", utcnow())
    result = webhooks.post(settings, row, new_id("msg"), message)
    return WebhookTestResult(webhook_endpoint_id=row.id, event_type=body.event_type,
                             status_code=result.status_code or 0, error=result.error)


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryList, responses=ERRORS,
            summary="An endpoint's deliveries, newest first: status, attempts, the receiver's last answer")
def list_deliveries(endpoint_id: str, session: SessionDep, caller: CallerDep,
                    after: str | None = Query(None, max_length=64), limit: int = Query(20, ge=1, le=100)) -> Any:
    rows, more = webhooks.list_deliveries(session, caller.scope, endpoint_id, after, limit)
    return WebhookDeliveryList(data=[delivery_object(r) for r in rows], has_more=more)
