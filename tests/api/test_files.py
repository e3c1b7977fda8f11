"""``/v1/files`` on SQLite and Postgres: OpenAI's file object, paging, content, result files, the
streamed multipart upload (size limit, errors, idempotency), uploads off the event loop, deleting a
file a job's evaluation names; and the official ``openai`` SDK against a live server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from api.app import bootstrap_admin_key, create_app
from jobs import files
from jobs.db import database
from jobs.migrate import upgrade
from jobs.settings import Settings
from tests.conftest import admin_key, api_client, create_postgres_database, drop_postgres_database
from tests.e2e.live_service import api_in_thread

GOOD = b"".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() + b"\n" for i in range(6))
BOOLQ = b"".join(json.dumps({"question": f"is it {i}", "passage": f"it is {i}.", "label": i % 2 == 0, "idx": i})
                 .encode() + b"\n" for i in range(4))
LIMIT = 4096
BOUNDARY = "lomo-test-boundary"


@pytest.fixture
def settings(tmp_path, database_url, tiny_model_dir):
    return Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[tiny_model_dir.parent],
                    max_upload_bytes=LIMIT)


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


@pytest.fixture
def sqlite_settings(tmp_path):
    """For the tests that drive the ASGI app directly (no lifespan): migrated by hand, SQLite only."""
    url = f"sqlite:///{tmp_path / 'test.db'}"
    settings = Settings(data_dir=tmp_path / "var", database_url=url, max_upload_bytes=LIMIT)
    upgrade(url)
    bootstrap_admin_key(settings, database(url))  # what the lifespan does: the admin key these tests send
    yield settings
    from jobs.db import close_database

    close_database(url)


def upload(client, content: bytes = GOOD, name: str = "train.jsonl", headers=None, **data):
    return client.post("/v1/files", files={"file": (name, content)}, data=data, headers=headers)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def multipart(content: bytes, name: str = "train.jsonl", purpose: str | None = None) -> bytes:
    head = b""
    if purpose is not None:
        head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n").encode()
    return (head + f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode())


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def authorized(settings) -> dict[str, str]:
    """The multipart headers with the local admin's key."""
    return {**MULTIPART, "Authorization": f"Bearer {admin_key(settings)}"}


def leftovers(settings) -> list:
    return [p for folder in ("uploads", "files") if (settings.data_dir / folder).exists()
            for p in (settings.data_dir / folder).iterdir()]


# ---------------------------------------------------------------------------------------------- shape
def test_a_file_has_openai_fields(client):
    made = upload(client).json()
    assert made["object"] == "file" and made["status"] == "processed"
    assert made["status_details"] is None and made["expires_at"] is None
    assert made["bytes"] == len(GOOD) and made["filename"] == "train.jsonl" and made["purpose"] == "fine-tune"
    assert made["records"] == 6 and made["format"] == "instruct" and isinstance(made["created_at"], int)
    assert client.get(f"/v1/files/{made['id']}").json() == made


