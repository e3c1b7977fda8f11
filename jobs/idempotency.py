"""``Idempotency-Key`` on the requests that create things: a retried create (the openai SDK retries
409, 429, 5xx and timeouts on its own) returns the object the first request made, not a second one.

A key belongs to its caller and route; ``remember`` writes it in the transaction that creates the
object, so a key is never stored for an object that was not made, and of two concurrent requests with
one key the second fails the unique constraint and then finds the first one's object.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import InvalidRequest, Problem
from jobs.models import IdempotencyKey, utcnow

MAX_KEY_LENGTH = 255


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest([Problem("Idempotency-Key", f"must have 1 to {MAX_KEY_LENGTH} characters")])
    return key


def recall(session: Session, owner: str, route: str, key: str | None) -> str | None:
    """The id of the object an earlier request with this key made, or None."""
    if key is None:
        return None
    return session.scalar(select(IdempotencyKey.object_id).where(
        IdempotencyKey.owner_id == owner, IdempotencyKey.route == route, IdempotencyKey.key == key))


def remember(session: Session, owner: str, route: str, key: str | None, object_id: str) -> None:
    if key is not None:
        session.add(IdempotencyKey(owner_id=owner, route=route, key=key, object_id=object_id, created_at=utcnow()))
        session.flush()
