"""``/v1/models`` and fine-tuned models as job references: names (never paths), listing, retrieval, deletion,
the model's files as a tar archive, the cached model shape, the tokenizer-vs-embedding check at submission,
and, for real, a job trained on stories260K whose model is downloaded, reloaded, trained again by name, and
listed / retrieved / deleted with the official ``openai`` SDK against a live server."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from client.rest import ApiError, LomoClient
from jobs import catalog
from jobs.admission import job_output_dir
from jobs.migrate import upgrade
from jobs.models import Checkpoint, Job, User, utcnow
from jobs.settings import Settings
from tests.conftest import STORIES, admin_key, api_client, need_shared, tiny_llama, user_key
from tests.e2e.live_service import api_in_thread

ROWS = b"".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() + b"\n" for i in range(6))


def settings_for(tmp_path, url, *model_dirs) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=url, model_dirs=list(model_dirs), device="cpu",
                    flush_interval_s=0.2)


@pytest.fixture
def settings(tmp_path, database_url):
    return settings_for(tmp_path, database_url, need_shared(STORIES).parent)


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


@pytest.fixture
def sqlite_client(tmp_path, tiny_model_dir):
    (tmp_path / "models").mkdir()  # for the models a test makes
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'lomo.db'}", tiny_model_dir.parent,
                            need_shared(STORIES).parent, tmp_path / "models")
    with api_client(settings) as c:
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def create(client, model, file_id, **fields):
    """Submit a job; ``model`` is a name, or a folder under one of the settings' model_dirs (named by its name)."""
    name = model.name if isinstance(model, Path) else model
    return client.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": file_id, **fields})


def upload(client) -> str:
    return client.post("/v1/files", files={"file": ("train.jsonl", ROWS)}).json()["id"]


def fake_success(client, job_id: str, steps=(2, 4), partitioned: tuple[int, ...] = ()) -> str:
    """Mark a queued job succeeded as a worker would have left it: stories260K as its model folder and
    checkpoints (HF folders with trainer state; ``partitioned`` steps as ZeRO-3 shards); its name back."""
    settings = client.app.state.settings
    out = job_output_dir(settings, job_id)
    shutil.copytree(STORIES, out / "model")
    with client.app.state.db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.started_at, job.finished_at = "succeeded", utcnow() - timedelta(minutes=1), utcnow()
        job.fine_tuned_model = catalog.fine_tuned_name(job.model, job.suffix, job.id)
        for step in (*steps, *partitioned):
            folder = out / "checkpoints" / f"step-{step:06d}"
            if step in partitioned:
                folder.mkdir(parents=True)
                (folder / "zero3-rank-00000.pt").write_bytes(b"shards")
                (folder / "tokenizer.json").write_bytes((STORIES / "tokenizer.json").read_bytes())
            else:
                shutil.copytree(STORIES, folder)
            (folder / "trainer_state.pt").write_bytes(b"optimizer state")
            s.add(Checkpoint(job_id=job_id, step=step, path=str(folder)))
        return job.fine_tuned_model


