"""Generated requests for every route of the OpenAPI schema (schemathesis), with the admin's key, on
Postgres (stricter than SQLite: string lengths, NUL bytes, integer ranges): none may produce a 500, and
every answer matches the schema the route declares."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.app import bootstrap_admin_key, create_app
from jobs.migrate import upgrade
from jobs.nodes import register_node
from jobs.settings import Settings
from tests.conftest import create_postgres_database, drop_postgres_database

_DIR = Path(tempfile.mkdtemp(prefix="lomo-fuzz-"))
atexit.register(shutil.rmtree, _DIR, True)
(_DIR / "models" / "tiny").mkdir(parents=True)
(_DIR / "models" / "tiny" / "config.json").write_text(json.dumps({"model_type": "llama"}))
_DATABASE = create_postgres_database()
atexit.register(drop_postgres_database, _DATABASE)
_SETTINGS = Settings(data_dir=_DIR / "var", database_url=_DATABASE, model_dirs=[_DIR / "models"],
                     max_upload_bytes=1 << 16, webhook_timeout_s=1, heartbeat_timeout_s=3600)
upgrade(_SETTINGS.resolved_database_url())
_APP = create_app(_SETTINGS)
bootstrap_admin_key(_SETTINGS, _APP.state.db)  # what the lifespan does; every generated request sends the key
with _APP.state.db.session() as _session:  # a worker's node, seen: the deployment is ready (/readyz answers 200)
    register_node(_session, "fuzz-node", [])
_AUTHORIZED = {"Authorization": f"Bearer {_SETTINGS.admin_key_file.read_text().strip()}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)
_SENT: dict[str, int] = {}  # requests sent per operation


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Say how many requests were generated (pytest -q shows it at the end of the module's tests)."""
    failed = request.session.testsfailed
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and _SENT:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nschemathesis: {sum(_SENT.values())} generated requests over {len(_SENT)} "
                                "operations, " + ("none answered 5xx" if request.session.testsfailed == failed
                                                  else "some failed (above)"))


@schema.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_request_gets_a_server_error(case):
    operation = case.operation.label
    _SENT[operation] = _SENT.get(operation, 0) + 1
    case.call_and_validate(headers=_AUTHORIZED, checks=[schemathesis.checks.not_a_server_error,
                                   schemathesis.checks.response_schema_conformance])