def test_list_pages_by_cursor_in_either_order_and_by_purpose(client):
    ids = [upload(client).json()["id"] for _ in range(3)]
    ids.append(upload(client, BOOLQ, "b.jsonl", purpose="eval").json()["id"])
    everything = client.get("/v1/files").json()
    newest_first = [f["id"] for f in everything["data"]]
    assert sorted(newest_first) == sorted(ids) and everything["has_more"] is False
    assert everything["first_id"] == newest_first[0] and everything["last_id"] == newest_first[-1]

    first = client.get("/v1/files", params={"limit": 3}).json()
    assert [f["id"] for f in first["data"]] == newest_first[:3] and first["has_more"] is True
    rest = client.get("/v1/files", params={"limit": 3, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == newest_first[3:] and rest["has_more"] is False

    oldest_first = [f["id"] for f in client.get("/v1/files", params={"order": "asc"}).json()["data"]]
    assert oldest_first == newest_first[::-1]
    page = client.get("/v1/files", params={"order": "asc", "limit": 2, "after": oldest_first[1]}).json()
    assert [f["id"] for f in page["data"]] == oldest_first[2:]

    evals = client.get("/v1/files", params={"purpose": "eval"}).json()["data"]
    assert [f["id"] for f in evals] == [ids[3]]

    # a file deleted since still marks its place; an id never seen is refused, naming `after`
    assert client.delete(f"/v1/files/{newest_first[1]}").status_code == 200
    after_deleted = client.get("/v1/files", params={"after": newest_first[1]}).json()["data"]
    assert [f["id"] for f in after_deleted] == newest_first[2:]
    assert error_of(client.get("/v1/files", params={"after": "file-nope"}), 422)["param"] == "after"
    for bad in ({"limit": 0}, {"limit": 10001}, {"order": "sideways"}):
        assert error_of(client.get("/v1/files", params=bad), 422)["param"] in bad
    empty = client.get("/v1/files", params={"purpose": "nothing"}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


# ---------------------------------------------------------------------------------------------- content
def test_content_is_the_stored_bytes_with_the_original_name_for_the_owner_only(client, settings):
    made = upload(client, name="données du jour.jsonl").json()
    response = client.get(f"/v1/files/{made['id']}/content")
    assert response.status_code == 200 and response.content == GOOD
    assert response.headers["content-length"] == str(len(GOOD))
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment; ") and "filename*=utf-8''donn%C3%A9es%20du%20jour.jsonl" in disposition
    plain = upload(client, name="plain.jsonl").json()
    assert client.get(f"/v1/files/{plain['id']}/content").headers["content-disposition"] == \
        'attachment; filename="plain.jsonl"'
    # no answer names where the server keeps the file
    for answer in (response, client.get(f"/v1/files/{made['id']}"), client.get("/v1/files")):
        assert str(settings.data_dir) not in answer.text + json.dumps(dict(answer.headers))
        assert "files/" not in answer.text
    # another caller, an unknown id and a deleted file: all 404 like an unknown id
    with api_client(settings, user="bob") as bob:
        assert error_of(bob.get(f"/v1/files/{made['id']}/content"), 404)["code"] == "file_not_found"
    assert error_of(client.get("/v1/files/file-nope/content"), 404)["code"] == "file_not_found"
    client.delete(f"/v1/files/{made['id']}")
    assert error_of(client.get(f"/v1/files/{made['id']}/content"), 404)["code"] == "file_not_found"


def test_a_result_file_is_stored_without_the_training_check_and_served(client, settings):
    csv = b"step,train_loss\n1,2.5\n2,2.1\n"
    with database(settings.resolved_database_url()).session() as s:
        row = files.store_result_file(s, settings, settings.default_user, "step_metrics.csv", csv)
    listed = client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"]
    assert [(f["id"], f["records"], f["format"], f["bytes"]) for f in listed] == [(row.id, 2, "csv", len(csv))]
    assert client.get(f"/v1/files/{row.id}/content").content == csv
    # ...but nobody uploads one: the purposes of an upload are listed when another is asked for
    for purpose in ("fine-tune-results", "assistants"):
        error = error_of(upload(client, purpose=purpose), 422)
        assert error["param"] == "purpose" and "'fine-tune'" in error["message"] and "'eval'" in error["message"]
    assert leftovers(settings) == [settings.data_dir / row.storage_path]


# ---------------------------------------------------------------------------------------------- upload
def test_a_chunked_upload_over_the_limit_is_stopped_as_soon_as_it_is_over(sqlite_settings):
    """No Content-Length: the body is read part by part and refused at the limit, not parsed whole."""
    sent = 0

    async def body():
        nonlocal sent
        head = multipart(b"")[: -len(f"\r\n--{BOUNDARY}--\r\n")]
        yield head
        chunk = b'{"prompt": "p", "response": "r"}\n' * 1927  # 64 KiB
        for _ in range(320):  # 20 MiB if read to the end
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    async def go():
        transport = httpx.ASGITransport(app=create_app(sqlite_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            request = c.build_request("POST", "/v1/files", content=body(), headers=authorized(sqlite_settings))
            assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
            return await c.send(request)

    response = asyncio.run(go())
    error = error_of(response, 413)
    assert error["code"] == "too_large" and error["param"] == "file" and str(LIMIT) in error["message"]
    assert sent <= 1 << 17, f"{sent} bytes were read before the refusal"
    assert leftovers(sqlite_settings) == []


def test_a_chunked_upload_split_anywhere_is_parsed_and_kept(sqlite_settings):
    raw = multipart(GOOD, purpose="fine-tune")

    async def body():
        for start in range(0, len(raw), 7):
            yield raw[start:start + 7]

    async def go():
        transport = httpx.ASGITransport(app=create_app(sqlite_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/files", content=body(), headers=authorized(sqlite_settings))

    made = asyncio.run(go())
    assert made.status_code == 200, made.text
    assert made.json()["records"] == 6 and made.json()["bytes"] == len(GOOD)
    assert not any((sqlite_settings.data_dir / "uploads").iterdir())


@pytest.mark.parametrize("body, headers", [(b'{"file": "x"}', {"Content-Type": "application/json"}), (b"", {})])
def test_an_upload_that_is_not_multipart_is_415(client, settings, body, headers):
    error = error_of(client.post("/v1/files", content=body, headers=headers), 415)
    assert error["param"] == "file" and "must be multipart/form-data" in error["message"], error
    assert leftovers(settings) == []


@pytest.mark.parametrize("name", ["a" * 300 + ".jsonl", "bad\x01name.jsonl", "nul\x00.jsonl"])
def test_an_upload_name_too_long_or_with_control_characters_is_422(client, settings, name):
    error = error_of(client.post("/v1/files", content=multipart(GOOD, name), headers=MULTIPART), 422)
    assert error["param"] == "file" and "at most 255 characters" in error["message"]
    assert leftovers(settings) == [] and client.get("/v1/files").json()["data"] == []


def test_a_json_route_given_another_kind_of_body_is_415(client):
    answer = client.post("/v1/fine_tuning/jobs", content=b'{"model": "x"}', headers={"Content-Type": "text/plain"})
    error = error_of(answer, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


@pytest.mark.parametrize("body, headers, param, needle", [
    (multipart(GOOD), {"Content-Type": "multipart/form-data"}, None, "no boundary"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\neval\r\n--{BOUNDARY}--\r\n".encode(),
     MULTIPART, "file", "required"),
    (multipart(GOOD)[:-20], MULTIPART, None, "closing boundary"),
    (b"not multipart at all", MULTIPART, None, "not valid multipart"),
    (multipart(GOOD, purpose="pretrain"), MULTIPART, "purpose", "must be one of 'fine-tune', 'eval'"),
    (multipart(GOOD)[: -len(f"--{BOUNDARY}--\r\n")] + multipart(GOOD), MULTIPART, "file", "only one file"),
])
def test_a_bad_upload_body_is_422_saying_why(client, settings, body, headers, param, needle):
    error = error_of(client.post("/v1/files", content=body, headers=headers), 422)
    assert error["param"] == param and needle in error["message"], error
    assert leftovers(settings) == []


def test_a_retried_upload_with_its_idempotency_key_returns_the_first_file(client, settings):
    first = upload(client, headers={"Idempotency-Key": "k-1"}).json()
    again = upload(client, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json() == first
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [first["id"]]
    assert len(leftovers(settings)) == 1  # one stored file, nothing left in uploads
    other = upload(client, headers={"Idempotency-Key": "k-2"}).json()
    assert other["id"] != first["id"]
    with api_client(settings, user="bob") as bob:  # keys are per caller
        assert upload(bob, headers={"Idempotency-Key": "k-1"}).json()["id"] not in (first["id"], other["id"])
    assert error_of(upload(client, headers={"Idempotency-Key": "k" * 256}), 422)["param"] == "Idempotency-Key"
    # a refused upload keeps no key: the same key with a good file then succeeds
    assert error_of(upload(client, b"{", headers={"Idempotency-Key": "k-3"}), 422)["code"] == "invalid_file"
    assert upload(client, headers={"Idempotency-Key": "k-3"}).status_code == 200


def test_health_answers_while_an_upload_is_being_checked(sqlite_settings, monkeypatch):
    """The check runs in a worker thread: the event loop keeps serving other requests meanwhile."""
    check_seconds = 2.0
    started: list[float] = []
    real_check = files.check_file

    def slow_check(*args, **kwargs):
        started.append(time.monotonic())
        time.sleep(check_seconds)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(files, "check_file", slow_check)

    async def go():
        transport = httpx.ASGITransport(app=create_app(sqlite_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30,
                                     headers={"Authorization": f"Bearer {admin_key(sqlite_settings)}"}) as c:
            upload_task = asyncio.create_task(c.post("/v1/files", files={"file": ("t.jsonl", GOOD)}))
            while not started:
                await asyncio.sleep(0.005)
            health = await c.get("/health")
            answered = time.monotonic()
            still_checking = not upload_task.done()
            return health, answered - started[0], still_checking, await upload_task

    health, waited, still_checking, uploaded = asyncio.run(go())
    assert health.status_code == 200 and uploaded.status_code == 200, uploaded.text
    assert waited < check_seconds / 2 and still_checking, f"/health answered {waited:.2f}s after the check began"


# ---------------------------------------------------------------------------------------------- delete
def test_a_file_an_unfinished_jobs_evaluation_names_cannot_be_deleted(client, tiny_model_dir):
    training = upload(client).json()["id"]
    scored = upload(client, BOOLQ, "boolq.jsonl", purpose="eval").json()["id"]
    shots = upload(client, BOOLQ, "shots.jsonl", purpose="eval").json()["id"]
    evals = [{"task": "boolq", "file": scored, "limit": 2, "num_fewshot": 1, "fewshot_file": shots}]
    created = client.post("/v1/fine_tuning/jobs", json={"model": tiny_model_dir.name, "training_file": training,
                                                        "evals": evals})
    assert created.status_code == 200, created.text
    job = created.json()["id"]
    for ident in (scored, shots, training):
        error = error_of(client.delete(f"/v1/files/{ident}"), 409)
        assert error["code"] == "conflict" and job in error["message"]
    assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel").json()["status"] == "cancelled"
    for ident in (scored, shots, training):
        assert client.delete(f"/v1/files/{ident}").json() == {"object": "file", "id": ident, "deleted": True}


# ---------------------------------------------------------------------------------------------- the SDK
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live_server(request, tmp_path_factory):
    """One uvicorn server per module and database, in a thread, on a free port of 127.0.0.1."""
    folder = tmp_path_factory.mktemp(f"live-{request.param}")
    url = f"sqlite:///{folder / 'test.db'}" if request.param == "sqlite" else create_postgres_database()
    settings = Settings(data_dir=folder / "var", database_url=url, max_upload_bytes=1 << 20)
    with api_in_thread(settings) as base:
        yield f"{base}/v1", settings
    if request.param == "postgres":
        drop_postgres_database(url)
    else:
        from jobs.db import close_database

        close_database(url)


@pytest.fixture
def sdk(live_server):
    """An ``openai.OpenAI`` client of the live server; the files a test leaves are deleted after it."""
    base_url, settings = live_server
    client = openai.OpenAI(base_url=base_url, api_key=admin_key(settings), max_retries=0, timeout=30)
    yield client
    for f in list(client.files.list()):
        client.files.delete(f.id)
    client.close()


def test_the_openai_sdk_uploads_lists_reads_and_deletes_files(sdk):
    made = [sdk.files.create(file=(f"train{i}.jsonl", GOOD), purpose="fine-tune") for i in range(3)]
    assert all(f.object == "file" and f.status == "processed" and f.bytes == len(GOOD) for f in made)
    assert sdk.files.retrieve(made[0].id).filename == "train0.jsonl"
    assert made[0].model_extra["records"] == 6  # our own fields come through

    page = sdk.files.list(limit=1)
    assert len(page.data) == 1 and page.has_more is True
    paged = [f.id for f in page]  # auto-paging: after=<last id>, one file a page
    assert sorted(paged) == sorted(f.id for f in made) and len(set(paged)) == 3
    assert paged == [f.id for f in sdk.files.list()]
    assert [f.id for f in sdk.files.list(order="asc")] == paged[::-1]

    scored = sdk.files.create(file=("boolq.jsonl", BOOLQ), purpose="eval")  # type: ignore[arg-type]
    assert [f.id for f in sdk.files.list(purpose="eval")] == [scored.id]
    assert sdk.files.content(made[1].id).read() == GOOD

    deleted = sdk.files.delete(made[1].id)
    assert deleted.deleted is True and deleted.id == made[1].id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(made[1].id)


def test_the_openai_sdk_gets_a_bad_file_refused_naming_the_line(sdk):
    bad = GOOD + b'{"prompt": "broken"\n'
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert refused.value.body["param"] == "file" and "line 7" in refused.value.body["message"]
    assert "line 7" in str(refused.value)
    with pytest.raises(openai.UnprocessableEntityError) as wrong:
        sdk.files.create(file=("train.jsonl", GOOD), purpose="assistants")
    assert wrong.value.body["param"] == "purpose"
    assert list(sdk.files.list()) == []


def test_the_openai_sdk_retry_with_an_idempotency_key_makes_one_file(sdk):
    key = {"Idempotency-Key": "sdk-retry-1"}
    first = sdk.files.create(file=("train.jsonl", GOOD), purpose="fine-tune", extra_headers=key)
    second = sdk.files.create(file=("train.jsonl", GOOD), purpose="fine-tune", extra_headers=key)
    assert second.id == first.id and [f.id for f in sdk.files.list()] == [first.id]
