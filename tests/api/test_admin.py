"""Admins over REST (``/v1/admin/...``): users and their keys, which take effect at once; admins see and
act on every user's objects, and lists filter by user; quotas refused with 429 naming the limit, its
value and the use, and freed when jobs end or files go."""

from __future__ import annotations

import pytest

ROW = b'{"prompt": "a", "response": "b"}\n'


@pytest.fixture
def env(admin_env):
    return admin_env


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_user(admin, name: str, **body) -> tuple[dict, dict[str, str]]:
    answer = admin.post("/v1/admin/users", json={"name": name, **body})
    assert answer.status_code == 200, answer.text
    return answer.json(), bearer(answer.json()["api_key"]["key"])


def upload(client, headers, content: bytes = ROW):
    return client.post("/v1/files", files={"file": ("t.jsonl", content)}, headers=headers)


def submit(client, headers, model: str):
    file_id = upload(client, headers).json()["id"]
    return client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id}, headers=headers)


def error_of(answer, status: int) -> dict:
    assert answer.status_code == status, answer.text
    return answer.json()["error"]


def test_users_and_keys_over_rest_take_effect_at_once(env):
    admin, _settings, _model = env
    ann, ann_headers = make_user(admin, "ann", key_name="laptop")
    assert ann["name"] == "ann" and ann["is_admin"] is False and ann["api_keys"] == 1
    assert ann["api_key"]["key"].startswith("lomo-key_") and ann["api_key"]["name"] == "laptop"
    assert admin.get("/v1/files", headers=ann_headers).status_code == 200
    assert error_of(admin.post("/v1/admin/users", json={"name": "ann"}), 409)["code"] == "user_exists"
    assert error_of(admin.post("/v1/admin/users", json={"name": "no spaces"}), 422)["param"] == "name"

    listed = admin.get("/v1/admin/users").json()["data"]
    assert [u["name"] for u in listed] == ["ann", "local"] and all("lomo-key_" not in str(u) for u in listed)
    second = admin.post("/v1/admin/users/ann/keys", json={"name": "cluster"}).json()
    keys = admin.get(f"/v1/admin/users/{ann['id']}/keys").json()["data"]
    assert [k["name"] for k in keys] == ["laptop", "cluster"] and all("key" not in k for k in keys)
    assert admin.delete(f"/v1/admin/keys/{ann['api_key']['id']}").json()["revoked_at"] is not None
    assert error_of(admin.get("/v1/files", headers=ann_headers), 401)["code"] == "invalid_api_key"  # at once
    assert admin.get("/v1/files", headers=bearer(second["key"])).status_code == 200  # the other key lives on
    assert error_of(admin.delete("/v1/admin/keys/key_0000000000000000"), 404)["code"] == "api_key_not_found"

    assert admin.patch("/v1/admin/users/ann", json={"disabled": True}).json()["disabled"] is True
    assert error_of(admin.get("/v1/files", headers=bearer(second["key"])), 401)["code"] == "invalid_api_key"
    admin.patch("/v1/admin/users/ann", json={"disabled": False})
    assert admin.get("/v1/files", headers=bearer(second["key"])).status_code == 200

    # a user's key is refused on every admin route (the matrix of test_auth checks each one)
    error = error_of(admin.get("/v1/admin/users", headers=bearer(second["key"])), 403)
    assert error["code"] == "permission_denied" and error["type"] == "permission_error"
    # someone must stay able to manage: the only admin cannot step down or be disabled
    for change in ({"admin": False}, {"disabled": True}):
        assert error_of(admin.patch("/v1/admin/users/local", json=change), 409)["code"] == "last_admin"
    assert admin.patch("/v1/admin/users/ann", json={"admin": True}).json()["is_admin"] is True
    assert error_of(admin.get("/v1/admin/users/nobody"), 404)["code"] == "user_not_found"
    assert admin.patch("/v1/admin/users/local", json={"admin": False}).json()["is_admin"] is False
    assert error_of(admin.get("/v1/admin/users"), 403)["code"] == "permission_denied"  # from this request on


def test_admins_see_and_act_on_every_users_objects_and_lists_filter_by_user(env):
    admin, _settings, model = env
    ann, ann_headers = make_user(admin, "ann")
    _bob, bob_headers = make_user(admin, "bob")
    job = submit(admin, ann_headers, model).json()
    mine = submit(admin, admin.headers, model).json()
    assert admin.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["organization_id"] == ann["id"]
    assert error_of(admin.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bob_headers), 404)["code"] == \
        "job_not_found"
    assert {j["id"] for j in admin.get("/v1/fine_tuning/jobs").json()["data"]} == {job["id"], mine["id"]}
    assert [j["id"] for j in admin.get("/v1/fine_tuning/jobs", params={"user": "ann"}).json()["data"]] == [job["id"]]
    assert [j["id"] for j in admin.get("/v1/fine_tuning/jobs", params={"user": ann["id"]}).json()["data"]] == [
        job["id"]]
    assert len(admin.get("/v1/files", params={"user": "ann"}).json()["data"]) == 1
    assert len(admin.get("/v1/files").json()["data"]) == 2
    assert error_of(admin.get("/v1/fine_tuning/jobs", params={"user": "nobody"}), 422)["param"] == "user"
    # a user's lists are their own; 'user' may name only them
    assert [j["id"] for j in admin.get("/v1/fine_tuning/jobs", headers=ann_headers).json()["data"]] == [job["id"]]
    assert admin.get("/v1/fine_tuning/jobs", params={"user": "ann"}, headers=ann_headers).status_code == 200
    for route in ("/v1/fine_tuning/jobs", "/v1/files", "/v1/models"):
        error = error_of(admin.get(route, params={"user": "bob"}, headers=ann_headers), 403)
        assert error["param"] == "user" and error["code"] == "permission_denied"
    assert admin.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # the admin acts
    assert admin.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ann_headers).json()["status"] == "cancelled"


