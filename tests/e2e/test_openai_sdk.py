"""The official `openai` package, unmodified and unpatched, drives a live service: on the zero-configuration
default (`lomo serve`) and on Postgres + Redis (`lomo serve` + `lomo worker`). Jobs train stories260K for real."""

from __future__ import annotations

import csv
import io
import json
import time

import openai
import pytest

from tests.conftest import STORIES, Receiver, free_port, need_shared
from tests.e2e.live_service import BACKENDS, start_service

#: OpenAI's chat format: a system prompt, several turns, and per-turn weights
ROWS = [{"messages": [{"role": "system", "content": "You tell tiny stories."},
                      {"role": "user", "content": f"Tell me about the {animal}."},
                      {"role": "assistant", "content": "I do not know that one.", "weight": 0},
                      {"role": "user", "content": "Try again."},
                      {"role": "assistant", "content": f"Once upon a time there was a {animal} who liked to play."}]}
        for animal in ("cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck")]
TRAINING = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
SMALL = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 0.5, "max_steps": 4, "max_seq_len": 192,
         "save_every": 2}


@pytest.fixture(scope="module", params=BACKENDS)
def sdk(request, tmp_path_factory):
    need_shared(STORIES)
    service = start_service(request.param, tmp_path_factory.mktemp(request.param.replace("+", "-")),
                            # receivers of the webhook test are on this machine; retries come quickly
                            webhook_allow_private="true", webhook_retry_base_s="0.5", webhook_retry_max_s="1")
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=service.api_key, max_retries=2)
    yield client, service
    client.close()
    service.stop()


@pytest.fixture(scope="module")
def training_file(sdk):
    client, _service = sdk
    return client.files.create(file=("stories.jsonl", TRAINING), purpose="fine-tune")


def wait(client: openai.OpenAI, job_id: str, service, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status}\n{service.log_tail()}")


def method(**hyperparameters) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def test_files_through_the_sdk(sdk, training_file):
    client, _service = sdk
    assert training_file.status == "processed" and training_file.bytes == len(TRAINING)
    assert client.files.retrieve(training_file.id).filename == "stories.jsonl"
    assert client.files.content(training_file.id).read() == TRAINING
    extra = client.files.create(file=("more.jsonl", TRAINING), purpose="fine-tune")
    listed = [f.id for f in client.files.list(limit=1)]  # one file a page, every page walked
    assert {training_file.id, extra.id} <= set(listed) and len(listed) == len(set(listed))
    assert client.files.delete(extra.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(extra.id)


def test_a_job_created_with_method_trains_and_its_results_are_readable(sdk, training_file):
    client, service = sdk
    created = client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id, seed=3,
                                             suffix="tales", method=method(**SMALL), metadata={"case": "method"})
    assert created.status == "queued" and created.seed == 3 and created.method.type == "supervised"
    hyper = created.method.supervised.hyperparameters
    assert (hyper.n_epochs, hyper.batch_size, hyper.learning_rate_multiplier) == (1, 4, 0.5)
    job = wait(client, created.id, service)
    assert job.status == "succeeded", (job.error, service.log_tail())
    assert job.fine_tuned_model == f"ft:stories260K:tales:{job.id}" and job.trained_tokens > 0
    assert job.organization_id and job.finished_at >= job.created_at

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [4, 2]  # newest first
    assert checkpoints[1].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-2"
    assert checkpoints[1].metrics.step == 2 and checkpoints[1].metrics.train_loss > 0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert len(events) > 4 and len({e.id for e in events}) == len(events)  # every page different
    assert all(isinstance(e.id, str) and e.type in ("message", "metrics") for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert any(e.message == "job succeeded" for e in events)

    [result] = job.result_files
    table = list(csv.reader(io.StringIO(client.files.content(result).text)))
    assert table[0][:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [row[0] for row in table[1:]] == ["1", "2", "3", "4"] and all(float(row[1]) > 0 for row in table[1:])


def test_without_save_every_a_job_checkpoints_each_epoch_and_its_final_model_is_the_last(sdk, training_file):
    client, service = sdk
    job = client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id, method=method(
        n_epochs=2, batch_size=4, max_seq_len=192))  # 8 rows: 2 steps an epoch
    job = wait(client, job.id, service)
    assert job.status == "succeeded", (job.error, service.log_tail())
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"


def test_legacy_hyperparameters_list_filters_and_cancel(sdk, training_file):
    client, _service = sdk
    legacy = client.fine_tuning.jobs.create(
        model="stories260K", training_file=training_file.id, metadata={"case": "legacy"},
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        extra_body={"priority": -5})  # behind the other tests' jobs
    assert legacy.hyperparameters.n_epochs == 1 and legacy.hyperparameters.learning_rate_multiplier == 1.0
    assert legacy.hyperparameters.batch_size == 8  # "auto": the largest that fits, capped by the file's 8 rows
    cancelled = client.fine_tuning.jobs.cancel(legacy.id)
    assert cancelled.status in ("cancelled", "running")
    ids = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert legacy.id in ids and len(ids) == len(set(ids))
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"case": "legacy"})] == [legacy.id]
    events = [e.message for e in client.fine_tuning.jobs.list_events(legacy.id, limit=100)]
    assert any(m.startswith("batch_size auto: 8") for m in events)


