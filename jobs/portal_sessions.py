"""Sign-ins to the web portal. A user signs in with an API key; the browser then holds a random token
(in an http-only cookie, set by ``api.portal``), and the database only its SHA-256. A session is as good
as the key it came from: it ends when it expires, when its user signs out, when the key is revoked or
when the user is disabled."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from jobs import users
from jobs.models import ApiKey, PortalSession, User, aware, utcnow


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(session: Session, presented: str, hours: float) -> tuple[str, User] | None:
    """A new portal session for the user of ``presented`` (an API key): its token and the user; None when
    the key authenticates no one."""
    found = users.authenticate(session, presented)
    if found is None:
        return None
    user, key = found
    token = secrets.token_urlsafe(32)
    now = utcnow()
    # sessions that ended or expired are of no use to anyone: each sign-in clears those past
    session.execute(delete(PortalSession).where(or_(PortalSession.expires_at < now, PortalSession.ended_at < now)))
    session.add(PortalSession(id=_digest(token), key_id=key.id, created_at=now,
                              expires_at=now + timedelta(hours=hours)))
    return token, user


def authenticate(session: Session, token: str | None) -> tuple[User, ApiKey] | None:
    """The user (and key) of a portal session's token, or None: unknown, ended, expired, or its key revoked
    or its user disabled since."""
    if not token or len(token) > 200:
        return None
    found = session.execute(select(PortalSession, ApiKey).join(ApiKey, ApiKey.id == PortalSession.key_id)
                            .where(PortalSession.id == _digest(token))).first()
    if found is None or found[0].ended_at is not None or aware(found[0].expires_at) <= utcnow():
        return None
    return users.key_in_use(session, found[1])


def sign_out(session: Session, token: str | None) -> bool:
    """End the session of ``token`` (signing out twice is a no-op); whether one was ended."""
    if not token or len(token) > 200:
        return False
    ended = session.execute(update(PortalSession).where(PortalSession.id == _digest(token),
                                                        PortalSession.ended_at.is_(None)).values(ended_at=utcnow()))
    return ended.rowcount > 0
