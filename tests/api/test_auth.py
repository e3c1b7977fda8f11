"""Nothing is open without a key: every route of the OpenAPI schema (so a new route cannot escape this)
but the health probe answers 401 in OpenAI's error shape with no key, a malformed header, an unknown key
or a revoked one, and serves the holder of a valid key; another user's objects are 404, as unknown ones."""

from __future__ import annotations

import re

import pytest

from jobs import users
from jobs.db import database
from tests.conftest import api_client, user_key

OPEN = {"/health"}  # probes answer anyone


@pytest.fixture
def client(tmp_path):
    from jobs.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'lomo.db'}")
    with api_client(settings) as c:
        yield c, settings


def routes(client) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json").json()
    return [(method.upper(), re.sub(r"\{[^}]+\}", "x", path)) for path, item in schema["paths"].items()
            for method in item if method in ("get", "post", "put", "patch", "delete") and path not in OPEN]


def test_every_route_wants_a_valid_key(client):
    c, settings = client
    found = routes(c)
    assert len(found) >= 20 and ("POST", "/v1/fine_tuning/jobs") in found and ("GET", "/v1/models") in found
    with database(settings.resolved_database_url()).session() as s:
        user, revoked = users.create_user(s, "gone")
        users.revoke_key(s, revoked.key.id)
    admin = c.headers.pop("Authorization")
    attempts = {"no key": {}, "not bearer": {"Authorization": "Basic dXNlcjpwdw=="},
                "empty bearer": {"Authorization": "Bearer "}, "unknown key": {"Authorization": "Bearer sk-abc"},
                "revoked key": {"Authorization": f"Bearer {revoked.secret}"}}
    for method, path in found:
        for what, headers in attempts.items():
            answer = c.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path, what, answer.text)
            error = answer.json()["error"]
            assert error["code"] in ("missing_api_key", "invalid_api_key") and error["message"], (method, path)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert revoked.secret not in answer.text
        served = c.request(method, path, headers={"Authorization": admin})
        assert served.status_code != 401, (method, path, served.text)
    assert c.get("/health").status_code == 200  # the probe needs none


def test_a_user_sees_only_their_own(client):
    c, settings = client
    file_id = c.post("/v1/files", files={"file": ("t.jsonl", b'{"prompt": "a", "response": "b"}\n')},
                     data={"purpose": "fine-tune"}).json()["id"]
    other = {"Authorization": f"Bearer {user_key(settings, 'bob')}"}
    assert c.get(f"/v1/files/{file_id}").status_code == 200
    answer = c.get(f"/v1/files/{file_id}", headers=other)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "file_not_found"
    assert c.get("/v1/files/file-unknown", headers=other).json()["error"] == answer.json()["error"] | {
        "message": answer.json()["error"]["message"].replace(file_id, "file-unknown")}
    assert c.get("/v1/files", headers=other).json()["data"] == []
    assert c.delete(f"/v1/files/{file_id}", headers=other).status_code == 404
    assert c.get(f"/v1/files/{file_id}").status_code == 200  # still there for its owner