# ---------------------------------------------------------------------------------------------- routes
def test_models_are_listed_retrieved_and_deleted_by_name(client, settings):
    file_id = upload(client)
    job = create(client, "stories260K", file_id, suffix="demo").json()
    name = fake_success(client, job["id"])
    assert name == f"ft:stories260K:demo:{job['id']}"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"] == name

    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and listed["has_more"] is False
    by_id = {m["id"]: m for m in listed["data"]}
    assert set(by_id) == {"stories260K", name}
    assert by_id["stories260K"] == {"id": "stories260K", "object": "model", "owned_by": "system",
                                    "created": int((STORIES).stat().st_mtime)}
    finished = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["finished_at"]
    assert by_id[name] == {"id": name, "object": "model", "owned_by": "local", "created": finished}
    assert client.get(f"/v1/models/{name}").json() == by_id[name]
    assert client.get("/v1/models/stories260K").json() == by_id["stories260K"]
    ckpt = f"{name}:ckpt-step-4"
    assert client.get(f"/v1/models/{ckpt}").json()["owned_by"] == "local"
    # paging
    first = client.get("/v1/models", params={"limit": 1}).json()
    assert [m["id"] for m in first["data"]] == ["stories260K"] and first["has_more"] is True
    rest = client.get("/v1/models", params={"limit": 1, "after": "stories260K"}).json()
    assert [m["id"] for m in rest["data"]] == [name] and rest["has_more"] is False
    assert error_of(client.get("/v1/models", params={"after": "nope"}), 422)["param"] == "after"

    # unknown names, another owner's model, a path: 404 in the error shape
    with client.app.state.db.session() as s:
        s.add(User(id="bob", name="bob"))
        s.flush()
        s.add(Job(id="ftjob-bob", owner_id="bob", model="stories260K", training_file_id=file_id, method="lomo",
                  status="succeeded", fine_tuned_model="ft:stories260K::ftjob-bob", finished_at=utcnow()))
    for unknown in ("ft:stories260K:demo:ftjob-nope", "nothing", f"{name}:ckpt-step-3",
                    f"ft:other:demo:{job['id']}"):
        error = error_of(client.get(f"/v1/models/{unknown}"), 404)
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert client.get(f"/v1/models/{STORIES}").status_code == 404  # a path is no model id
    # the admin (this client's key) sees bob's model; another user does not, as if it did not exist
    assert client.get("/v1/models/ft:stories260K::ftjob-bob").json()["owned_by"] == "bob"
    carol = {"Authorization": f"Bearer {user_key(settings, 'carol')}"}
    for other in ("ft:stories260K::ftjob-bob", name):
        assert error_of(client.get(f"/v1/models/{other}", headers=carol), 404)["code"] == "model_not_found"
    assert {m["id"] for m in client.get("/v1/models", headers=carol).json()["data"]} == {"stories260K"}

    # a base model and a checkpoint are not deleted; a model a queued job trains from is not either
    error = error_of(client.delete("/v1/models/stories260K"), 403)
    assert error["code"] == "model_not_deletable" and "base model" in error["message"]
    assert "deleted with their fine-tuned model" in error_of(client.delete(f"/v1/models/{ckpt}"), 403)["message"]
    user = create(client, ckpt, file_id).json()
    error = error_of(client.delete(f"/v1/models/{name}"), 409)
    assert user["id"] in error["message"] and error["code"] == "model_in_use"
    client.post(f"/v1/fine_tuning/jobs/{user['id']}/cancel")

    out = job_output_dir(settings, job["id"])
    assert client.delete(f"/v1/models/{name}").json() == {"id": name, "object": "model", "deleted": True}
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"] == name  # the job stays
    with client.app.state.db.session() as s:
        assert s.get(Job, job["id"]).model_deleted_at is not None
        assert all(c.deleted_at is not None for c in s.query(Checkpoint).filter_by(job_id=job["id"]))
    assert error_of(client.get(f"/v1/models/{name}"), 404)["code"] == "model_not_found"
    assert error_of(client.delete(f"/v1/models/{name}"), 404)["code"] == "model_not_found"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["stories260K", "ft:stories260K::ftjob-bob"]
    assert [m["id"] for m in client.get("/v1/models", params={"user": "local"}).json()["data"]] == ["stories260K"]
    error = error_of(create(client, name, file_id), 422)
    assert error["param"] == "model" and "was deleted" in error["message"]
    assert str(settings.data_dir) not in json.dumps(listed) + json.dumps(error)


def test_fine_tuned_models_and_checkpoints_are_job_models_and_unusable_ones_are_refused_clearly(client, settings):
    file_id = upload(client)
    done = create(client, "stories260K", file_id).json()
    name = fake_success(client, done["id"], steps=(2,), partitioned=(4,))
    # the fine-tuned model and its (Hugging Face) checkpoint are accepted as the model of a job
    for reference in (name, f"{name}:ckpt-step-2"):
        response = create(client, reference, file_id, suffix="again")
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["model"] == reference and job["status"] == "queued"
        assert job["predicted_memory"]["parameters"] > 0
        assert catalog.fine_tuned_name(reference, "again", job["id"]) == f"ft:stories260K:again:{job['id']}"
    estimate = client.post("/v1/estimates", json={"model": name, "training_file": file_id})
    assert estimate.status_code == 200 and estimate.json()["available"] is True
    with client.app.state.db.session() as s:
        assert catalog.resolve_reference(s, settings, "local", name) == job_output_dir(settings, done["id"]) / "model"
        assert catalog.resolve_reference(s, settings, "someone-else", name) is None

    # a partitioned checkpoint, a job that has not succeeded, a checkpoint that does not exist: 422 on model
    running = create(client, "stories260K", file_id).json()
    with client.app.state.db.session() as s:
        s.get(Job, running["id"]).status = "running"
    cases = {
        f"{name}:ckpt-step-4": "partitioned",
        catalog.fine_tuned_name("stories260K", None, running["id"]): "has not succeeded",
        f"{name}:ckpt-step-6": "no checkpoint at step 6",
        "ft:stories260K::ftjob-unknown": "nor one of your fine-tuned models",
    }
    for reference, expected in cases.items():
        error = error_of(create(client, reference, file_id), 422)
        assert error["param"] == "model" and expected in error["message"], (reference, error)
    # and the same reasons when downloading
    error = error_of(client.get(f"/v1/models/{name}:ckpt-step-4/content"), 422)
    assert error["param"] == "model" and "partitioned" in error["message"]
    assert str(settings.data_dir) not in json.dumps(error)


