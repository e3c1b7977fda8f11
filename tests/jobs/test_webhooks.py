"""Webhooks in the jobs layer: deliveries written when jobs end, signed so that the openai SDK's
``webhooks.unwrap`` verifies them (and a wrong secret does not), tried again with backoff while the
receiver is down, given up after the bounded time; URLs on private addresses refused unless allowed."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import openai
import pytest

from jobs import webhooks
from jobs.db import database
from jobs.lifecycle import Outcome, cancel_job, finish_job
from jobs.migrate import upgrade
from jobs.models import WebhookDelivery, utcnow
from jobs.settings import Settings
from jobs.states import JobStatus
from tests.conftest import Receiver, free_port, seed_jobs


@pytest.fixture
def env(database_url, tmp_path):
    upgrade(database_url)
    db = database(database_url)
    settings = Settings(data_dir=tmp_path, webhook_allow_private=True, webhook_retry_base_s=0.01,
                        webhook_retry_max_s=0.05, webhook_timeout_s=2)
    return db, settings


def test_a_jobs_end_is_delivered_signed_and_the_sdk_verifies_it(env):
    db, settings = env
    ids = seed_jobs(db, [(1, 0), (1, 0)], status="running")
    receiver = Receiver()
    try:
        with db.session() as s:
            endpoint = webhooks.create_endpoint(s, settings, "ann", "mine", receiver.url,
                                                ["fine_tuning.job.succeeded", "fine_tuning.job.cancelled"])
            secret = endpoint.secret
        with db.session() as s:
            finish_job(s, ids[0], Outcome(JobStatus.SUCCEEDED))
            finish_job(s, ids[1], Outcome(JobStatus.FAILED))  # not subscribed: nothing
        with db.session() as s:
            pending = webhooks.due(s)
        assert len(pending) == 1
        assert webhooks.attempt(db, settings, pending[0]) is None  # delivered at the first attempt
        assert webhooks.attempt(db, settings, pending[0]) is None  # and only once
        assert len(receiver.got) == 1
        headers, body = receiver.got[0]
        event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
        assert event.type == "fine_tuning.job.succeeded" and event.data.id == ids[0]
        assert headers["webhook-id"] == pending[0] and json.loads(body)["object"] == "event"
        with pytest.raises(openai.InvalidWebhookSignatureError):
            openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=webhooks.new_secret())
        tampered = body.replace(ids[0].encode(), ids[1].encode())
        with pytest.raises(openai.InvalidWebhookSignatureError):
            openai.OpenAI(api_key="unused").webhooks.unwrap(tampered, headers, secret=secret)
        with db.session() as s:
            row = s.get(WebhookDelivery, pending[0])
            assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 200)
    finally:
        receiver.close()


def test_a_receiver_that_is_down_gets_the_event_later_and_one_down_for_good_is_given_up(env):
    db, settings = env
    port = free_port()  # nothing listens there yet
    ids = seed_jobs(db, [(1, 0), (1, 0)])
    with db.session() as s:
        endpoint = webhooks.create_endpoint(s, settings, "ann", "later", f"http://127.0.0.1:{port}/hook",
                                            ["fine_tuning.job.cancelled"])
        secret = endpoint.secret
        cancel_job(s, "ann", ids[0])  # a queued job cancelled: an event at once
    with db.session() as s:
        (delivery,) = webhooks.due(s)
    assert webhooks.attempt(db, settings, delivery) == 0.01  # refused: tried again after the base delay
    time.sleep(0.02)
    assert webhooks.attempt(db, settings, delivery) == 0.02  # doubled
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery)
        assert row.status == "pending" and row.attempts == 2 and row.last_status_code is None
        assert "ConnectError" in row.last_error
    receiver = Receiver(codes=[503], port=port)  # up now, but answering 503 once
    try:
        time.sleep(0.03)
        assert webhooks.attempt(db, settings, delivery) == 0.04
        time.sleep(0.05)
        assert webhooks.attempt(db, settings, delivery) is None
        with db.session() as s:
            row = s.get(WebhookDelivery, delivery)
            assert (row.status, row.attempts, row.last_status_code) == ("delivered", 4, 200)
        headers, body = receiver.got[-1]
        assert openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret).data.id == ids[0]
        assert len({h["webhook-id"] for h, _ in receiver.got}) == 1  # one message id for every attempt
    finally:
        receiver.close()
    # a receiver down for longer than webhook_retry_for_s: the delivery is marked failed, not tried forever
    with db.session() as s:
        cancel_job(s, "ann", ids[1])
    with db.session() as s:
        (last,) = webhooks.due(s)
        s.get(WebhookDelivery, last).created_at = utcnow() - timedelta(seconds=settings.webhook_retry_for_s)
    assert webhooks.attempt(db, settings, last) is None
    with db.session() as s:
        assert s.get(WebhookDelivery, last).status == "failed" and webhooks.due(s) == []


def test_a_rotated_secret_that_is_kept_signs_beside_the_new_one(env):
    db, settings = env
    seed_jobs(db, [(1, 0)])
    with db.session() as s:
        endpoint = webhooks.create_endpoint(s, settings, "ann", "r", "http://127.0.0.1:9/x",
                                            ["fine_tuning.job.failed"])
        old = endpoint.secret
        rotated = webhooks.rotate_secret(s, "ann", endpoint.id, keep_old_for_24_hours=True)
        header = webhooks.signatures(rotated, "msg-1", 1700000000, "{}")
        assert len(header.split()) == 2 and rotated.secret != old
        for secret in (old, rotated.secret):
            assert f"v1,{webhooks.sign(secret, 'msg-1', 1700000000, '{}')}" in header.split()
        assert len(webhooks.signatures(webhooks.rotate_secret(s, "ann", endpoint.id, False), "m", 1, "{}")
                   .split()) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:8000/x", "http://[::1]/x",
                                 "http://169.254.169.254/latest/meta-data", "http://10.0.0.5/x",
                                 "http://192.168.1.2/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x"])
def test_private_and_loopback_targets_are_refused_unless_allowed(url):
    assert "private address" in webhooks.url_problem(url, allow_private=False)
    assert webhooks.url_problem(url, allow_private=True) is None


def test_only_http_urls_without_credentials_are_endpoints():
    assert "http:// or https://" in webhooks.url_problem("ftp://example.com/x", True)
    assert "http:// or https://" in webhooks.url_problem("file:///etc/passwd", True)
    assert "credentials" in webhooks.url_problem("https://u:p@example.com/x", True)
    assert "no host" in webhooks.url_problem("https:///x", True)
    assert webhooks.url_problem("https://93.184.215.14/hook", False) is None  # a public address


def test_a_delivery_connects_to_the_address_that_was_checked_keeping_the_hosts_name(env, monkeypatch):
    """The host is resolved once, checked, and that address is connected to: the receiver is reached at
    a name no resolver knows (so the HTTP client never resolved it again), with its name as the Host."""
    db, settings = env
    receiver = Receiver()
    port = receiver.server.server_port
    real = webhooks.socket.getaddrinfo
    asked = []

    def resolve(host, *args, **kwargs):
        asked.append(host)
        return real("127.0.0.1", *args, **kwargs) if host == "hooks.lab.test" else real(host, *args, **kwargs)

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", resolve)
    strict = settings.model_copy(update={"webhook_allow_private": False})
    seed_jobs(db, [(1, 0)])
    try:
        with db.session() as s:
            endpoint = webhooks.create_endpoint(s, settings, "ann", "named", f"http://hooks.lab.test:{port}/x",
                                                ["fine_tuning.job.failed"])
        assert "private address" in webhooks.post(strict, endpoint, "msg-1", "{}").error  # 127.0.0.1 is refused
        monkeypatch.setattr(webhooks, "_private", lambda address: False)  # as if it were a public address
        asked.clear()
        result = webhooks.post(strict, endpoint, "msg-2", "{}")
        assert result.ok, result
        # the name resolved once, by the check; the client only looked up the address literal it was given
        assert asked.count("hooks.lab.test") == 1 and set(asked) <= {"hooks.lab.test", "127.0.0.1"}
        headers = {k.lower(): v for k, v in receiver.got[-1][0].items()}
        assert headers["host"] == f"hooks.lab.test:{port}" and headers["webhook-id"] == "msg-2"
    finally:
        receiver.close()
