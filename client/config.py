"""Where the `lomo` command line finds the service: its URL and API key.

Each is taken from the first place that gives it: the command's option (``--url``, ``--api-key``), the
environment (``LOMO_URL``, ``LOMO_API_KEY``), the config file (``$LOMO_CONFIG``, else
``~/.config/lomo/config.toml``), and for the URL the default ``http://127.0.0.1:8000``, for the key the
one a service on this machine wrote at its first start (``$LOMO_DATA_DIR/admin-key``). The config file
is TOML::

    url = "http://gpu-head:8000"
    api_key = "..."

It is read only when an option or the environment leaves the URL or the key unset (so a broken file
stops no command that has both from elsewhere); a broken file is an error naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

DEFAULT_URL = "http://127.0.0.1:8000"


class ConfigFileError(ValueError):
    """The config file, or a URL from any source, cannot be used; the message names the file or source."""


@dataclass(frozen=True)
class Target:
    """The service to talk to, and where each value came from (``--url``, ``LOMO_URL``, the file, default)."""

    url: str
    api_key: str | None
    url_source: str


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$LOMO_CONFIG`` when set, else ``~/.config/lomo/config.toml``."""
    env = os.environ if env is None else env
    given = env.get("LOMO_CONFIG")
    return Path(given).expanduser() if given else Path.home() / ".config" / "lomo" / "config.toml"


def read_config(env: Mapping[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The config file's path and its ``url`` / ``api_key`` (empty when the default file is absent).

    A ``$LOMO_CONFIG`` naming a missing file, invalid TOML and values that are not strings raise
    :class:`ConfigFileError`; other keys are ignored."""
    env = os.environ if env is None else env
    path = config_path(env)
    if not path.is_file():
        if env.get("LOMO_CONFIG"):
            raise ConfigFileError(f"LOMO_CONFIG: no file {str(path)!r}")
        return path, {}
    if tomllib is None:
        raise ConfigFileError(f"{path}: reading TOML needs Python 3.11 or later")
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot read it: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: invalid TOML: {e}") from None
    found = {}
    for key in ("url", "api_key"):
        if key in values:
            if not isinstance(values[key], str):
                raise ConfigFileError(f"{path}: {key} must be a string, got {type(values[key]).__name__}")
            if values[key]:
                found[key] = values[key]
    return path, found


def check_url(url: str, source: str) -> str:
    """``url`` without a trailing slash, or ConfigFileError naming ``source`` when it is not http(s)."""
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ConfigFileError(f"{source}: expected a URL like http://127.0.0.1:8000, got {url!r}")
    return url.rstrip("/")


def resolve(url: str | None = None, api_key: str | None = None,
            env: Mapping[str, str] | None = None) -> Target:
    """The URL and key from the option, else the environment, else the config file, else the default."""
    env = os.environ if env is None else env
    url_source = "--url"
    if not url and env.get("LOMO_URL"):
        url, url_source = env["LOMO_URL"], "LOMO_URL"
    if not api_key and env.get("LOMO_API_KEY"):
        api_key = env["LOMO_API_KEY"]
    if not url or not api_key:
        path, values = read_config(env)
        if not url and "url" in values:
            url, url_source = values["url"], str(path)
        if not api_key:
            api_key = values.get("api_key")
    if not api_key:
        api_key = local_admin_key(env)
    if not url:
        url, url_source = DEFAULT_URL, "default"
    return Target(url=check_url(url, url_source), api_key=api_key or None, url_source=url_source)


def local_admin_key(env: Mapping[str, str] | None = None) -> str | None:
    """The key a service on this machine wrote at its first start (``$LOMO_DATA_DIR/admin-key``, ``var``
    by default), when this user can read it; else None."""
    env = os.environ if env is None else env
    path = Path(env.get("LOMO_DATA_DIR") or "var") / "admin-key"
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
