"""The REST API on SQLite and on Postgres: files, jobs, pagination, cancellation and every kind of error.

No worker runs here: jobs stay queued (the end-to-end tests run them through a real worker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.schemas import BASE_LEARNING_RATE
from jobs.settings import Settings
from tests.conftest import api_client

GOOD = b"".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() + b"\n" for i in range(6))


@pytest.fixture
def settings(tmp_path, database_url, tiny_model_dir):
    return Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[tiny_model_dir.parent],
                    max_upload_bytes=4096, max_example_chars=300)


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


def upload(client, content: bytes = GOOD, name: str = "train.jsonl", **data):
    return client.post("/v1/files", files={"file": (name, content)}, data=data)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture
def file_id(client):
    return upload(client).json()["id"]


def create(client, model, file_id, **fields):
    """Submit a job; ``model`` is a name, or a folder under one of the settings' model_dirs (named by its name)."""
    name = model.name if isinstance(model, Path) else model
    return client.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": file_id, **fields})


# ---------------------------------------------------------------------------------------------- files
def test_upload_list_get_delete(client, settings):
    made = upload(client).json()
    assert made["object"] == "file" and made["records"] == 6 and made["format"] == "instruct"
    assert made["bytes"] == len(GOOD) and made["id"].startswith("file-")
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [made["id"]]
    assert client.get(f"/v1/files/{made['id']}").json() == made
    stored = list((settings.data_dir / "files").iterdir())
    assert len(stored) == 1 and stored[0].read_bytes() == GOOD
    assert client.delete(f"/v1/files/{made['id']}").json() == {"object": "file", "id": made["id"], "deleted": True}
    assert error_of(client.get(f"/v1/files/{made['id']}"), 404)["code"] == "file_not_found"
    assert client.get("/v1/files").json()["data"] == []
    assert list((settings.data_dir / "files").iterdir()) == []


def test_upload_reports_every_bad_line(client, settings):
    lines = [
        json.dumps({"prompt": "fine", "response": "ok"}),
        '{"prompt": "broken"',
        json.dumps({"prompt": "no answer"}),
        json.dumps({"prompt": "empty", "response": "  "}),
        json.dumps({"prompt": "long", "response": "x" * 400}),
        json.dumps(["not", "an", "object"]),
    ]
    error = error_of(upload(client, "\n".join(lines).encode()), 422)
    assert error["code"] == "invalid_file" and error["param"] == "file"
    found = {d["line"]: d["message"] for d in error["details"]}
    assert set(found) == {2, 3, 4, 5, 6}
    assert "invalid JSON" in found[2]
    assert "missing field 'response'" in found[3]
    assert "'response' is empty" in found[4]
    assert "over the limit of 300" in found[5]
    assert "expected a JSON object" in found[6]
    assert error["message"].startswith("file: line 2:")
    # nothing of a refused upload is kept
    assert client.get("/v1/files").json()["data"] == []
    assert not any((settings.data_dir / "files").glob("*")) and not any((settings.data_dir / "uploads").glob("*"))


@pytest.mark.parametrize("name, content, needle", [
    ("train.csv", GOOD, "expected a .jsonl, .json or .txt"),
    ("train.jsonl", b"", "is empty"),
    ("train.jsonl", b"\n\n", "no records"),
    ("train.json", b'[{"prompt": "a", "response": "b"},', "invalid JSON"),
    ("train.jsonl", b"\xff\xfe{}", "not UTF-8"),
])
def test_unusable_files_are_refused_with_the_reason(client, name, content, needle):
    error = error_of(upload(client, content, name), 422)
    assert needle in error["message"] and error["param"] == "file"


def test_upload_over_the_size_limit_is_413(client):
    error = error_of(upload(client, GOOD * 20), 413)
    assert error["code"] == "too_large" and "4096" in error["message"]
    assert client.get("/v1/files").json()["data"] == []


def test_bad_purpose_and_missing_file_name_the_field(client):
    assert error_of(upload(client, purpose="pretrain"), 422)["param"] == "purpose"
    assert error_of(client.post("/v1/files", data={"purpose": "fine-tune"}), 415)["param"] == "file"  # no multipart


def test_text_and_chat_files_are_accepted(client):
    assert upload(client, b"first doc\nline\n\nsecond doc\n", "c.txt").json()["records"] == 2
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert upload(client, chat.encode(), "c.jsonl").json()["format"] == "instruct"


