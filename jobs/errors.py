"""What the domain raises when a client asks for something that cannot be done; the API maps each to
a 4xx answer (``api.errors``)."""

from __future__ import annotations

from dataclasses import dataclass


class ServiceError(Exception):
    """Something the client asked for cannot be done; the API turns these into 4xx answers."""


class NotFound(ServiceError):
    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"no {kind} with id {ident!r}")
        self.kind, self.ident = kind, ident


class Unauthorized(ServiceError):
    """No API key, or one that authenticates no one (unknown, malformed, revoked, of a disabled user)."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


class Forbidden(ServiceError):
    """The caller is known but may not do this (an admin's route, another user's list)."""

    def __init__(self, message: str, code: str = "permission_denied", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class UnsupportedMediaType(ServiceError):
    """A body of a kind the route does not take (415): the message says which it takes."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QuotaExceeded(ServiceError):
    """A request over one of the caller's quotas: the message names the limit, its value and the use."""

    def __init__(self, quota: str, limit: float, used: float, message: str) -> None:
        super().__init__(message)
        self.quota, self.limit, self.used = quota, limit, used


class Conflict(ServiceError):
    """The request conflicts with the state of what it names (a finished job, a file in use)."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Problem:
    param: str | None
    message: str
    line: int | None = None


class InvalidRequest(ServiceError):
    """One or more problems, each naming the field (``param``) or the line of a file."""

    def __init__(self, problems: list[Problem], code: str = "invalid_request") -> None:
        self.problems, self.code = problems, code
        first = problems[0]
        super().__init__(f"{first.param}: {first.message}" if first.param else first.message)
