"""The portal's server side, through the app (TestClient): sign-in sessions and their cookie, the end of a
session (sign-out, a revoked key, a disabled user, expiry), changes from another site refused, the new-job
form's problems at their fields, scopes (another user's job is not found), and pages that name no path of
the server's disk. The browser tests (tests/e2e/test_portal_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from api.portal import newjob
from jobs import users
from jobs.db import database
from jobs.models import ApiKey, PortalSession, User, utcnow
from jobs.settings import Settings
from tests.conftest import admin_key, api_client, user_key

ROWS = b"".join(b'{"prompt": "tell me a story %d", "response": "once upon a time"}\n' % n for n in range(6))
ORIGIN = {"origin": "http://testserver"}
VENDOR = Path(__file__).resolve().parents[2] / "api" / "portal" / "static" / "vendor"


@pytest.fixture
def env(admin_env):
    return admin_env


def browser(settings, **kwargs) -> TestClient:
    """A client without an API key, as a browser is: it holds only the cookies it is given."""
    client = TestClient(create_app(settings), **kwargs)
    client.__enter__()
    return client


def signed_in(settings, key: str, **kwargs) -> TestClient:
    client = browser(settings, **kwargs)
    answer = client.post("/signin", data={"key": key, "next": "/jobs"}, headers=ORIGIN, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/jobs", answer.text
    return client


def upload(client, data: bytes = ROWS, name: str = "stories.jsonl", purpose: str = "fine-tune") -> str:
    answer = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose}, headers=ORIGIN)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def field_error(page: str, name: str) -> str:
    found = re.search(rf'<p class="field-error" id="err-{re.escape(name)}"[^>]*>(.*?)</p>', page, re.S)
    assert found, f"no message slot for {name}"
    return found.group(1).strip()


def test_a_sign_in_gives_a_session_cookie_never_the_key(env):
    _admin, settings, _model = env
    key = user_key(settings, "ann")
    client = browser(settings)
    assert client.get("/jobs", follow_redirects=False).headers["location"] == "/signin?next=%2Fjobs"
    answer = client.post("/signin", data={"key": key, "next": "/files"}, headers=ORIGIN, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/files"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    token = client.cookies["lomo_session"]
    assert key not in cookie and token not in key
    with database(settings.resolved_database_url()).session() as session:
        stored = session.scalars(select(PortalSession)).all()
        assert [row.id for row in stored] == [hashlib.sha256(token.encode()).hexdigest()]  # only its digest
    page = client.get("/jobs")
    assert page.status_code == 200 and 'id="whoami">ann' in page.text
    assert client.get("/v1/fine_tuning/jobs").status_code == 200  # the page scripts' reads of the API


def test_a_wrong_key_is_refused_and_the_cookie_is_secure_over_https_and_loopback(env):
    _admin, settings, _model = env
    client = browser(settings)
    refused = client.post("/signin", data={"key": "lomo-key_0000000000000000-" + "a" * 43}, headers=ORIGIN)
    assert refused.status_code == 401 and "This API key is not valid" in refused.text
    assert "lomo_session" not in client.cookies
    assert client.post("/signin", data={"key": admin_key(settings)}, headers={"origin": "http://evil.example"},
                       follow_redirects=False).status_code == 403  # a sign-in from another site's form
    for base_url, secure in (("http://testserver", False), ("https://testserver", True), ("http://127.0.0.1", True),
                             ("http://localhost", True)):
        answer = browser(settings, base_url=base_url).post(
            "/signin", data={"key": admin_key(settings)}, headers={"origin": base_url}, follow_redirects=False)
        assert ("Secure" in answer.headers["set-cookie"]) is secure, base_url
    forced = Settings(**{**settings.model_dump(), "portal_secure_cookie": True})
    answer = browser(forced).post("/signin", data={"key": admin_key(settings)}, headers=ORIGIN, follow_redirects=False)
    assert "Secure" in answer.headers["set-cookie"]


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs"])
def test_after_sign_in_only_a_path_of_this_site(env, target):
    _admin, settings, _model = env
    answer = browser(settings).post("/signin", data={"key": admin_key(settings), "next": target}, headers=ORIGIN,
                                    follow_redirects=False)
    assert answer.headers["location"] == "/jobs"


def test_a_session_ends_with_sign_out_a_revoked_key_a_disabled_user_and_expiry(env):
    _admin, settings, _model = env
    db = database(settings.resolved_database_url())

    def ended(client) -> bool:
        api = client.get("/v1/fine_tuning/jobs")
        page = client.get("/jobs", follow_redirects=False)  # an ended session's cookie is dropped here
        if page.status_code == 303:
            assert page.headers["location"].startswith("/signin")
            assert api.status_code == 401 and api.json()["error"]["code"] == "session_ended"
            return True
        assert page.status_code == 200 and api.status_code == 200
        return False

    client = signed_in(settings, user_key(settings, "ann"))
    assert not ended(client)
    assert client.post("/signout", headers={"origin": "http://evil.example"}, follow_redirects=False).status_code == 303
    assert not ended(client)  # another site cannot sign a user out
    token = client.cookies["lomo_session"]
    client.post("/signout", headers=ORIGIN, follow_redirects=False)
    client.cookies.set("lomo_session", token)  # the old cookie, kept by a copy: ended on the server too
    assert ended(client)

    client = signed_in(settings, user_key(settings, "ann"))
    with db.session() as session:
        session.execute(update(ApiKey).where(ApiKey.user_id == users.get_user(session, "ann").id)
                        .values(revoked_at=utcnow()))
    assert ended(client)

    client = signed_in(settings, user_key(settings, "bob"))
    with db.session() as session:
        session.execute(update(User).where(User.name == "bob").values(disabled_at=utcnow()))
    assert ended(client)

    client = signed_in(settings, admin_key(settings))
    with db.session() as session:
        session.execute(update(PortalSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert ended(client)


def test_a_change_from_another_site_is_refused(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    for headers in ({"origin": "http://evil.example"}, {"referer": "http://evil.example/page"}, {}):
        answer = client.post("/v1/files", files={"file": ("x.jsonl", ROWS)}, headers=headers)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "permission_denied", headers
        assert client.post(f"/files/{file_id}/delete", headers=headers, follow_redirects=False).status_code == 403
    assert client.post(f"/files/{file_id}/delete", headers={"referer": "http://testserver/files"},
                       follow_redirects=False).status_code == 303  # the portal's own form (Referer, no Origin)
    with api_client(settings, "ann") as script:  # an API key is not a cookie: no Origin needed
        assert script.post("/v1/files", files={"file": ("x.jsonl", ROWS)}).status_code == 200


def test_the_new_job_form_names_each_problem_at_its_field_and_keeps_the_values(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    form = {"model": model, "training_file": file_id, "max_steps": "x3", "n_epochs": "0", "max_seq_len": "2.5",
            "metadata": "team=nlp\nno equals sign", "eval_0_task": "boolq", "eval_0_file": "file-nope"}
    answer = client.post("/jobs/new", data=form, headers=ORIGIN)
    assert answer.status_code == 422
    page = answer.text
    assert "line 2" in field_error(page, "metadata")
    form["metadata"] = "team=nlp"
    page = client.post("/jobs/new", data=form, headers=ORIGIN).text
    assert "integer" in field_error(page, "max_steps") and 'value="x3"' in page
    assert "at least 1" in field_error(page, "n_epochs")
    assert field_error(page, "max_seq_len")
    form.update(max_steps="3", n_epochs="1", max_seq_len="64")
    page = client.post("/jobs/new", data=form, headers=ORIGIN).text
    assert "file-nope" in field_error(page, "eval_0_file")
    form.update(eval_0_task="", eval_0_file="", training_file="file-missing")
    page = client.post("/jobs/new", data=form, headers=ORIGIN).text
    assert "file-missing" in field_error(page, "training_file") and field_error(page, "max_steps") == ""
    form.update(training_file=file_id, lr="0.01", learning_rate_multiplier="2")  # a problem of the whole job
    page = client.post("/jobs/new", data=form, headers=ORIGIN).text
    assert 'id="form-problems"' in page and "not both" in page
    del form["lr"]
    created = client.post("/jobs/new", data=form, headers=ORIGIN, follow_redirects=False)
    assert created.status_code == 303 and created.headers["location"].startswith("/jobs/ftjob-")


def test_new_job_like_this_gives_back_the_same_job(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    form = {"model": model, "training_file": file_id, "max_steps": "5", "batch_size": "2", "max_seq_len": "48",
            "optimizer": "adalomo", "learning_rate_multiplier": "0.3", "gradient_checkpointing": "on",
            "lr_schedule": "cosine", "warmup_steps": "1", "priority": "7", "suffix": "tales", "seed": "9",
            "metadata": "team=nlp\nrun=a"}
    job_id = client.post("/jobs/new", data=form, headers=ORIGIN, follow_redirects=False).headers["location"]
    with api_client(settings, "ann") as api:
        first = api.get(f"/v1/fine_tuning/jobs/{job_id.rsplit('/', 1)[1]}").json()
    from jobs.db import database as db_of
    from jobs.lifecycle import get_job

    with db_of(settings.resolved_database_url()).session() as session:
        values = newjob.form_of_job(get_job(session, None, first["id"]))
    again = client.post("/jobs/new", data=values, headers=ORIGIN, follow_redirects=False).headers["location"]
    with api_client(settings, "ann") as api:
        second = api.get(f"/v1/fine_tuning/jobs/{again.rsplit('/', 1)[1]}").json()
    for name in ("model", "training_file", "hyperparameters", "priority", "suffix", "seed", "metadata", "optimizer"):
        assert second[name] == first[name], name
    assert "selected>adalomo" in client.get(f"/jobs/new?like={first['id']}").text


@pytest.mark.parametrize(("param", "field"), [
    ("method.supervised.hyperparameters.lr", "lr"), ("hyperparameters.n_epochs", "n_epochs"),
    ("training_file", "training_file"), ("evals[1].file", "eval_1_file"), ("evals.2.limit", "eval_2_limit"),
    ("evals[0]", "eval_0_task"), ("method.supervised.hyperparameters", None), (None, None), ("metadata", "metadata"),
])
def test_problems_are_placed_at_the_field_they_name(param, field):
    assert newjob.field_of(param) == field


def test_the_estimate_says_whether_it_fits_and_why(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    waiting = client.post("/jobs/new/estimate", data={"model": model}, headers=ORIGIN).text
    assert "Choose a model and a training file" in waiting
    fits = client.post("/jobs/new/estimate", data={"model": model, "training_file": file_id, "max_steps": "2"},
                       headers=ORIGIN).text
    assert "Fits" in fits and "activations" in fits and 'hx-swap-oob="true"' in fits
    too_big = client.post("/jobs/new/estimate", data={"model": model, "training_file": file_id, "batch_size": "64",
                                                      "max_seq_len": "4000000"}, headers=ORIGIN).text
    assert "Does not fit" in too_big and "GiB" in too_big
    wrong = client.post("/jobs/new/estimate", data={"model": model, "training_file": file_id, "warmup_steps": "-1"},
                        headers=ORIGIN).text
    assert field_error(wrong, "warmup_steps")


def test_another_users_jobs_and_files_are_not_found_and_admins_see_all(env):
    _admin, settings, model = env
    ann = signed_in(settings, user_key(settings, "ann"))
    bob = signed_in(settings, user_key(settings, "bob"))
    bob_file = upload(bob)
    bob_job = bob.post("/jobs/new", data={"model": model, "training_file": bob_file, "max_steps": "2"},
                       headers=ORIGIN, follow_redirects=False).headers["location"].rsplit("/", 1)[1]
    assert bob_job not in ann.get("/jobs").text and bob_file not in ann.get("/files").text
    for path in (f"/jobs/{bob_job}", f"/jobs/{bob_job}?fragment=live", f"/jobs/{bob_job}?fragment=events"):
        assert ann.get(path).status_code == 404, path
    like = ann.get(f"/jobs/new?like={bob_job}").text
    assert "There is no job" in like and bob_file not in like  # nothing of bob's job fills the form
    assert ann.post(f"/jobs/{bob_job}/cancel", headers=ORIGIN).status_code == 404
    assert ann.post(f"/files/{bob_file}/delete", headers=ORIGIN).status_code == 404
    compared = ann.get(f"/compare?ids={bob_job}").text
    assert "No job of yours" in compared and f'href="/jobs/{bob_job}"' not in compared
    refused = ann.get("/jobs?user=bob")
    assert "only admins" in refused.text and f'data-job="{bob_job}"' not in refused.text
    admin = signed_in(settings, admin_key(settings))
    assert bob_job in admin.get("/jobs").text and bob_job in admin.get("/jobs?user=bob").text
    assert bob_job not in admin.get("/jobs?user=ann").text
    assert admin.get(f"/jobs/{bob_job}").status_code == 200


def test_actions_on_a_job_answer_with_what_happened(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    job_id = client.post("/jobs/new", data={"model": model, "training_file": file_id, "max_steps": "2"},
                         headers=ORIGIN, follow_redirects=False).headers["location"].rsplit("/", 1)[1]
    paused = client.post(f"/jobs/{job_id}/pause", headers=ORIGIN)
    assert paused.status_code == 409 and "nothing to pause" in paused.text  # only a running job pauses
    assert client.post(f"/jobs/{job_id}/explode", headers=ORIGIN).status_code == 404
    cancelled = client.post(f"/jobs/{job_id}/cancel", headers=ORIGIN, follow_redirects=False)
    assert cancelled.status_code == 303 and cancelled.headers["location"] == f"/jobs/{job_id}"
    with api_client(settings, "ann") as api:
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"
    assert client.post(f"/jobs/{job_id}/cancel", headers=ORIGIN).status_code == 409


def test_pages_name_no_path_of_the_server_and_load_nothing_from_elsewhere(env, tmp_path, tiny_model_dir):
    _admin, settings, model = env
    client = signed_in(settings, admin_key(settings))
    file_id = upload(client)
    job_id = client.post("/jobs/new", data={"model": model, "training_file": file_id, "max_steps": "2"},
                         headers=ORIGIN, follow_redirects=False).headers["location"].rsplit("/", 1)[1]
    pages = ["/jobs", "/jobs?fragment=true", "/jobs/new", f"/jobs/{job_id}", f"/jobs/{job_id}?fragment=live",
             f"/jobs/{job_id}?fragment=events", f"/compare?ids={job_id}", "/cluster", "/files", "/models", "/signin",
             f"/jobs/new?like={job_id}", "/jobs?status=nonsense", "/jobs?user=nobody"]
    for path in pages:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:500])
        assert str(tmp_path) not in answer.text and str(tiny_model_dir) not in answer.text, path
        assert not re.search(r'(src|href|action)="(https?:)?//', answer.text), path
        if not path.endswith(("fragment=true", "fragment=live", "fragment=events")):
            assert "default-src 'self'" in answer.headers["content-security-policy"], path
    assert "is not one of" in client.get("/jobs?status=nonsense").text
    assert "no user named" in client.get("/jobs?user=nobody").text
    models = client.get("/models").text
    assert model in models and "safetensors" in models


def test_the_vendored_assets_are_the_released_files():
    manifest = (VENDOR / "MANIFEST").read_text().split("\n")
    listed = {}
    for line in manifest:
        if line.strip() and not line.startswith("#"):
            digest, name, _source = line.split(maxsplit=2)
            listed[name] = digest
    assert set(listed) == {p.name for p in VENDOR.glob("*.js")}
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name


def test_deleting_from_the_lists_says_why_not(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    base = client.post(f"/models/{model}/delete", headers=ORIGIN)
    assert base.status_code == 409 and "registered base model" in base.text
    assert client.post("/models/ft:m::ftjob-nope/delete", headers=ORIGIN).status_code == 404
    file_id = upload(client)
    client.post("/jobs/new", data={"model": model, "training_file": file_id, "max_steps": "2"}, headers=ORIGIN)
    in_use = client.post(f"/files/{file_id}/delete", headers=ORIGIN)
    assert in_use.status_code == 409 and "not finished" in in_use.text  # the queued job trains on it
    assert file_id in client.get("/files").text


def test_behind_a_proxy_changes_come_from_the_public_url(env):
    _admin, settings, _model = env
    proxied = Settings(**{**settings.model_dump(), "public_url": "https://lomo.lab.example"})
    client = browser(proxied)  # the proxy passes Host: testserver; the browser is at lomo.lab.example
    signed = client.post("/signin", data={"key": admin_key(settings)}, headers={"origin": "https://lomo.lab.example"},
                         follow_redirects=False)
    assert signed.status_code == 303 and "Secure" in signed.headers["set-cookie"]
    client.cookies.set("lomo_session", signed.cookies["lomo_session"])
    assert client.post("/v1/files", files={"file": ("x.jsonl", ROWS)},
                       headers={"origin": "https://lomo.lab.example"}).status_code == 200
    assert client.post("/v1/files", files={"file": ("x.jsonl", ROWS)},
                       headers={"origin": "https://other.example"}).status_code == 403


def test_signing_in_again_ends_the_earlier_session_and_a_stray_visit_keeps_the_cookie(env):
    _admin, settings, _model = env
    client = signed_in(settings, user_key(settings, "ann"))
    first = client.cookies["lomo_session"]
    signed_in_again = client.post("/signin", data={"key": user_key(settings, "ann")}, headers=ORIGIN,
                                  follow_redirects=False)
    assert signed_in_again.status_code == 303
    stale = browser(settings)
    stale.cookies.set("lomo_session", first)
    assert stale.get("/v1/fine_tuning/jobs").status_code == 401  # the first session ended with the second sign-in
    visitor = browser(settings)  # no cookie at all: sent to sign in, and no cookie is deleted
    answer = visitor.get("/jobs/ftjob-x", follow_redirects=False)
    assert answer.headers["location"] == "/signin?next=%2Fjobs%2Fftjob-x" and "set-cookie" not in answer.headers
    live = visitor.get("/jobs?fragment=true", headers={"hx-request": "true",
                                                      "hx-current-url": "http://testserver/jobs?status=queued"})
    assert live.status_code == 204 and live.headers["hx-redirect"] == "/signin?next=%2Fjobs%3Fstatus%3Dqueued"


def test_a_form_sent_twice_makes_one_job_and_eval_problems_stay_on_their_row(env):
    _admin, settings, model = env
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    page = client.get("/jobs/new").text
    key = re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1)
    form = {"model": model, "training_file": file_id, "max_steps": "2", "idempotency_key": key}
    first = client.post("/jobs/new", data=form, headers=ORIGIN, follow_redirects=False).headers["location"]
    again = client.post("/jobs/new", data=form, headers=ORIGIN, follow_redirects=False).headers["location"]
    assert first == again
    with api_client(settings, "ann") as api:
        assert len(api.get("/v1/fine_tuning/jobs").json()["data"]) == 1
    rows = {"model": model, "training_file": file_id, "eval_1_task": "boolq", "eval_1_file": "file-nope",
            "eval_2_file": file_id}
    page = client.post("/jobs/new", data=rows, headers=ORIGIN).text
    assert "task" in field_error(page, "eval_2_task")  # a file without its task
    rows.pop("eval_2_file")
    page = client.post("/jobs/new", data=rows, headers=ORIGIN).text
    assert "file-nope" in field_error(page, "eval_1_file") and field_error(page, "eval_0_file") == ""


def test_the_estimate_warns_of_bf16_on_a_cpu_node_that_emulates_it(env):
    _admin, settings, model = env
    from jobs import nodes

    with database(settings.resolved_database_url()).session() as session:
        nodes.register_node(session, "epyc-1", [], cpu_bf16_slowdown=40.0)
    client = signed_in(settings, user_key(settings, "ann"))
    file_id = upload(client)
    page = client.post("/jobs/new/estimate", data={"model": model, "training_file": file_id, "dtype": "bf16"},
                       headers=ORIGIN).text
    assert 'id="estimate-warning"' in page and "set dtype fp32" in page
    assert "emulated, 40x slower than fp32" in client.get("/cluster").text
    fp32 = client.post("/jobs/new/estimate", data={"model": model, "training_file": file_id}, headers=ORIGIN).text
    assert 'id="estimate-warning"' not in fp32