def relay(client):
    """An httpx transport that answers with the app behind a TestClient (for LomoClient)."""
    def handle(request: httpx.Request) -> httpx.Response:
        answer = client.get(request.url.path)
        return httpx.Response(answer.status_code, content=answer.content,
                              headers={"content-type": answer.headers.get("content-type", "")})
    return httpx.MockTransport(handle)


def test_the_content_is_a_streamed_tar_of_what_from_pretrained_needs(sqlite_client, tmp_path, tiny_model_dir):
    client = sqlite_client
    need_shared(STORIES)
    file_id = upload(client)
    job = create(client, "stories260K", file_id).json()
    name = fake_success(client, job["id"], steps=(2,))
    response = client.get(f"/v1/models/{name}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    root = f"ft-stories260K--{job['id']}"
    assert response.headers["content-disposition"] == f'attachment; filename="{root}.tar"'
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = archive.getnames()
        assert names[0] == root and archive.getmember(root).isdir()
        assert sorted(names[1:]) == sorted(f"{root}/{p.name}" for p in STORIES.iterdir())
        assert archive.extractfile(f"{root}/model.safetensors").read() == (STORIES / "model.safetensors").read_bytes()
    checkpoint = client.get(f"/v1/models/{name}:ckpt-step-2/content")
    with tarfile.open(fileobj=io.BytesIO(checkpoint.content)) as archive:
        assert "trainer_state.pt" not in {n.rsplit("/", 1)[-1] for n in archive.getnames()}
        assert f"{root}-ckpt-step-2/config.json" in archive.getnames()
    assert error_of(client.get(f"/v1/models/{tiny_model_dir.name}/content"), 403)["code"] == "model_not_downloadable"
    assert error_of(client.get("/v1/models/ft:stories260K::ftjob-nope/content"), 404)["code"] == "model_not_found"

    # the client unpacks it; a hostile archive is refused, nothing written outside the folder
    lomo = LomoClient("http://test", transport=relay(client))
    folder = lomo.download_model(name, tmp_path / "dl")
    assert folder == (tmp_path / "dl" / root).resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in STORIES.iterdir())
    for bad in ("../escape.txt", "/tmp/absolute.txt", "model/../../escape.txt"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(bad)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"hi"))
        hostile = LomoClient("http://test", transport=httpx.MockTransport(
            lambda request, body=buffer.getvalue(): httpx.Response(200, content=body)))
        with pytest.raises(ValueError, match="outside its folder"):
            hostile.download_model(name, tmp_path / "hostile")
    assert not (tmp_path / "escape.txt").exists() and not any((tmp_path / "hostile").iterdir())
    missing = LomoClient("http://test", transport=relay(client))
    with pytest.raises(ApiError) as raised:
        missing.download_model("ft:stories260K::ftjob-nope", tmp_path / "none")
    assert raised.value.status == 404 and raised.value.code == "model_not_found"


# ---------------------------------------------------------------------------------------------- the cached shape
def test_the_model_shape_is_cached_by_the_content_of_config_json(tmp_path, monkeypatch):
    from lomo_core import memory_model

    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    calls = []
    real = memory_model.model_shape
    monkeypatch.setattr(memory_model, "model_shape", lambda config: calls.append(1) or real(config))
    first = catalog.model_shape(folder)
    assert catalog.model_shape(folder) == first and catalog.model_shape(str(folder) + "/") == first
    assert len(calls) == 1
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    changed = catalog.model_shape(folder)
    assert len(calls) == 2 and changed.layers == 3 and changed.parameters > first.parameters


