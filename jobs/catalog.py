"""Models a job may name: a model folder, or a sub-folder of one of ``settings.model_dirs``."""

from __future__ import annotations

from pathlib import Path

from jobs.settings import Settings


def resolve_model(settings: Settings, reference: str) -> Path | None:
    """A model folder (path) or the name of a sub-folder of one of ``settings.model_dirs``."""
    candidates = [Path(reference)] + [Path(root) / reference for root in settings.model_dirs]
    for candidate in candidates:
        try:
            if (candidate / "config.json").is_file():
                return candidate.resolve()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a model
            continue
    return None


def registered_models(settings: Settings) -> list[str]:
    names = []
    for root in settings.model_dirs:
        if Path(root).is_dir():
            names += sorted(p.name for p in Path(root).iterdir() if (p / "config.json").is_file())
    return names
