"""Users: every row has an owner (a fixed local user until authentication arrives)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from jobs.models import User


def ensure_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        user = User(id=user_id, name=user_id)
        session.add(user)
        session.flush()
    return user