# ---------------------------------------------------------------------------------------------- vocabulary
def _word_tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)} | {"<unk>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused_at_submission(sqlite_client, tmp_path):
    from transformers import PreTrainedTokenizerFast

    client = sqlite_client
    file_id = upload(client)
    gpt2 = need_shared(STORIES.parents[1] / "tokenizers" / "gpt2" / "tokenizer.json")
    folders = {}
    for case in ("gpt2", "added-pad", "matching", "none"):
        folders[case] = tmp_path / "models" / case
        tiny_llama().save_pretrained(folders[case])  # vocab_size 96
    PreTrainedTokenizerFast(tokenizer_file=str(gpt2)).save_pretrained(folders["gpt2"])  # 50257 tokens
    padded = _word_tokenizer(96)
    padded.add_special_tokens({"pad_token": "<pad>"})  # id 96: one past the embedding
    padded.save_pretrained(folders["added-pad"])
    _word_tokenizer(96).save_pretrained(folders["matching"])
    for case, size in (("gpt2", 50257), ("added-pad", 97)):
        error = error_of(create(client, folders[case], file_id), 422)
        assert error["param"] == "model", error
        assert f"has {size} tokens" in error["message"] and "96 rows" in error["message"]
        assert "resize_token_embeddings(len(tokenizer))" in error["message"]
        assert error_of(client.post("/v1/estimates", json={"model": str(folders[case]), "training_file": file_id}),
                        422)["param"] == "model"
    for case in ("matching", "none"):  # a tokenizer that fits, and a folder without a tokenizer
        assert create(client, folders[case], file_id).status_code == 200, case
    assert catalog.tokenizer_size(folders["matching"]) == 96 and catalog.tokenizer_size(folders["none"]) is None


# ---------------------------------------------------------------------------------------------- for real
@pytest.fixture
def live(tmp_path):
    """The API served by uvicorn in a thread, on SQLite, with stories260K registered."""
    url = f"sqlite:///{tmp_path / 'lomo.db'}"
    upgrade(url)
    settings = settings_for(tmp_path, url, need_shared(STORIES).parent)
    settings.data_dir.mkdir(parents=True)
    with api_in_thread(settings) as base:
        yield settings, base
    from jobs.db import close_database

    close_database(url)


def test_a_trained_model_downloads_reloads_trains_again_by_name_and_works_with_the_openai_sdk(live, tmp_path):
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.db import database
    from worker.supervisor import JobRunner

    settings, base_url = live
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {c} sat on the {m}."}) + "\n"
                            for c in ("cat", "dog", "hen", "fox") for m in ("mat", "rug")))
    tiny = {"max_steps": 2, "batch_size": 4, "max_seq_len": 32, "lr": 2e-2, "save_every": 2}
    runner = JobRunner(settings, database(settings.resolved_database_url()))
    with LomoClient(base_url, api_key=admin_key(settings)) as lomo:
        file_id = lomo.upload_file(data)["id"]
        job = lomo.create_job("stories260K", file_id, suffix="first", hyperparameters=tiny)
        assert runner.run(job["id"], poll=False) == "succeeded"
        job = lomo.get_job(job["id"])
        name = job["fine_tuned_model"]
        assert name == f"ft:stories260K:first:{job['id']}"

        folder = lomo.download_model(name, tmp_path / "downloads")
        assert not (folder / "trainer_state.pt").exists()
        ids = torch.tensor([[1, 42, 7, 300, 11, 2]])
        def logits(model_dir):
            with torch.no_grad():
                return AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits

        downloaded, base = logits(folder), logits(STORIES)
        written = logits(job_output_dir(settings, job["id"]) / "model")  # what the job wrote
        assert torch.equal(downloaded, written) and not torch.allclose(downloaded, base)  # trained, then copied
        checkpoint = lomo.download_model(f"{name}:ckpt-step-2", tmp_path / "downloads")
        assert (checkpoint / "config.json").is_file() and not (checkpoint / "trainer_state.pt").exists()

        # the fine-tuned model's name is the model of a second job, which trains from it
        again = lomo.create_job(name, file_id, suffix="second", hyperparameters=tiny)
        assert again["model"] == name
        assert runner.run(again["id"], poll=False) == "succeeded", lomo.get_job(again["id"])["error"]
        second = lomo.get_job(again["id"])["fine_tuned_model"]
        assert second == f"ft:stories260K:second:{again['id']}"
        assert {m["id"] for m in lomo.list_models()} == {"stories260K", name, second}
        assert lomo.get_model(second)["owned_by"] == "local"

    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=admin_key(settings), max_retries=0)
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["stories260K", name, second]
    assert {m.owned_by for m in models.data} == {"system", "local"}
    retrieved = sdk.models.retrieve(name)
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (name, "model", "local")
    assert retrieved.created == job["finished_at"]
    deleted = sdk.models.delete(name)
    assert (deleted.id, deleted.deleted, deleted.object) == (name, True, "model")
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve(name)
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.delete("stories260K")
    assert [m.id for m in sdk.models.list().data] == ["stories260K", second]
    with database(settings.resolved_database_url()).session() as s:
        assert s.get(Job, job["id"]).model_deleted_at is not None
