"""Generated requests for every route of the OpenAPI schema (schemathesis): none may produce a 500, and
every answer matches the schema the route declares."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from api.app import bootstrap_admin_key, create_app
from jobs.migrate import upgrade
from jobs.settings import Settings

_DIR = Path(tempfile.mkdtemp(prefix="lomo-fuzz-"))
atexit.register(shutil.rmtree, _DIR, True)
(_DIR / "models" / "tiny").mkdir(parents=True)
(_DIR / "models" / "tiny" / "config.json").write_text(json.dumps({"model_type": "llama"}))
_SETTINGS = Settings(data_dir=_DIR / "var", model_dirs=[_DIR / "models"], max_upload_bytes=1 << 16)
upgrade(_SETTINGS.resolved_database_url())
_APP = create_app(_SETTINGS)
bootstrap_admin_key(_SETTINGS, _APP.state.db)  # what the lifespan does; every generated request sends the key
_AUTHORIZED = {"Authorization": f"Bearer {_SETTINGS.admin_key_file.read_text().strip()}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@schema.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_request_gets_a_server_error(case):
    case.call_and_validate(headers=_AUTHORIZED, checks=[schemathesis.checks.not_a_server_error,
                                   schemathesis.checks.response_schema_conformance])
