"""Nothing is open without a key: every route of the OpenAPI schema (so a new route cannot escape this)
but the health probe answers 401 in OpenAI's error shape with no key, a malformed header, an unknown key
or a revoked one, and serves the holder of a valid key; another user's objects are 404, as unknown ones."""

from __future__ import annotations

import re

import pytest

from jobs import users
from jobs.db import database
from tests.conftest import api_client, user_key

OPEN = {"/health", "/healthz", "/readyz"}  # probes answer anyone
ADMINS_ONLY = {"/metrics"}  # besides /v1/admin/...: Prometheus scrapes with an admin's key (or the metrics token)


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


# ------------------------------------------------------------------------------------ the whole matrix
ROW = b'{"prompt": "a", "response": "b"}\n'
HOOK = "http://127.0.0.1:9/hook"  # nothing answers there: a test delivery says so (status_code 0)


class World:
    """Two users (ann, bob: neither an admin) and the local admin, on one service; ``fresh`` makes a new
    set of ann's objects (a file, a queued job, a fine-tuned model, an API key, a registered model), so
    that a route that deletes or changes one is tried on an untouched one by each caller."""

    def __init__(self, client, settings, model_dir):
        self.client, self.settings, self.model_dir = client, settings, model_dir
        self.admin = {"Authorization": client.headers["Authorization"]}
        self.ann = {"Authorization": f"Bearer {user_key(settings, 'ann')}"}
        self.bob = {"Authorization": f"Bearer {user_key(settings, 'bob')}"}
        self.made = 0

    def upload(self, headers) -> str:
        answer = self.client.post("/v1/files", files={"file": ("t.jsonl", ROW)}, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer.json()["id"]

    def fresh(self) -> dict[str, str]:
        import shutil

        from jobs import catalog
        from jobs.admission import job_output_dir
        from jobs.models import Job, utcnow

        self.made += 1
        done = self.client.post("/v1/fine_tuning/jobs", headers=self.ann, json={
            "model": self.model_dir.name, "training_file": self.upload(self.ann)}).json()
        assert "id" in done, done
        shutil.copytree(self.model_dir, job_output_dir(self.settings, done["id"]) / "model")
        with self.client.app.state.db.session() as s:
            job = s.get(Job, done["id"])
            job.status, job.finished_at = "succeeded", utcnow()
            job.fine_tuned_model = catalog.fine_tuned_name(job.model, job.suffix, job.id)
            model = job.fine_tuned_model
        queued = self.client.post("/v1/fine_tuning/jobs", headers=self.ann, json={
            "model": self.model_dir.name, "training_file": self.upload(self.ann)}).json()["id"]
        key = self.client.post("/v1/admin/users/ann/keys", json={}).json()["id"]
        name = f"registered-{self.made}"
        assert self.client.post("/v1/admin/models", json={"name": name, "path": str(self.model_dir)}).status_code == 200
        for old in self.client.get("/v1/webhook_endpoints", headers=self.ann).json()["data"]:
            self.client.delete(f"/v1/webhook_endpoints/{old['id']}", headers=self.ann)  # a user may have 20
        hook = self.client.post("/v1/webhook_endpoints", headers=self.ann, json={
            "name": "h", "url": HOOK, "event_types": ["fine_tuning.job.succeeded"]}).json()["id"]
        return {"file_id": self.upload(self.ann), "job_id": queued, "model_id": model, "user": "ann",
                "key_id": key, "name": name, "endpoint_id": hook}

    def set_status(self, job_id: str, status: str) -> None:
        from jobs.models import Job

        with self.client.app.state.db.session() as s:
            s.get(Job, job_id).status = status


def body_of(world: World, method: str, path: str, headers) -> dict:
    """What a request to a route sends besides its path: a valid body where it takes one."""
    world.made += 1
    if (method, path) == ("POST", "/v1/files"):
        return {"files": {"file": ("t.jsonl", ROW)}}
    if (method, path) in (("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/estimates")):
        return {"json": {"model": world.model_dir.name, "training_file": world.upload(headers)}}
    if (method, path) == ("POST", "/v1/admin/users"):
        return {"json": {"name": f"made-{world.made}"}}
    if (method, path) == ("PATCH", "/v1/admin/users/{user}"):
        return {"json": {"quotas": {"gpu_hours": 1000}}}
    if (method, path) == ("POST", "/v1/admin/users/{user}/keys"):
        return {"json": {"name": "another"}}
    if (method, path) == ("POST", "/v1/admin/models"):
        return {"json": {"name": f"new-{world.made}", "path": str(world.model_dir)}}
    if (method, path) == ("POST", "/v1/webhook_endpoints"):
        return {"json": {"name": "n", "url": HOOK, "event_types": ["fine_tuning.job.failed"]}}
    if (method, path) == ("POST", "/v1/webhook_endpoints/{endpoint_id}"):
        return {"json": {"name": "renamed"}}
    if (method, path) == ("POST", "/v1/webhook_endpoints/{endpoint_id}/test"):
        return {"json": {"event_type": "fine_tuning.job.succeeded"}}
    return {}


#: the state a job must be in for a route to act on it
NEEDS = {"/v1/fine_tuning/jobs/{job_id}/pause": "running", "/v1/fine_tuning/jobs/{job_id}/resume": "paused"}


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    from jobs.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'lomo.db'}",
                        model_dirs=[tiny_model_dir.parent], device="cpu", webhook_allow_private=True,
                        webhook_timeout_s=1)
    with api_client(settings) as c:
        yield World(c, settings, tiny_model_dir)