# ---------------------------------------------------------------------------------------------- jobs
def test_create_job_returns_the_resolved_job(client, tiny_model_dir, file_id):
    method = {"type": "supervised", "supervised": {"hyperparameters": {
        "optimizer": "adalomo", "learning_rate_multiplier": 2, "n_epochs": 3, "max_steps": 5, "dtype": "bf16"}}}
    response = create(client, tiny_model_dir, file_id, method=method, suffix="v1", metadata={"team": "nlp"}, seed=7)
    job = response.json()
    assert response.status_code == 200, job
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["optimizer"] == "adalomo" and job["training_file"] == file_id
    hyper = job["hyperparameters"]
    assert hyper["learning_rate_multiplier"] == 2 and hyper["lr"] == 2 * BASE_LEARNING_RATE["adalomo"]
    assert hyper["n_epochs"] == 3 and "epochs" not in hyper and hyper["dtype"] == "bf16" and job["seed"] == 7
    assert hyper["batch_size"] == 4  # defaults are filled in and shown
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    assert job["metadata"] == {"team": "nlp"} and job["suffix"] == "v1" and job["priority"] == 0
    assert job["progress"] == {"step": 0, "total_steps": None, "fraction": None} and job["error"] is None
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any("job created" in e["message"] for e in events)


def test_integrations_are_stored_echoed_and_said_to_be_inactive(client, tiny_model_dir, file_id):
    wandb = {"type": "wandb", "wandb": {"project": "lomo", "entity": None, "name": "run-1", "tags": ["a"]}}
    job = create(client, tiny_model_dir, file_id, integrations=[wandb]).json()
    assert job["integrations"] == [wandb]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any(e["level"] == "warn" and "sends nothing to wandb" in e["message"] for e in events)


def test_a_queued_job_cannot_pause_or_resume_and_the_sdk_is_told_not_to_retry(client, tiny_model_dir, file_id):
    job_id = create(client, tiny_model_dir, file_id).json()["id"]
    for action, code in (("pause", "not_running"), ("resume", "not_paused")):
        response = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")
        assert response.status_code == 409 and response.headers["x-should-retry"] == "false"
        assert response.json()["error"]["code"] == code
    assert error_of(client.post("/v1/fine_tuning/jobs/ftjob-missing/pause"), 404)["code"] == "job_not_found"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"  # nothing changed


def test_a_registered_model_name_resolves(client, tiny_model_dir, file_id):
    assert create(client, tiny_model_dir.name, file_id).json()["model"] == tiny_model_dir.name


@pytest.mark.parametrize("fields, param, needle", [
    ({"hyperparameters": {"lr": -1}}, "hyperparameters.lr", "greater than 0"),
    ({"hyperparameters": {"batch_size": "many"}}, "hyperparameters.batch_size", "whole number"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "at least 1"),
    ({"hyperparameters": {"n_epochs": "all"}}, "hyperparameters.n_epochs", "auto"),
    ({"hyperparameters": {"learning_rate_multiplier": -2}}, "hyperparameters.learning_rate_multiplier",
     "greater than 0"),
    ({"hyperparameters": {"learning_rate_multiplier": 2, "lr": 0.1}}, "hyperparameters", "not both"),
    ({"hyperparameters": {"learning_rate": 1}}, "hyperparameters.learning_rate", "not permitted"),
    ({"hyperparameters": {"dtype": "fp8"}}, "hyperparameters.dtype", "fp32"),
    ({"hyperparameters": {"optimizer": "sgd", "dtype": "fp16"}}, "hyperparameters.dtype", "loss scaling"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"optimizer": "sgd", "dtype": "fp16"}}}},
     "method.supervised.hyperparameters.dtype", "loss scaling"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 0}}}},
     "method.supervised.hyperparameters.max_steps", "greater than or equal to 1"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
      "hyperparameters": {"n_epochs": 2}}, None, "not both"),
    ({"hyperparameters": {"optimizer": "rmsprop"}}, "hyperparameters.optimizer", "lomo"),
    ({"method": "lomo"}, "method", "hyperparameters.optimizer"),
    ({"method": {"type": "dpo"}}, "method", "supervised"),
    ({"method": {"type": "supervised", "supervised": {"extra": 1}}}, "method.supervised.extra", "not permitted"),
    ({"integrations": [{"type": "slack"}]}, "integrations.0.type", "wandb"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"training_file": "file-nope"}, "training_file", "no uploaded file"),
    ({"validation_file": "file-nope"}, "validation_file", "no uploaded file"),
    ({"model": "/no/such/model"}, "model", "not a path"),
    ({"model": "no-such-model"}, "model", "neither a registered model"),
    ({"model": ""}, "model", "at least 1"),
    ({"suffix": "has space"}, "suffix", "pattern"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
    ({"unknown": 1}, "unknown", "not permitted"),
    ({"hyperparameters": {"optimizer": "sgd"}, "gpus": 2}, "gpus", "lomo or adalomo"),
    ({"gpus": 0}, "gpus", "greater than or equal to 1"),
    ({"priority": 101}, "priority", "less than or equal to 100"),
])
def test_bad_job_requests_are_422_naming_the_field(client, tiny_model_dir, file_id, fields, param, needle):
    body = {"model": tiny_model_dir.name, "training_file": file_id, **fields}
    error = error_of(client.post("/v1/fine_tuning/jobs", json=body), 422)
    assert error["param"] == param, error
    assert needle in error["message"], error
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing half-made


