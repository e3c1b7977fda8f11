"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine here to run them)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_compose_wires_every_part_with_settings_the_code_reads():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        fields = {key.removeprefix("LOMO_").lower() for key in env}
        assert fields <= set(Settings.model_fields), f"{name}: unknown settings {fields - set(Settings.model_fields)}"
        settings = Settings(**{k.removeprefix("LOMO_").lower(): v for k, v in env.items()
                               if k != "LOMO_MODEL_DIRS"}, model_dirs=json.loads(env["LOMO_MODEL_DIRS"]))
        assert settings.resolved_database_url().startswith("postgresql+psycopg://")
        assert settings.broker_url.startswith("redis://") and not settings.embedded
    # the API and the worker see the same data folder, and the worker gets the GPUs
    assert set(services["api"]["volumes"]) == set(services["worker"]["volumes"])
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["command"][:2] == ["lomo", "serve"] and "--no-worker" in services["api"]["command"]
    assert services["worker"]["command"][:2] == ["lomo", "worker"]
    assert services["migrate"]["command"] == ["python", "-m", "jobs.migrate"]


def test_the_image_contains_every_package_of_the_project():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("lomo_core", "jobs", "api", "worker", "client", "migrations"):
        assert f"COPY {package} {package}" in dockerfile
    assert "torch==2.13.0" in dockerfile
