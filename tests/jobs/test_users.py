"""Users and API keys: a key is shown once and stored only as a hash, found by its public id, compared in
constant time; a revoked key or a disabled user's authenticates no one; names are checked; and the
`lomo users` commands on a real database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from client.cli import app
from jobs import errors, users
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import ApiKey, User, utcnow


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    return database(database_url)


def test_a_key_authenticates_its_user_and_is_stored_only_as_a_hash(db):
    with db.session() as s:
        user, new = users.create_user(s, "ann", key_name="laptop")
    assert new.secret.startswith(f"lomo-{new.key.id}-") and len(new.secret) > 60
    with db.session() as s:
        found = users.authenticate(s, new.secret)
        assert found is not None and found[0].name == "ann" and found[1].id == new.key.id
        assert found[1].last_used_at is not None
        stored = s.execute(text("SELECT * FROM api_keys")).mappings().one()
    assert new.secret.split("-", 2)[2] not in json.dumps({k: str(v) for k, v in stored.items()})  # never the secret
    assert users.key_id_of(new.secret) == new.key.id and users.key_id_of("sk-something") is None
    with db.session() as s:
        wrong_secret = new.secret[:-4] + ("AAAA" if not new.secret.endswith("AAAA") else "BBBB")
        for presented in (None, "", "Bearer " + new.secret, wrong_secret, new.secret + "x",
                          f"lomo-key_{'0' * 16}-{new.secret.rsplit('-', 1)[1]}"):
            assert users.authenticate(s, presented) is None, presented
        assert not user.is_admin


def test_a_revoked_key_or_a_disabled_user_authenticates_no_one(db):
    with db.session() as s:
        user, first = users.create_user(s, "bob", admin=True)
        second = users.add_key(s, user)
    with db.session() as s:
        users.revoke_key(s, first.key.id)
        users.revoke_key(s, first.key.id)  # again: nothing changes
    with db.session() as s:
        assert users.authenticate(s, first.secret) is None
        assert users.authenticate(s, second.secret)[0].is_admin  # the other key still works
        assert [(u.name, live) for u, live in users.list_users(s)] == [("bob", 1)]
        s.get(User, user.id).disabled_at = utcnow()
    with db.session() as s:
        assert users.authenticate(s, second.secret) is None
        with pytest.raises(errors.NotFound):
            users.revoke_key(s, "key_0000000000000000")


def test_user_names_are_checked_and_unique(db):
    with db.session() as s:
        users.create_user(s, "carol")
    for name in ("", "-x", "a b", "x" * 65, "../etc", "ann;drop"):
        with pytest.raises(errors.InvalidRequest, match="not a user name"), db.session() as s:
            users.create_user(s, name)
    with pytest.raises(errors.Conflict, match="exists already"), db.session() as s:
        users.create_user(s, "carol")
    with db.session() as s:
        assert s.scalar(select(User.id).where(User.name == "carol")) is not None
        assert users.get_user(s, "carol").name == "carol"
        with pytest.raises(errors.NotFound):
            users.get_user(s, "nobody")


def test_the_users_commands_on_the_services_database(tmp_path):
    env = {"LOMO_DATA_DIR": str(tmp_path / "var"), "LOMO_DATABASE_URL": f"sqlite:///{tmp_path / 'lomo.db'}"}
    from jobs.settings import get_settings

    get_settings.cache_clear()
    try:
        run = CliRunner().invoke
        created = run(app, ["users", "create", "dana", "--admin", "--json"], env=env)
        assert created.exit_code == 0, created.output
        made = json.loads(created.stdout)
        assert made["admin"] is True and made["key"].startswith(f"lomo-{made['key_id']}-")
        shown = run(app, ["users", "create", "erin"], env=env)
        assert shown.exit_code == 0 and "shown this once" in shown.stdout
        key = shown.stdout.strip().splitlines()[-1]
        assert key.startswith("lomo-key_")
        again = run(app, ["users", "create", "erin"], env=env)
        assert again.exit_code == 2 and "exists already" in again.output
        bad = run(app, ["users", "create", "no good"], env=env)
        assert bad.exit_code == 2 and "not a user name" in bad.output
        added = json.loads(run(app, ["users", "add-key", "erin", "--json"], env=env).stdout)
        revoked = run(app, ["users", "revoke-key", added["key_id"]], env=env)
        assert revoked.exit_code == 0 and f"key {added['key_id']} revoked" in revoked.stdout
        assert run(app, ["users", "revoke-key", "key_0123456789abcdef"], env=env).exit_code == 2
        listed = json.loads(run(app, ["users", "list", "--keys", "--json"], env=env).stdout)
        assert [(u["name"], u["admin"], u["live_keys"]) for u in listed] == [("dana", True, 1), ("erin", False, 1)]
        erin = listed[1]
        assert [k["revoked_at"] is not None for k in erin["keys"]] == [False, True]
        assert key not in json.dumps(listed) and made["key"] not in json.dumps(listed)  # ids only, never secrets
        db = database(env["LOMO_DATABASE_URL"])
        with db.session() as s:
            assert users.authenticate(s, key)[0].name == "erin"
            assert users.authenticate(s, added["key"]) is None
            assert s.query(ApiKey).count() == 3
    finally:
        get_settings.cache_clear()