def test_errors_are_typed_and_name_the_field_or_line(sdk, training_file):
    client, _service = sdk
    bad = TRAINING + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    with pytest.raises(openai.UnprocessableEntityError) as bad_file:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 9" in bad_file.value.message and "assistant" in bad_file.value.message
    with pytest.raises(openai.UnprocessableEntityError) as bad_value:
        client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id,
                                       method=method(n_epochs=0))
    assert "method.supervised.hyperparameters.n_epochs" in bad_value.value.message
    with pytest.raises(openai.UnprocessableEntityError) as unknown_file:
        client.fine_tuning.jobs.create(model="stories260K", training_file="file-missing")
    assert "training_file" in unknown_file.value.message and "file-missing" in unknown_file.value.message
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    ended = client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id,
                                           method=method(max_steps=1, max_seq_len=192))
    client.fine_tuning.jobs.cancel(ended.id)
    assert wait(client, ended.id, _service).status in ("cancelled", "succeeded")
    with pytest.raises(openai.ConflictError) as pause:
        client.fine_tuning.jobs.pause(ended.id)
    assert "only a running job can be paused" in pause.value.message


def test_a_retried_create_with_the_same_idempotency_key_makes_one_job(sdk, training_file):
    client, _service = sdk
    before = len(list(client.fine_tuning.jobs.list(limit=100)))
    kwargs = {"model": "stories260K", "training_file": training_file.id, "method": method(max_steps=1),
              "extra_headers": {"Idempotency-Key": "retry-me"}, "extra_body": {"priority": -10}}
    first = client.fine_tuning.jobs.create(**kwargs)
    again = client.fine_tuning.jobs.create(**kwargs)
    assert again.id == first.id
    assert len(list(client.fine_tuning.jobs.list(limit=100))) == before + 1
    client.fine_tuning.jobs.cancel(first.id)


