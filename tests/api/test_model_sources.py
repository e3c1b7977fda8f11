"""A job's ``model`` is a name: a registered base model (a sub-folder of LOMO_MODEL_DIRS, or a folder an
admin registered), or a fine-tuned model or checkpoint the caller may see. Paths, '..', links out of the
model folders and other users' models are refused with a 422 naming ``model``; nothing of the server's
disk is shown back."""

from __future__ import annotations

import shutil

import pytest

from jobs import catalog
from jobs.admission import job_output_dir
from jobs.models import Job, utcnow
from jobs.settings import Settings
from tests.conftest import STORIES, api_client, need_shared, tiny_llama, user_key

ROW = b'{"prompt": "a", "response": "b"}\n'


@pytest.fixture
def env(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(need_shared(STORIES), models / "stories260K")
    outside = tmp_path / "elsewhere" / "secret-model"
    tiny_llama().save_pretrained(outside)
    (models / "escape").symlink_to(outside)  # a link out of the model folder
    (models / "alias").symlink_to(models / "stories260K")  # a link that stays inside it
    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'lomo.db'}",
                        model_dirs=[models], device="cpu")
    with api_client(settings) as admin:
        ann = {"Authorization": f"Bearer {user_key(settings, 'ann')}"}
        bob = {"Authorization": f"Bearer {user_key(settings, 'bob')}"}
        yield admin, settings, ann, bob, outside


def upload(client, headers) -> str:
    answer = client.post("/v1/files", files={"file": ("t.jsonl", ROW)}, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def submit(client, headers, model: str):
    return client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": upload(client, headers),
                                                     "hyperparameters": {"max_steps": 1}}, headers=headers)


def refused(answer, *words: str) -> str:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == "model", error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error["message"]


def succeed(client, job_id: str) -> str:
    """Leave a job as a worker that finished it would: its model folder and its name."""
    settings = client.app.state.settings
    shutil.copytree(STORIES, job_output_dir(settings, job_id) / "model")
    with client.app.state.db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.finished_at = "succeeded", utcnow()
        job.fine_tuned_model = catalog.fine_tuned_name(job.model, job.suffix, job.id)
        return job.fine_tuned_model


def test_paths_dot_dot_and_links_out_of_the_roots_are_refused_naming_model(env, tmp_path):
    client, settings, ann, _bob, outside = env
    models = settings.model_dirs[0]
    for path in (str(models / "stories260K"), str(outside), "../models/stories260K", "./stories260K",
                 "stories260K/../stories260K", "..", str(settings.data_dir / "jobs")):
        message = refused(submit(client, ann, path), "not a path")
        assert str(tmp_path) not in message
    message = refused(submit(client, ann, "escape"), "leads out of the deployment's model folders")
    assert str(outside) not in message and str(tmp_path) not in message
    assert client.get("/v1/models/escape", headers=ann).status_code == 404
    listed = {m["id"] for m in client.get("/v1/models", headers=ann).json()["data"]}
    assert listed == {"stories260K", "alias"}  # the link out is not listed; the one inside is
    for name in ("stories260K", "alias"):
        assert submit(client, ann, name).status_code == 200, name


def test_one_may_train_on_ones_own_fine_tuned_model_not_on_another_users(env):
    client, _settings, ann, bob, _outside = env
    job = submit(client, ann, "stories260K").json()
    name = succeed(client, job["id"])
    message = refused(submit(client, bob, name), "is neither a registered model", "nor one of your fine-tuned models")
    assert job["id"] in message  # the name it was given, not a sign that it exists
    refused(submit(client, bob, f"{name}:ckpt-step-1"))
    assert submit(client, ann, name).status_code == 200
    folder = str(job_output_dir(client.app.state.settings, job["id"]) / "model")
    refused(submit(client, ann, folder), "not a path")  # not by its folder either, even its owner


def test_an_admin_registers_a_folder_by_name_and_users_train_on_it(env, tmp_path):
    client, settings, ann, _bob, outside = env
    refused(submit(client, ann, "team-model"), "neither a registered model")
    body = {"name": "team-model", "path": str(outside)}
    answer = client.post("/v1/admin/models", json=body, headers=ann)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "permission_denied"
    made = client.post("/v1/admin/models", json=body)
    assert made.status_code == 200, made.text
    assert made.json()["id"] == "team-model" and str(tmp_path) not in made.text  # its path is never shown
    assert client.post("/v1/admin/models", json=body).status_code == 409
    assert "team-model" in {m["id"] for m in client.get("/v1/models", headers=ann).json()["data"]}
    assert submit(client, ann, "team-model").status_code == 200
    for wrong, param in (({"name": "x", "path": "relative/dir"}, "path"),
                         ({"name": "x", "path": str(tmp_path / "none")}, "path"),
                         ({"name": "x", "path": str(settings.data_dir)}, "path"),
                         ({"name": "a/b", "path": str(outside)}, "name"),
                         ({"name": "ft:x", "path": str(outside)}, "name")):
        if param == "path" and wrong["path"] == str(settings.data_dir):
            (settings.data_dir / "config.json").write_text("{}")  # a model folder, but the users' data
        answer = client.post("/v1/admin/models", json=wrong)
        assert answer.status_code == 422 and answer.json()["error"]["param"] == param, (wrong, answer.text)
        assert str(tmp_path) not in answer.text
    assert [m["id"] for m in client.get("/v1/admin/models").json()["data"]] == ["team-model"]
    assert client.delete("/v1/admin/models/team-model").status_code == 200
    assert client.delete("/v1/admin/models/team-model").status_code == 404
    assert client.delete("/v1/admin/models/stories260K").status_code == 404  # a folder of the roots, not a registration
    refused(submit(client, ann, "team-model"), "neither a registered model")
