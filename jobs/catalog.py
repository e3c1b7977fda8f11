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


# ---------------------------------------------------------------------------------------------- names
#: fine-tuned models and checkpoints are named like OpenAI's: ``ft:<base>:<suffix>:<job id>`` and
#: ``ft:<base>:<suffix>:<job id>:ckpt-step-<N>`` (the suffix may be empty); never a path of the node
FINE_TUNED_PREFIX = "ft:"


def base_name(model_reference: str) -> str:
    """The base model's name in a fine-tuned model's name: a registered model's name, a folder's last
    part, or the base of a fine-tuned model that was itself fine-tuned."""
    if model_reference.startswith(FINE_TUNED_PREFIX):
        return model_reference.split(":")[1]
    return Path(model_reference.rstrip("/")).name or "model"


def fine_tuned_name(model_reference: str, suffix: str | None, job_id: str) -> str:
    return f"{FINE_TUNED_PREFIX}{base_name(model_reference)}:{suffix or ''}:{job_id}"


def checkpoint_name(model_reference: str, suffix: str | None, job_id: str, step: int) -> str:
    return f"{fine_tuned_name(model_reference, suffix, job_id)}:ckpt-step-{step}"


def parse_fine_tuned(name: str) -> tuple[str, int | None] | None:
    """(job id, checkpoint step or None) of a fine-tuned model's or checkpoint's name; None otherwise."""
    if not name.startswith(FINE_TUNED_PREFIX):
        return None
    parts = name.split(":")
    if len(parts) == 4 and parts[3]:
        return parts[3], None
    if len(parts) == 5 and parts[3] and parts[4].startswith("ckpt-step-") and parts[4][10:].isdigit():
        return parts[3], int(parts[4][10:])
    return None
