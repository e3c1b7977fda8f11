"""Webhooks: job events POSTed to the users' endpoints, signed the Standard Webhooks way (as OpenAI's
fine-tuning webhooks are, so ``openai.OpenAI().webhooks.unwrap()`` verifies ours).

- An endpoint (``webhook_endpoint``, OpenAI's shape) has a URL, the event types it wants and a secret
  ``whsec_<base64 of 32 random bytes>``. Only http(s) URLs; hosts on loopback, link-local or private
  addresses are refused (when registered, and again when delivered to, against DNS that changed its
  mind) unless ``LOMO_WEBHOOK_ALLOW_PRIVATE``.
- When a job ends (``succeeded``, ``failed``, ``cancelled``) or pauses, ``job_ended`` writes one delivery
  per subscribed endpoint of the job's owner in the same transaction (an outbox: a crash or a receiver
  that is down loses no event). The body is OpenAI's event: ``{"id": "evt_...", "object": "event",
  "created_at", "type": "fine_tuning.job.succeeded", "data": {"id": "<job id>"}}``.
- A Celery task (``lomo.deliver_webhook``, on the ``<queue>.webhooks`` queue) makes one attempt
  (``attempt``): headers ``webhook-id`` (the delivery's id, the same for every attempt), ``webhook-timestamp``
  (the attempt's) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``; one per
  active secret). A 2xx delivers it; anything else is tried again with exponential backoff for a
  bounded time (settings ``webhook_retry_*``), then the delivery is marked failed. Every attempt is
  recorded (status code, error, attempts). The workers' watch sends the task for deliveries that are due,
  so a lost message delays a delivery, never loses it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from jobs.errors import InvalidRequest, NotFound, Problem
from jobs.models import Job, WebhookDelivery, WebhookEndpoint, aware, new_id, owned, utcnow
from jobs.settings import Settings

log = logging.getLogger("lomo.webhooks")

#: the events this service sends (``paused`` is ours: OpenAI's jobs do not pause)
EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled",
               "fine_tuning.job.paused")
#: a delivery is held by the attempt that took it for this long (then another may take it)
LEASE_S = 120.0
MAX_ENDPOINTS = 20  # per user


# ---------------------------------------------------------------------------------------------- endpoints
def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    return f"whsec_...{secret[-4:]}"


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_unspecified or ip.is_multicast \
        or ip.is_reserved


def url_problem(url: str, allow_private: bool) -> str | None:
    """Why ``url`` cannot be an endpoint, or None: not http(s), no host, credentials in it, or (unless
    ``allow_private``) a host that is or resolves to a loopback, link-local or private address."""
    return target(url, allow_private)[0]


def target(url: str, allow_private: bool) -> tuple[str | None, str | None]:
    """(why ``url`` cannot be delivered to, or None; the address to connect to, resolved once and checked,
    or None to let the HTTP client resolve the host: with ``allow_private``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a URL: {e}", None
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL", None
    if not parts.hostname:
        return "has no host", None
    if parts.username or parts.password:
        return "must not carry credentials (user:password@); authenticate deliveries by their signature", None
    if allow_private:
        return None, None
    host = parts.hostname
    try:
        addresses = [host] if _is_ip(host) else [info[4][0] for info in socket.getaddrinfo(
            host, port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)]
    except (socket.gaierror, UnicodeError) as e:
        return f"the host {host!r} cannot be resolved ({e})", None
    if not addresses or host.lower() in ("localhost", "localhost.localdomain") or any(_private(a) for a in addresses):
        return (f"the host {host!r} is a loopback, link-local or private address; this deployment delivers "
                "only to public addresses (an admin allows others with LOMO_WEBHOOK_ALLOW_PRIVATE)"), None
    return None, addresses[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _checked(settings: Settings, name: str | None, url: str | None, event_types: list[str] | None) -> None:
    problems = []
    if url is not None:
        why = url_problem(url, settings.webhook_allow_private)
        if why:
            problems.append(Problem("url", why))
    if event_types is not None:
        if not event_types:
            problems.append(Problem("event_types", f"name at least one of {', '.join(EVENT_TYPES)}"))
        for i, kind in enumerate(event_types):
            if kind not in EVENT_TYPES:
                problems.append(Problem(f"event_types.{i}", f"{kind[:80]!r} is not an event this service sends; "
                                                           f"it sends {', '.join(EVENT_TYPES)}"))
    if name is not None and not name.strip():
        problems.append(Problem("name", "must not be empty"))
    if problems:
        raise InvalidRequest(problems)


def create_endpoint(session: Session, settings: Settings, owner: str, name: str, url: str,
                    event_types: list[str]) -> WebhookEndpoint:
    _checked(settings, name, url, event_types)
    count = session.query(WebhookEndpoint).filter(WebhookEndpoint.owner_id == owner,
                                                  WebhookEndpoint.deleted_at.is_(None)).count()
    if count >= MAX_ENDPOINTS:
        raise InvalidRequest([Problem("url", f"you have {count} webhook endpoints, the most a user may have; "
                                             "delete one first")])
    now = utcnow()
    row = WebhookEndpoint(id=new_id("whep"), owner_id=owner, name=name, url=url, event_types=list(dict.fromkeys(
        event_types)), secret=new_secret(), created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    return row


def get_endpoint(session: Session, owner: str | None, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.deleted_at is not None or not owned(row.owner_id, owner):
        raise NotFound("webhook_endpoint", endpoint_id)
    return row


def list_endpoints(session: Session, owner: str | None, after: str | None = None,
                   limit: int = 20) -> tuple[list[WebhookEndpoint], bool]:
    """Newest first; ``after`` is the id of the last endpoint of the previous page."""
    query = select(WebhookEndpoint).where(WebhookEndpoint.deleted_at.is_(None))
    if owner is not None:
        query = query.where(WebhookEndpoint.owner_id == owner)
    if after is not None:
        try:
            cursor = get_endpoint(session, owner, after)
        except NotFound:
            raise InvalidRequest([Problem("after", f"no webhook endpoint with id {after!r}")]) from None
        query = query.where(or_(WebhookEndpoint.created_at < cursor.created_at,
                                (WebhookEndpoint.created_at == cursor.created_at) & (WebhookEndpoint.id < cursor.id)))
    rows = list(session.scalars(query.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def update_endpoint(session: Session, settings: Settings, owner: str | None, endpoint_id: str,
                    name: str | None = None, url: str | None = None,
                    event_types: list[str] | None = None) -> WebhookEndpoint:
    row = get_endpoint(session, owner, endpoint_id)
    _checked(settings, name, url, event_types)
    changed = False
    for field, value in (("name", name), ("url", url),
                         ("event_types", list(dict.fromkeys(event_types)) if event_types is not None else None)):
        if value is not None and getattr(row, field) != value:
            setattr(row, field, value)
            changed = True
    if changed:
        row.updated_at = utcnow()
    return row


def delete_endpoint(session: Session, owner: str | None, endpoint_id: str) -> WebhookEndpoint:
    """The endpoint gets nothing more: its pending deliveries are dropped (marked failed)."""
    row = get_endpoint(session, owner, endpoint_id)
    row.deleted_at = utcnow()
    session.execute(update(WebhookDelivery).where(WebhookDelivery.endpoint_id == row.id,
                                                  WebhookDelivery.status == "pending")
                    .values(status="failed", last_error="the endpoint was deleted"))
    return row


def rotate_secret(session: Session, owner: str | None, endpoint_id: str,
                  keep_old_for_24_hours: bool) -> WebhookEndpoint:
    row = get_endpoint(session, owner, endpoint_id)
    now = utcnow()
    row.previous_secret = row.secret if keep_old_for_24_hours else None
    row.previous_secret_until = now + timedelta(hours=24) if keep_old_for_24_hours else None
    row.secret, row.updated_at = new_secret(), now
    return row


def list_deliveries(session: Session, owner: str | None, endpoint_id: str, after: str | None = None,
                    limit: int = 20) -> tuple[list[WebhookDelivery], bool]:
    """An endpoint's deliveries, newest first."""
    get_endpoint(session, owner, endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if after is not None:
        cursor = session.get(WebhookDelivery, after)
        if cursor is None or cursor.endpoint_id != endpoint_id:
            raise InvalidRequest([Problem("after", f"no delivery with id {after!r}")])
        query = query.where(or_(WebhookDelivery.created_at < cursor.created_at,
                                (WebhookDelivery.created_at == cursor.created_at) & (WebhookDelivery.id < cursor.id)))
    rows = list(session.scalars(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# ---------------------------------------------------------------------------------------------- events
def event_body(event_id: str, event_type: str, job_id: str, at: datetime) -> str:
    return json.dumps({"id": event_id, "object": "event", "created_at": int(at.timestamp()), "type": event_type,
                       "data": {"id": job_id}}, separators=(",", ":"))


def job_ended(session: Session, job_id: str, status: str) -> list[str]:
    """Write the deliveries of a job's end (or pause) for its owner's subscribed endpoints, in the
    caller's transaction; their ids. Other statuses send nothing."""
    kind = f"fine_tuning.job.{status}"
    if kind not in EVENT_TYPES:
        return []
    owner = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    endpoints = [e for e in session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.owner_id == owner, WebhookEndpoint.deleted_at.is_(None))) if kind in (e.event_types or [])]
    if not endpoints:
        return []
    now = utcnow()
    event_id = new_id("evt")
    body = event_body(event_id, kind, job_id, now)
    rows = [WebhookDelivery(id=new_id("msg"), endpoint_id=e.id, event_id=event_id, event_type=kind, job_id=job_id,
                            body=body, status="pending", attempts=0, next_attempt_at=now, created_at=now)
            for e in endpoints]
    session.add_all(rows)
    return [r.id for r in rows]


def signatures(endpoint: WebhookEndpoint, message_id: str, timestamp: int, body: str,
               now: datetime | None = None) -> str:
    """The ``webhook-signature`` header: ``v1,<signature>`` by the current secret, and by the previous one
    while it is kept active after a rotation, separated by a space."""
    now = now or utcnow()
    keys = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_secret_until and aware(endpoint.previous_secret_until) > now:
        keys.append(endpoint.previous_secret)
    return " ".join(f"v1,{sign(key, message_id, timestamp, body)}" for key in keys)


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# ---------------------------------------------------------------------------------------------- delivery
@dataclass
class Result:
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(settings: Settings, endpoint: WebhookEndpoint, message_id: str, body: str) -> Result:
    """One signed POST of ``body`` to the endpoint (no redirects followed). Unless private addresses are
    allowed, the host is resolved once, checked, and that address is the one connected to (the Host
    header and, for https, the TLS server name and certificate check keep the host's name), so a DNS
    answer that changes between the check and the connection cannot lead the delivery inside."""
    import httpx

    why, address = target(endpoint.url, settings.webhook_allow_private)
    if why:
        return Result(None, f"url: {why}")
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "lomo-webhooks/1", "webhook-id": message_id,
               "webhook-timestamp": str(timestamp),
               "webhook-signature": signatures(endpoint, message_id, timestamp, body)}
    url, extensions = endpoint.url, {}
    if address is not None:
        parts = urlsplit(endpoint.url)
        pinned = f"[{address}]" if ":" in address else address
        url = parts._replace(netloc=pinned + (f":{parts.port}" if parts.port else "")).geturl()
        headers["host"] = parts.netloc
        if parts.scheme == "https":
            extensions["sni_hostname"] = parts.hostname
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
            answer = client.post(url, content=body.encode(), headers=headers, extensions=extensions)
    except httpx.HTTPError as e:
        return Result(None, f"{type(e).__name__}: {e}"[:500])
    return Result(answer.status_code, None if 200 <= answer.status_code < 300 else answer.text[:200] or None)


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: the base, doubled each time, at most the cap."""
    return min(settings.webhook_retry_base_s * 2 ** max(attempts - 1, 0), settings.webhook_retry_max_s)


def attempt(db, settings: Settings, delivery_id: str) -> float | None:
    """Make the next attempt of a delivery if it is due and no other attempt holds it; record it. Returns
    the seconds until the next attempt when it must be tried again, else None (delivered, given up, not
    due, or held elsewhere)."""
    now = utcnow()
    with db.session() as session:
        took = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
            .values(lease_until=now + timedelta(seconds=LEASE_S))).rowcount
        if not took:
            return None
        delivery = session.get(WebhookDelivery, delivery_id)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        session.expunge(endpoint)
        message_id, body, created = delivery.id, delivery.body, aware(delivery.created_at)
    result = post(settings, endpoint, message_id, body)
    done = utcnow()
    with db.session() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error, delivery.lease_until = result.status_code, result.error, None
        if result.ok:
            delivery.status, delivery.delivered_at = "delivered", done
            log.info("webhook %s (%s) delivered to %s after %d attempt(s)", message_id, delivery.event_type,
                     endpoint.id, delivery.attempts)
            return None
        wait = backoff(settings, delivery.attempts)
        if (done - created).total_seconds() + wait > settings.webhook_retry_for_s:
            delivery.status = "failed"
            log.warning("webhook %s to %s failed for good after %d attempts: %s", message_id, endpoint.id,
                        delivery.attempts, result.error or result.status_code)
            return None
        delivery.next_attempt_at = done + timedelta(seconds=wait)
        log.info("webhook %s to %s: attempt %d failed (%s); again in %.1f s", message_id, endpoint.id,
                 delivery.attempts, result.error or result.status_code, wait)
        return wait


def due(session: Session, limit: int = 100) -> list[str]:
    """Pending deliveries whose next attempt is due and that no attempt holds."""
    now = utcnow()
    return list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
