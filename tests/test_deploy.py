"""docker-compose.yml, .env.example and the Dockerfile agree with the code: the compose file is validated by a
Compose implementation (Debian's docker-compose, `config`, which needs no Docker engine; .ci/run installs
it), every variable it uses is in .env.example, and what it runs exists (commands, options, probes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def example_env() -> dict[str, str]:
    """.env.example's values, with a password (what a deployment's .env holds)."""
    values = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    return {**values, "POSTGRES_PASSWORD": "s3cret"}


def test_compose_wires_every_part_with_settings_the_code_reads(monkeypatch):
    done = compose_config(quiet=False, **example_env())
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]  # as the Compose implementation resolves it
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        fields = {key.removeprefix("LOMO_").lower() for key in env}
        assert fields <= set(Settings.model_fields), f"{name}: unknown settings {fields - set(Settings.model_fields)}"
        for key in [k for k in os.environ if k.startswith("LOMO_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():  # read as the service reads them: from its environment
            monkeypatch.setenv(key, "" if value is None else str(value))
        settings = Settings()
        assert settings.model_dirs == [Path(p) for p in json.loads(env["LOMO_MODEL_DIRS"])]
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



def compose_config(*args: str, quiet: bool = True, **env: str) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is needed to validate docker-compose.yml: apt-get install docker-compose "
                    "(.ci/run installs it)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOMO_", "POSTGRES_", "FLOWER_"))}
    return subprocess.run([tool, "-f", str(COMPOSE), "--project-directory", str(ROOT), *args, "config",
                           *(["-q"] if quiet else [])],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_a_compose_implementation_takes_the_file_with_and_without_flower(tmp_path):
    for profile in ([], ["--profile", "flower"]):
        done = compose_config(*profile, POSTGRES_PASSWORD="s3cret")
        assert done.returncode == 0, done.stderr
    missing = compose_config()  # no password: refused, naming what to set
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
    broken = tmp_path / "docker-compose.yml"  # and it does check: an unknown option is refused
    broken.write_text(COMPOSE.read_text().replace("    shm_size:", "    shm_sise:"))
    done = subprocess.run([shutil.which("docker-compose"), "-f", str(broken), "config", "-q"], capture_output=True,
                          text=True, env={**os.environ, "POSTGRES_PASSWORD": "x"}, timeout=60)
    assert done.returncode != 0 and "shm_sise" in done.stderr


def test_every_variable_of_the_compose_file_is_in_env_example_and_each_there_is_used():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    listed = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
              if line and not line.startswith("#")}
    assert used == listed, (used - listed, listed - used)
    for name in listed:  # the LOMO_ ones the services pass on are settings of the code
        if name.startswith("LOMO_") and name not in ("LOMO_API_BIND", "LOMO_API_WORKERS", "LOMO_WORKER_SHM_SIZE",
                                                     "LOMO_FLOWER_BIND"):
            assert name.removeprefix("LOMO_").lower() in Settings.model_fields, name


def test_what_the_services_run_exists(tmp_path):
    from typer.testing import CliRunner

    from api.app import create_app
    from client.cli import app

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    used = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    declared = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    assert {v for v in used if not v.startswith(".")} == declared  # named volumes: each declared, each used
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in (o for o in services["api"]["command"] if o.startswith("--")):
        assert option in serve_help, option
    probe = services["api"]["healthcheck"]["test"][-1]
    path = re.search(r"127\.0\.0\.1:8000(/[a-z]+)", probe).group(1)
    assert path in create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert services["api"]["ports"][0].endswith(":8000:8000") and '"--port", "8000"' in COMPOSE.read_text()
    assert services["redis"]["command"][-2:] == ["--appendonly", "yes"]
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert services["flower"]["profiles"] == ["flower"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