def test_each_quota_is_refused_with_its_limit_and_use_and_freed(env):
    admin, settings, model = env
    ann, headers = make_user(admin, "ann", quotas={"queued_jobs": 1, "upload_bytes": 4 * len(ROW)})
    assert ann["quotas"]["queued_jobs"] == 1 and ann["overrides"] == {"queued_jobs": 1, "upload_bytes": 4 * len(ROW)}
    first = submit(admin, headers, model).json()
    answer = submit(admin, headers, model)
    error = error_of(answer, 429)
    assert error["code"] == "quota_exceeded" and error["param"] == "queued_jobs" and error["type"] == "quota_error"
    assert "at most 1 of your jobs may wait in the queue and 1 do" in error["message"]
    assert error["details"][0]["limit"] == 1 and error["details"][0]["used"] == 1
    assert answer.headers["x-should-retry"] == "false"
    admin.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=headers)
    assert submit(admin, headers, model).status_code == 200  # the cancelled job freed its place

    # uploads: the quota counts the bytes kept (the three files of ROW submitted); past it, refused
    assert admin.get("/v1/admin/users/ann").json()["usage"]["upload_bytes"] == 3 * len(ROW)
    assert upload(admin, headers).status_code == 200
    error = error_of(upload(admin, headers), 429)
    assert error["param"] == "upload_bytes" and f"may take {4 * len(ROW)} bytes and take {4 * len(ROW)}" in \
        error["message"]
    admin.patch("/v1/admin/users/ann", json={"quotas": {"upload_bytes": 5 * len(ROW) + 10}})
    big = ROW * 3
    error = error_of(upload(admin, headers, big), 429)
    assert error["param"] == "upload_bytes" and f"would add at least {len(ROW) + 11}" in error["message"]
    assert list((settings.data_dir / "uploads").iterdir()) == []  # nothing of the refused upload is kept
    file_ids = [f["id"] for f in admin.get("/v1/files", headers=headers).json()["data"]]
    unused = [f for f in file_ids if f not in {j["training_file"] for j in
                                                admin.get("/v1/fine_tuning/jobs", headers=headers).json()["data"]}]
    admin.delete(f"/v1/files/{unused[0]}", headers=headers)
    assert upload(admin, headers).status_code == 200  # a deleted file frees its bytes

    # GPU-hours: held from the leases; used up, a submission is refused naming them
    admin.patch("/v1/admin/users/ann", json={"quotas": {"queued_jobs": "default", "gpu_hours": 0.5}})
    from datetime import timedelta

    from jobs.models import GpuLease, utcnow

    with admin.app.state.db.session() as s:
        s.add(GpuLease(node="n", device_index=0, job_id=first["id"], leased_at=utcnow() - timedelta(hours=1),
                       released_at=utcnow()))
    error = error_of(submit(admin, headers, model), 429)
    assert error["param"] == "gpu_hours" and "may hold 0.5 GPU-hours in 168 hours and have held 1.00" in \
        error["message"]
    assert admin.get("/v1/admin/users/ann").json()["quotas"]["queued_jobs"] == settings.quota_queued_jobs
    for wrong in ({"quotas": {"gpus": 1}}, {"quotas": {"queued_jobs": -1}}):
        assert error_of(admin.patch("/v1/admin/users/ann", json=wrong), 422)["param"].startswith("quotas.")


def test_logs_name_the_caller_by_user_and_key_id_never_by_the_key(env, caplog):
    admin, settings, _model = env
    import logging

    caplog.set_level(logging.INFO, logger="lomo.api")
    made, headers = make_user(admin, "logged")
    secret = made["api_key"]["key"]
    admin.delete(f"/v1/admin/keys/{made['api_key']['id']}")
    admin.get("/v1/files", headers=headers)  # refused now: logged by the key's id
    text = caplog.text
    admin_id = admin.get("/v1/me").json()["id"]
    assert f"user {admin_id} (key key_" in text and f"created user logged ({made['id']})" in text
    assert f"revoked key {made['api_key']['id']} of user {made['id']}" in text
    assert f"refused API key {made['api_key']['id']}" in text
    assert secret not in text and secret.rsplit("-", 1)[-1] not in text
    assert admin.headers["Authorization"].removeprefix("Bearer ") not in text
