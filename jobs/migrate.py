"""Apply the Alembic migrations (the service does this at start; `python -m jobs.migrate` by hand)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from jobs.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url or get_settings().resolved_database_url()
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


if __name__ == "__main__":
    upgrade()
