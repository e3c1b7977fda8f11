"""One settings class, read from LOMO_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOMO_", extra="ignore")

    #: where uploaded files, checkpoints and exported models live (shared by every worker)
    data_dir: Path = Path("var")
    #: SQLite under data_dir when unset (the zero-configuration default); Postgres in production
    database_url: str | None = None
    #: an embedded broker when unset; redis://... in production
    broker_url: str | None = None

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lomo.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