def test_every_route_serves_its_owner_and_admins_and_hides_it_from_other_users(world):
    """From the OpenAPI schema: for each route, the owner (ann) and an admin get a 2xx on an object of
    ann's; bob gets a 404 for it, exactly as for an id that does not exist; an admin's route is a 403 for
    both users."""
    schema = world.client.get("/openapi.json").json()
    tried = 0
    for path, item in schema["paths"].items():
        for method in (m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")):
            if path in OPEN:
                continue
            params = set(re.findall(r"\{([^}]+)\}", path))
            admin_route = path.startswith("/v1/admin/") or path in ADMINS_ONLY
            callers = {"owner": world.ann, "admin": world.admin}
            for who, headers in callers.items():
                objects = world.fresh()
                assert params <= set(objects), f"no object for {params - set(objects)} of {method} {path}"
                if path in NEEDS:
                    world.set_status(objects["job_id"], NEEDS[path])
                url = path.format(**objects)
                if params and not admin_route:  # bob first: the object is untouched, and stays so
                    hidden = world.client.request(method, url, headers=world.bob, **body_of(world, method, path,
                                                                                            world.bob))
                    assert hidden.status_code == 404, (method, path, hidden.text)
                    unknown = world.client.request(method, path.format(**{p: f"{p}-nope" for p in params}),
                                                   headers=world.bob, **body_of(world, method, path, world.bob))
                    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == \
                        hidden.json()["error"]["code"], (method, path)
                if admin_route:
                    for user in (world.ann, world.bob):
                        refused = world.client.request(method, url, headers=user, **body_of(world, method, path,
                                                                                            user))
                        assert refused.status_code == 403, (method, path, refused.text)
                        assert refused.json()["error"]["code"] == "permission_denied"
                    if who == "owner":
                        continue  # an admin's route has no owner but the admins
                served = world.client.request(method, url, headers=headers, **body_of(world, method, path, headers))
                assert 200 <= served.status_code < 300, (who, method, path, served.text)
                tried += 1
    assert tried >= 64


def test_a_users_lists_hold_only_their_own(world):
    objects = world.fresh()
    hers = {objects["file_id"], objects["job_id"], objects["model_id"], objects["endpoint_id"]}
    for route in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/webhook_endpoints"):
        assert {o["id"] for o in world.client.get(route, headers=world.ann).json()["data"]} & hers, route
        assert not {o["id"] for o in world.client.get(route, headers=world.bob).json()["data"]} & hers, route
        assert world.client.get(route, headers=world.admin).json()["data"], route
    me = world.client.get("/v1/me", headers=world.bob).json()
    assert me["name"] == "bob" and me["is_admin"] is False and me["usage"]["queued_jobs"] == 0
