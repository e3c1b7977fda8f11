"""The migrations create exactly the tables the models describe, on SQLite and on Postgres."""

from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from jobs.db import make_engine
from jobs.migrate import downgrade, upgrade
from jobs.models import Base


def test_models_and_migrations_agree(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; write a migration: {diff}"


def test_downgrade_removes_everything(database_url):
    upgrade(database_url)
    downgrade(database_url)
    engine = make_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_the_database_refuses_a_second_active_lease_of_a_device(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO users (id, name, created_at) VALUES ('u1', 'ann', CURRENT_TIMESTAMP)"))
        c.execute(text("INSERT INTO files (id, owner_id, filename, purpose, bytes, storage_path, records, created_at) "
                       "VALUES ('f1', 'u1', 'a.jsonl', 'fine-tune', 1, 'files/f1', 1, CURRENT_TIMESTAMP)"))
        for job in ("j1", "j2"):
            c.execute(text(
                "INSERT INTO jobs (id, owner_id, status, model, training_file_id, method, hyperparameters, "
                "metadata, created_at, trained_tokens, step, result_files, cancel_requested, attempt) VALUES "
                f"('{job}', 'u1', 'queued', 'm', 'f1', 'lomo', '{{}}', '{{}}', CURRENT_TIMESTAMP, 0, 0, '[]', "
                "false, 0)"))
        c.execute(text("INSERT INTO gpu_leases (node, device_index, job_id, leased_at) "
                       "VALUES ('n1', 0, 'j1', CURRENT_TIMESTAMP)"))
    with pytest.raises(IntegrityError), engine.begin() as c:
        c.execute(text("INSERT INTO gpu_leases (node, device_index, job_id, leased_at) "
                       "VALUES ('n1', 0, 'j2', CURRENT_TIMESTAMP)"))
    with engine.begin() as c:  # once released, the device can be leased again
        c.execute(text("UPDATE gpu_leases SET released_at = CURRENT_TIMESTAMP WHERE job_id = 'j1'"))
        c.execute(text("INSERT INTO gpu_leases (node, device_index, job_id, leased_at) "
                       "VALUES ('n1', 0, 'j2', CURRENT_TIMESTAMP)"))
    engine.dispose()


def test_jobs_from_before_0007_get_model_names_instead_of_paths(database_url):
    upgrade(database_url, "0006")
    engine = make_engine(database_url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO users (id, name, created_at) VALUES ('u1', 'ann', CURRENT_TIMESTAMP)"))
        c.execute(text("INSERT INTO files (id, owner_id, filename, purpose, bytes, storage_path, records, created_at) "
                       "VALUES ('f1', 'u1', 'a.jsonl', 'fine-tune', 1, 'files/f1', 1, CURRENT_TIMESTAMP)"))
        for job, model, suffix, fine_tuned, results in (
                ("j1", "/models/stories260K", "v1", "/srv/var/jobs/j1/model", '["/srv/var/jobs/j1/metrics.jsonl"]'),
                ("j2", "stories260K", None, None, "[]")):
            c.execute(text(
                "INSERT INTO jobs (id, owner_id, status, model, training_file_id, method, hyperparameters, metadata, "
                "created_at, trained_tokens, step, result_files, cancel_requested, attempt, suffix, fine_tuned_model) "
                f"VALUES ('{job}', 'u1', 'succeeded', '{model}', 'f1', 'lomo', '{{}}', '{{}}', CURRENT_TIMESTAMP, "
                f"0, 0, '{results}', false, 1, :suffix, :fine_tuned)"), {"suffix": suffix, "fine_tuned": fine_tuned})
    upgrade(database_url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT id, fine_tuned_model, result_files FROM jobs ORDER BY id")).all()
    engine.dispose()
    assert [(r[0], r[1], r[2] if isinstance(r[2], list) else json.loads(r[2])) for r in rows] == [
        ("j1", "ft:stories260K:v1:j1", []), ("j2", None, [])]