def test_two_users_with_their_own_keys_see_and_touch_only_their_own(sdk):
    import httpx

    _admin, service = sdk
    keys = {}
    for name in ("ann-sdk", "bob-sdk"):
        made = httpx.post(f"{service.url}/v1/admin/users", json={"name": name}, headers=service.headers)
        assert made.status_code == 200, made.text
        keys[name] = made.json()["api_key"]
    ann = openai.OpenAI(base_url=service.url + "/v1", api_key=keys["ann-sdk"]["key"], max_retries=0)
    bob = openai.OpenAI(base_url=service.url + "/v1", api_key=keys["bob-sdk"]["key"], max_retries=0)
    file = ann.files.create(file=("ann.jsonl", TRAINING), purpose="fine-tune")
    job = ann.fine_tuning.jobs.create(model="stories260K", training_file=file.id,
                                      method=method(**{**SMALL, "max_steps": 2}))
    done = wait(ann, job.id, service)
    assert done.status == "succeeded", service.log_tail()
    model = done.fine_tuned_model

    # bob: nothing of ann's is listed, and every id of hers is "not found", as an unknown one
    assert file.id not in [f.id for f in bob.files.list()]
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    assert model not in [m.id for m in bob.models.list()]
    for attempt in (lambda: bob.files.retrieve(file.id), lambda: bob.files.content(file.id),
                    lambda: bob.files.delete(file.id), lambda: bob.fine_tuning.jobs.retrieve(job.id),
                    lambda: bob.fine_tuning.jobs.cancel(job.id), lambda: bob.fine_tuning.jobs.list_events(job.id),
                    lambda: bob.fine_tuning.jobs.checkpoints.list(job.id), lambda: bob.models.retrieve(model),
                    lambda: bob.models.delete(model)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    for body, param in (({"model": "stories260K", "training_file": file.id}, "training_file"),
                        ({"model": model, "training_file": bob.files.create(
                            file=("bob.jsonl", TRAINING), purpose="fine-tune").id}, "model")):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            bob.fine_tuning.jobs.create(**body)
        assert refused.value.body["param"] == param
    # ann still has all of it, and may train on her own model
    assert ann.files.retrieve(file.id).id == file.id and ann.models.retrieve(model).owned_by == done.organization_id
    again = ann.fine_tuning.jobs.create(model=model, training_file=file.id, method=method(max_steps=1))
    assert ann.fine_tuning.jobs.cancel(again.id).status in ("cancelled", "running")
    # a revoked key is refused from the next request on
    assert httpx.delete(f"{service.url}/v1/admin/keys/{keys['bob-sdk']['id']}", headers=service.headers).is_success
    with pytest.raises(openai.AuthenticationError):
        bob.files.list()
    ann.close()
    bob.close()


def test_webhooks_made_with_the_sdk_are_delivered_signed_though_the_receiver_was_down(sdk, training_file):
    import httpx

    client, service = sdk
    port = free_port()  # the receiver is down: nothing listens there yet
    endpoint = client.webhooks.create(name="lab", url=f"http://127.0.0.1:{port}/hook",
                                      event_types=["fine_tuning.job.succeeded", "fine_tuning.job.cancelled"])
    assert endpoint.signing_secret.startswith("whsec_") and endpoint.id in [e.id for e in client.webhooks.list()]
    assert client.webhooks.retrieve(endpoint.id).signing_secret_hint.endswith(endpoint.signing_secret[-4:])
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.webhooks.create(name="x", url="ftp://example.com/", event_types=["fine_tuning.job.succeeded"])
    assert refused.value.body["param"] == "url"
    job = client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id,
                                         method=method(**{**SMALL, "max_steps": 2}))
    assert wait(client, job.id, service).status == "succeeded"

    def deliveries() -> list[dict]:
        answer = httpx.get(f"{service.url}/v1/webhook_endpoints/{endpoint.id}/deliveries", headers=service.headers)
        return answer.json()["data"]

    deadline = time.monotonic() + 60
    while not any(d["attempts"] >= 2 for d in deliveries()):  # refused while it is down, and tried again
        assert time.monotonic() < deadline, (deliveries(), service.log_tail())
        time.sleep(0.2)
    (pending,) = deliveries()
    assert pending["status"] == "pending" and pending["last_status_code"] is None and pending["last_error"]
    receiver = Receiver(port=port)
    try:
        while not receiver.got or deliveries()[0]["status"] != "delivered":
            assert time.monotonic() < deadline, (deliveries(), service.log_tail())
            time.sleep(0.2)
        (done,) = deliveries()
        assert done["attempts"] >= 3 and done["last_status_code"] == 200 and done["job_id"] == job.id
        headers, body = receiver.got[0]
        event = client.webhooks.unwrap(body, headers, secret=endpoint.signing_secret)
        assert event.type == "fine_tuning.job.succeeded" and event.data.id == job.id
        assert headers["webhook-id"] == done["id"]
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body, headers, secret="whsec_" + "A" * 44)
        # a job cancelled while queued: its event goes out too; and the SDK's test delivery
        queued = client.fine_tuning.jobs.create(model="stories260K", training_file=training_file.id,
                                                method=method(max_steps=1), extra_body={"priority": -100})
        client.fine_tuning.jobs.cancel(queued.id)
        tried = client.webhooks.test(endpoint.id, event_type="fine_tuning.job.cancelled")
        assert tried.status_code == 200 and tried.webhook_endpoint_id == endpoint.id
        while len(receiver.got) < 3:
            assert time.monotonic() < deadline, (deliveries(), service.log_tail())
            time.sleep(0.2)
        kinds = {client.webhooks.unwrap(b, h, secret=endpoint.signing_secret).type for h, b in receiver.got}
        assert kinds == {"fine_tuning.job.succeeded", "fine_tuning.job.cancelled"}
    finally:
        receiver.close()
    assert client.webhooks.delete(endpoint.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(endpoint.id)
