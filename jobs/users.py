"""Users and their API keys.

Every row has an owner. A user has one or more API keys; a key is ``lomo-<key id>-<secret>``: the key id
(``key_`` and 16 hex digits) is public (lists and logs name a key by it), the secret is 32 random bytes.
Only the SHA-256 of the secret is stored, so the key itself is shown once, when it is made. A presented
key is found by its id and its secret compared in constant time; a revoked key or a disabled user's key
authenticates no one, from the next request on.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.errors import Conflict, InvalidRequest, NotFound, Problem
from jobs.models import ApiKey, User, aware, new_id, utcnow

KEY_PREFIX = "lomo-"
_KEY = re.compile(r"^lomo-(key_[0-9a-f]{16})-([A-Za-z0-9_-]{43})$")
#: how precisely a key's last use is kept
LAST_USED_RESOLUTION = timedelta(minutes=1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``secret`` is the whole key, to be shown to its user now and never again."""

    key: ApiKey
    secret: str


def bootstrap_admin(session: Session, user_id: str) -> NewKey | None:
    """At a first start (no API key exists yet): the deployment's local user (``user_id``, the owner of
    everything made before users existed) becomes an admin with a new key, returned to be written for
    its owner; otherwise None."""
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    user = ensure_user(session, user_id)
    user.is_admin = True
    return add_key(session, user, "local admin, made at the first start")


def ensure_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        user = User(id=user_id, name=user_id)
        session.add(user)
        session.flush()
    return user


def _checked_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidRequest([Problem("name", f"{name!r} is not a user name: 1 to 64 letters, digits, '.', '_' or "
                                              "'-', starting with a letter or a digit")])
    return name


def create_user(session: Session, name: str, admin: bool = False, key_name: str | None = None) -> tuple[User, NewKey]:
    """A new user and their first API key. A name already taken is a Conflict."""
    name = _checked_name(name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"a user named {name!r} exists already; add a key to it with `lomo users add-key {name}`",
                       code="user_exists")
    user = User(id=new_id("user"), name=name, is_admin=admin, created_at=utcnow())
    session.add(user)
    session.flush()
    return user, add_key(session, user, key_name)


def get_user(session: Session, name_or_id: str) -> User:
    user = session.scalar(select(User).where((User.name == name_or_id) | (User.id == name_or_id)))
    if user is None:
        raise NotFound("user", name_or_id)
    return user


def add_key(session: Session, user: User, name: str | None = None) -> NewKey:
    """A new API key of ``user`` (its other keys stay valid)."""
    secret = secrets.token_urlsafe(32)
    key = ApiKey(id=f"key_{secrets.token_hex(8)}", user_id=user.id, secret_sha256=_digest(secret),
                 name=name, created_at=utcnow())
    session.add(key)
    session.flush()
    return NewKey(key, f"{KEY_PREFIX}{key.id}-{secret}")


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """End a key, at once: it authenticates no one from the next request on. Revoking it again is a no-op."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("api_key", key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def list_users(session: Session) -> list[tuple[User, int]]:
    """Every user with the number of their keys that are not revoked, by name."""
    live = (select(ApiKey.user_id, func.count(ApiKey.id).label("live")).where(ApiKey.revoked_at.is_(None))
            .group_by(ApiKey.user_id).subquery())
    rows = session.execute(select(User, func.coalesce(live.c.live, 0)).outerjoin(live, live.c.user_id == User.id)
                           .order_by(User.name))
    return [(user, int(keys)) for user, keys in rows]


def list_keys(session: Session, user: User) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.created_at)))


def authenticate(session: Session, presented: str | None) -> tuple[User, ApiKey] | None:
    """The user (and key) of a presented key, or None: malformed, unknown, revoked, or of a disabled user.
    The secret is compared in constant time; the key's last use is noted. One query (every request
    makes it)."""
    match = _KEY.match(presented or "")
    if match is None:
        return None
    found = session.execute(select(ApiKey, User).join(User, User.id == ApiKey.user_id)
                            .where(ApiKey.id == match.group(1))).first()
    if found is None or not hmac.compare_digest(found[0].secret_sha256, _digest(match.group(2))):
        return None
    return _in_use(found[0], found[1])


def key_in_use(session: Session, key: ApiKey | None) -> tuple[User, ApiKey] | None:
    """``key``'s user and the key, its use noted, while the key is not revoked and its user not disabled;
    otherwise None (a portal session made with the key ends with it too)."""
    return _in_use(key, session.get(User, key.user_id) if key is not None else None)


def _in_use(key: ApiKey | None, user: User | None) -> tuple[User, ApiKey] | None:
    if key is None or key.revoked_at is not None or user is None or user.disabled_at is not None:
        return None
    now = utcnow()
    # to the minute: a page polling every few seconds must not write the key's row each time
    if key.last_used_at is None or now - aware(key.last_used_at) > LAST_USED_RESOLUTION:
        key.last_used_at = now
    return user, key


def key_id_of(presented: str | None) -> str | None:
    """The public id of a presented key, for logs (never the secret); None when it is not one of ours."""
    match = _KEY.match(presented or "")
    return match.group(1) if match else None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def update_user(session: Session, user: User, *, admin: bool | None = None, disabled: bool | None = None,
                quotas: dict[str, Any] | None = None) -> User:
    """An admin's change of a user: admin or not, disabled or not (a disabled user's keys authenticate no
    one; enabling them again makes the keys valid again), and quota overrides (merged into the user's:
    a quota with a number is their limit, with null no limit; ``{"quota": "default"}`` forgets the override).
    The last enabled admin cannot stop being one (Conflict): someone must be able to manage the users."""
    from jobs import quotas as quota_rules

    if quotas is not None:
        forget = {name for name, value in quotas.items() if value == "default"}
        checked = quota_rules.checked_overrides({k: v for k, v in quotas.items() if k not in forget})
        merged = {k: v for k, v in (user.quotas or {}).items() if k not in forget} | checked
        user.quotas = merged or None
    losing = (admin is False or disabled is True) and user.is_admin and user.disabled_at is None
    if losing and session.scalar(select(func.count(User.id)).where(
            User.is_admin.is_(True), User.disabled_at.is_(None), User.id != user.id)) == 0:
        raise Conflict(f"{user.name} is the only enabled admin: make another user an admin first",
                       code="last_admin")
    if admin is not None:
        user.is_admin = admin
    if disabled is not None:
        user.disabled_at = (user.disabled_at or utcnow()) if disabled else None
    session.flush()
    return user