def test_malformed_bodies_never_give_a_500(client):
    for content, headers in [(b"{not json", {"content-type": "application/json"}), (b"[]", {}),
                             (b"null", {"content-type": "application/json"}), (b"\xff", {})]:
        response = client.post("/v1/fine_tuning/jobs", content=content, headers=headers)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"]
    assert error_of(client.get("/v1/fine_tuning/jobs?limit=0"), 422)["param"] == "limit"
    assert error_of(client.get("/v1/fine_tuning/jobs?status=done"), 422)["param"] == "status"
    assert error_of(client.get("/v1/fine_tuning/jobs?after=ftjob-nope"), 422)["param"] == "after"
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"


def test_cursors_out_of_range_name_the_parameter(client, tiny_model_dir, file_id):
    job_id = create(client, tiny_model_dir, file_id).json()["id"]
    huge = "9" * 30
    for path, prefix in (("events", "ftevent-"), ("checkpoints", "ftckpt-"), ("evals", "fteval-")):
        for after in (prefix + huge, huge, "nonsense"):
            error = error_of(client.get(f"/v1/fine_tuning/jobs/{job_id}/{path}", params={"after": after}), 422)
            assert error["param"] == "after", (path, error)
    assert error_of(client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"after_step": huge}), 422)[
        "param"] == "after_step"


@pytest.mark.parametrize("path", ["", "/events", "/checkpoints", "/metrics", "/memory", "/evals"])
def test_unknown_job_ids_are_404(client, path):
    error = error_of(client.get(f"/v1/fine_tuning/jobs/ftjob-missing{path}"), 404)
    assert error["code"] == "job_not_found" and "ftjob-missing" in error["message"]


