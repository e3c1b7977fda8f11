"""``/v1/admin/...``: what ``lomo users`` does on the node, over REST, for admins only (a user's key is a
403): users (create, list, read, change: admin, disabled, quota overrides), their API keys (add, list,
revoke), and base model folders registered by name."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import AdminDep, CallerDep, SessionDep, SessionRoute, SettingsDep
from api.errors import CONFLICT, ERRORS, FORBIDDEN
from api.schemas import (
    ApiKeyList,
    ApiKeyObject,
    NewApiKey,
    NewUser,
    RegisteredModelList,
    RegisteredModelObject,
    UserList,
    UserObject,
)
from api.views import unix
from jobs import catalog, quotas, users
from jobs.models import ApiKey, RegisteredModel, User
from jobs.schemas import Label
from jobs.settings import Settings

log = logging.getLogger("lomo.api")
router = APIRouter(route_class=SessionRoute, prefix="/v1/admin", tags=["admin"])
me = APIRouter(route_class=SessionRoute, prefix="/v1", tags=["users"])
ANSWERS = {**ERRORS, **FORBIDDEN}

QuotaValue = float | Literal["default"] | None


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="letters, digits, '.', '_', '-'")
    admin: bool = False
    key_name: Label | None = Field(None, max_length=200, description="a note on the first key (who or what uses it)")
    quotas: dict[str, QuotaValue] | None = Field(None, description="overrides: running_jobs, queued_jobs, "
                                                                   "gpu_hours, upload_bytes (null: no limit)")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin: bool | None = None
    disabled: bool | None = Field(None, description="a disabled user's keys authenticate no one")
    quotas: dict[str, QuotaValue] | None = Field(None, description="merged into the user's overrides; a quota "
                                                                   "with null: no limit; \"default\": the "
                                                                   "deployment's default again")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Label | None = Field(None, max_length=200)


class ModelRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="what jobs name it (\"model\": NAME)")
    path: Label = Field(min_length=1, max_length=4096, description="an absolute folder of the service's host with "
                                                                 "a config.json (never shown back)")


def user_object(session: Session, settings: Settings, user: User, cls: type[UserObject] = UserObject,
                **extra: Any) -> UserObject:
    live = sum(1 for key in users.list_keys(session, user) if key.revoked_at is None)
    return cls(id=user.id, name=user.name, is_admin=bool(user.is_admin), disabled=user.disabled_at is not None,
               created_at=unix(user.created_at) or 0, api_keys=live, quotas=quotas.limits(settings, user),
               overrides=dict(user.quotas or {}), usage=quotas.usage(session, settings, user.id), **extra)


def key_object(row: ApiKey, cls: type[ApiKeyObject] = ApiKeyObject, **extra: Any) -> ApiKeyObject:
    return cls(id=row.id, user=row.user_id, name=row.name, created_at=unix(row.created_at) or 0,
               last_used_at=unix(row.last_used_at), revoked_at=unix(row.revoked_at), **extra)


def registered_object(row: RegisteredModel) -> RegisteredModelObject:
    return RegisteredModelObject(id=row.name, created_at=unix(row.created_at) or 0, registered_by=row.registered_by)


@router.post("/users", response_model=NewUser, responses={**ANSWERS, **CONFLICT},
             summary="Create a user with a first API key (shown this once)")
def create_user(body: UserCreate, session: SessionDep, settings: SettingsDep, admin: AdminDep) -> Any:
    user, made = users.create_user(session, body.name, admin=body.admin, key_name=body.key_name)
    log.info("%s created user %s (%s)%s with key %s", admin, user.name, user.id, " as an admin" if user.is_admin
             else "", made.key.id)
    if body.quotas:
        users.update_user(session, user, quotas=body.quotas)
    return user_object(session, settings, user, NewUser,
                       api_key=key_object(made.key, NewApiKey, key=made.secret))


@router.get("/users", response_model=UserList, responses=ANSWERS, summary="Every user, by name")
def list_users(session: SessionDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    return UserList(data=[user_object(session, settings, user) for user, _live in users.list_users(session)])


@router.get("/users/{user}", response_model=UserObject, responses=ANSWERS,
            summary="A user (by name or id), with their quotas and what they use of them")
def get_user(user: str, session: SessionDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    return user_object(session, settings, users.get_user(session, user))


@router.patch("/users/{user}", response_model=UserObject, responses={**ANSWERS, **CONFLICT},
              summary="Make a user an admin or not, disable or enable them, override their quotas")
def update_user(user: str, body: UserUpdate, session: SessionDep, settings: SettingsDep, admin: AdminDep) -> Any:
    found = users.update_user(session, users.get_user(session, user), admin=body.admin, disabled=body.disabled,
                              quotas=body.quotas)
    log.info("%s changed user %s: %s", admin, found.name, body.model_dump(exclude_none=True))
    return user_object(session, settings, found)


@router.post("/users/{user}/keys", response_model=NewApiKey, responses=ANSWERS,
             summary="Add an API key to a user (shown this once; their other keys stay valid)")
def add_key(user: str, session: SessionDep, admin: AdminDep, body: KeyCreate | None = None) -> Any:
    made = users.add_key(session, users.get_user(session, user), body.name if body else None)
    log.info("%s added key %s to user %s", admin, made.key.id, made.key.user_id)
    return key_object(made.key, NewApiKey, key=made.secret)


@router.get("/users/{user}/keys", response_model=ApiKeyList, responses=ANSWERS,
            summary="A user's API keys (ids, never secrets), revoked ones included")
def list_keys(user: str, session: SessionDep, _admin: AdminDep) -> Any:
    return ApiKeyList(data=[key_object(key) for key in users.list_keys(session, users.get_user(session, user))])


@router.delete("/keys/{key_id}", response_model=ApiKeyObject, responses=ANSWERS,
               summary="Revoke an API key: it authenticates no one from the next request on")
def revoke_key(key_id: str, session: SessionDep, admin: AdminDep) -> Any:
    revoked = users.revoke_key(session, key_id)
    log.info("%s revoked key %s of user %s", admin, revoked.id, revoked.user_id)
    return key_object(revoked)


@router.get("/models", response_model=RegisteredModelList, responses=ANSWERS,
            summary="The base models admins registered by name (the folders of LOMO_MODEL_DIRS are listed by "
                    "GET /v1/models)")
def list_registered(session: SessionDep, _admin: AdminDep) -> Any:
    return RegisteredModelList(data=[registered_object(row) for row in catalog.registrations(session)])


@router.post("/models", response_model=RegisteredModelObject, responses={**ANSWERS, **CONFLICT},
             summary="Register a model folder of the service's host by name; jobs name it, never its path")
def register_model(body: ModelRegister, session: SessionDep, settings: SettingsDep, admin: AdminDep) -> Any:
    return registered_object(catalog.register_model(session, settings, admin.user_id, body.name, body.path))


@router.delete("/models/{name}", response_model=RegisteredModelObject, responses=ANSWERS,
               summary="Forget a registration (the folder stays; jobs that name it fail validation from now on)")
def unregister_model(name: str, session: SessionDep, _admin: AdminDep) -> Any:
    return registered_object(catalog.unregister_model(session, name))


@me.get("/me", response_model=UserObject, responses=ERRORS,
        summary="Who the API key is: your user, your quotas and what you use of them")
def whoami(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> Any:
    return user_object(session, settings, users.get_user(session, caller.user_id))