def test_cursor_pagination_and_filters(client, tiny_model_dir, file_id):
    ids = [create(client, tiny_model_dir, file_id, metadata={"parity": "even" if i % 2 == 0 else "odd"}).json()["id"]
           for i in range(5)]
    seen, after, pages = [], None, 0
    while True:
        page = client.get("/v1/fine_tuning/jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1] and pages == 3  # newest first, each job exactly once
    even = client.get("/v1/fine_tuning/jobs", params={"metadata[parity]": "even"}).json()["data"]
    assert [j["id"] for j in even] == [ids[4], ids[2], ids[0]]
    client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel")
    cancelled = client.get("/v1/fine_tuning/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert len(client.get("/v1/fine_tuning/jobs", params={"status": "queued"}).json()["data"]) == 4


def test_cancel_a_queued_job_and_the_file_becomes_deletable(client, tiny_model_dir, file_id):
    job = create(client, tiny_model_dir, file_id).json()
    error = error_of(client.delete(f"/v1/files/{file_id}"), 409)
    assert job["id"] in error["message"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = error_of(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409)
    assert "already cancelled" in again["message"]
    assert error_of(client.post("/v1/fine_tuning/jobs/ftjob-x/cancel"), 404)["code"] == "job_not_found"
    assert client.delete(f"/v1/files/{file_id}").status_code == 200
    # the finished job still names its file, and its own record is intact
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["training_file"] == file_id


def test_a_new_job_has_empty_results(client, tiny_model_dir, file_id):
    job_id = create(client, tiny_model_dir, file_id).json()["id"]
    base = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(base + "/metrics").json() == {"object": "list", "data": [], "has_more": False}
    assert client.get(base + "/checkpoints").json()["data"] == []
    assert client.get(base + "/evals").json()["data"] == []
    memory = client.get(base + "/memory").json()
    assert memory["measured"] == [] and memory["samples"] == 0


def test_openapi_documents_the_routes(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/v1/files", "/v1/files/{file_id}", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}",
                 "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/fine_tuning/jobs/{job_id}/events",
                 "/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/fine_tuning/jobs/{job_id}/metrics",
                 "/v1/fine_tuning/jobs/{job_id}/memory", "/v1/fine_tuning/jobs/{job_id}/evals"]:
        assert path in paths


# ---------------------------------------------------------------------------------------------- memory
def llama_folder(root, name, **sizes):
    folder = root / name
    folder.mkdir()
    config = {"model_type": "llama", "vocab_size": 32000, "torch_dtype": "float16", **sizes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def gpu_node(tmp_path, database_url):
    """A deployment that declares a node of 8 x 24 GiB GPUs, and configs of the paper's LLaMA sizes."""
    models = tmp_path / "models"
    models.mkdir()
    llama_folder(models, "llama-7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32)
    llama_folder(models, "llama-13b", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                 num_attention_heads=40)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[models],
                        gpu_memory_gib=[24] * 8)
    with api_client(settings) as c:
        yield c, upload(c).json()["id"]


PAPER = {"dtype": "fp16", "batch_size": 1, "max_seq_len": 512, "gradient_checkpointing": True}


def test_estimates_answer_before_a_job_exists(gpu_node):
    client, file_id = gpu_node
    body = {"model": "llama-13b", "training_file": file_id, "hyperparameters": PAPER}
    answer = client.post("/v1/estimates", json=body).json()
    assert answer["object"] == "estimate" and answer["fits"] is True and answer["gpus"] == 2
    assert answer["device"] == "cuda" and answer["devices"] == 8 and answer["parameters"] > 13e9
    assert answer["per_device"]["peak_bytes"] <= 24 * 1024**3
    # fp16 parameters (2 bytes each) split over the 2 GPUs
    assert answer["per_device"]["parameters_bytes"] == pytest.approx(answer["parameters"], rel=1e-6)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created
    error = error_of(client.post("/v1/estimates", json={**body, "hyperparameters": {"lr": 0}}), 422)
    assert error["param"] == "hyperparameters.lr"


def test_a_job_that_cannot_fit_is_refused_with_the_figures(gpu_node):
    client, file_id = gpu_node
    body = {"model": "llama-7b", "training_file": file_id,
            "hyperparameters": {**PAPER, "optimizer": "adamw", "dtype": "bf16"}}
    error = error_of(client.post("/v1/fine_tuning/jobs", json=body), 422)
    assert error["code"] == "insufficient_memory" and error["param"] == "model"
    assert "GiB per device on 1 device(s); each has 24.00 GiB" in error["message"]
    assert "LOMO needs 1 device" in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_jobs_store_their_prediction_and_a_pinned_count_is_warned(gpu_node):
    client, file_id = gpu_node
    job = create(client, "llama-13b", file_id, hyperparameters=PAPER).json()
    assert job["predicted_memory"]["gpus"] == 2 and job["predicted_memory"]["fits"] is True
    memory = client.get(f"/v1/fine_tuning/jobs/{job['id']}/memory").json()
    assert memory["predicted"]["per_device"]["peak_bytes"] == job["predicted_memory"]["per_device"]["peak_bytes"]
    assert job["gpus"] == 2  # the count the memory model chose
    too_many = error_of(create(client, "llama-13b", file_id, hyperparameters=PAPER, gpus=16), 422)
    assert too_many["param"] == "gpus" and "16 GPUs asked for; the nodes of this deployment have 8 GPUs" in \
        too_many["message"]
    pinned = create(client, "llama-13b", file_id, hyperparameters=PAPER, gpus=1).json()
    assert pinned["status"] == "queued" and pinned["predicted_memory"]["fits"] is False
    events = client.get(f"/v1/fine_tuning/jobs/{pinned['id']}/events").json()["data"]
    assert any(e["level"] == "warn" and "predicted memory" in e["message"] for e in events)


def test_with_no_gpus_declared_the_api_places_jobs_on_the_gpus_its_workers_registered(tmp_path, database_url):
    from jobs import nodes
    from jobs.db import database

    models = tmp_path / "models"
    models.mkdir()
    llama_folder(models, "llama-13b", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                 num_attention_heads=40)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[models])
    with api_client(settings) as client:
        body = {"model": "llama-13b", "training_file": upload(client).json()["id"], "hyperparameters": PAPER}
        assert client.post("/v1/estimates", json=body).json()["device"] == "cpu"  # no GPU node known yet
        with database(database_url).session() as s:  # what `lomo worker` does at start on two nodes
            nodes.register_node(s, "small-node", [80.0])
            nodes.register_node(s, "gpu-node", [24.0] * 4)
        answer = client.post("/v1/estimates", json=body).json()
        assert answer["device"] == "cuda" and answer["devices"] == 4 and answer["gpus"] == 2
        assert answer["device_bytes"] == 24 * 1024**3
        error = error_of(client.post("/v1/fine_tuning/jobs", json={**body, "gpus": 8}), 422)
        assert error["param"] == "gpus" and "the nodes of this deployment have 4, 1 GPUs" in error["message"]
        with database(database_url).session() as s:  # a second node of 4: 8 GPUs are two nodes' 4 each
            nodes.register_node(s, "gpu-node-2", [24.0] * 4)
        assert client.post("/v1/fine_tuning/jobs", json={**body, "gpus": 8}).status_code == 200


BOOLQ = b"".join(json.dumps({"question": f"is it {i}", "passage": f"it is {i}.", "label": i % 2 == 0, "idx": i})
                 .encode() + b"\n" for i in range(4))


def test_a_job_asks_for_evaluations_on_uploaded_eval_files(client, tiny_model_dir, file_id):
    refused = error_of(upload(client, BOOLQ, "boolq.jsonl"), 422)  # not training data...
    assert refused["code"] == "invalid_file"
    eval_file = upload(client, BOOLQ, "boolq.jsonl", purpose="eval").json()  # ...but an evaluation file
    assert eval_file["purpose"] == "eval"
    evals = [{"task": "boolq", "file": eval_file["id"], "limit": 2}]
    job = create(client, tiny_model_dir, file_id, evals=evals).json()
    assert job["evals"] == [{"task": "boolq", "file": eval_file["id"], "limit": 2, "num_fewshot": 0,
                             "fewshot_file": None, "at_checkpoints": False}]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["evals"] == job["evals"]
    # an evaluation file was not checked as training data: it cannot be one
    wrong = error_of(create(client, tiny_model_dir, eval_file["id"]), 422)
    assert wrong["param"] == "training_file" and "purpose 'eval'" in wrong["message"]


def test_a_bad_evaluation_is_refused_at_submission_naming_the_task_or_the_line(client, tiny_model_dir, file_id):
    unknown = error_of(create(client, tiny_model_dir, file_id, evals=[{"task": "hellaswag", "file": file_id}]), 422)
    assert unknown["param"] == "evals[0].task" and "'hellaswag'" in unknown["message"] and "boolq" in unknown["message"]
    lines = BOOLQ.splitlines()
    broken = lines[0] + b"\n" + json.dumps({"question": "q", "label": True}).encode() + b"\n" + b"{oops\n"
    bad = upload(client, broken, "bad.jsonl", purpose="eval")
    error = error_of(bad, 422)  # bad JSON is caught at upload, with its line
    assert "line 3" in error["message"]
    missing = upload(client, lines[0] + b"\n" + json.dumps({"question": "q", "label": True}).encode() + b"\n",
                     "missing.jsonl", purpose="eval").json()["id"]
    answer = client.post("/v1/fine_tuning/jobs", json={
        "model": tiny_model_dir.name, "training_file": file_id,
        "evals": [{"task": "copa", "file": missing}, {"task": "boolq", "file": missing}]})
    error = error_of(answer, 422)
    problems = [error, *error.get("details", [])]
    params = {p["param"] for p in problems}
    assert {"evals[0].file", "evals[1].file"} <= params
    text = " ".join(p["message"] for p in problems)
    assert "line 2" in text and "passage" in text and missing in text
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created
    few = error_of(create(client, tiny_model_dir, file_id,
                          evals=[{"task": "boolq", "file": file_id, "num_fewshot": 2}]), 422)
    assert few["param"].startswith("evals[0].")


def test_a_jobs_result_file_is_not_training_data(client, settings, tiny_model_dir):
    from jobs import files
    from jobs.db import database

    with database(settings.resolved_database_url()).session() as s:
        result = files.store_result_file(s, settings, settings.default_user, "m.csv", b"step,train_loss\n1,2.0\n")
    error = error_of(create(client, tiny_model_dir, result.id), 422)
    assert error["param"] == "training_file" and "not training data" in error["message"]
