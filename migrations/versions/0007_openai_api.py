"""OpenAI-shaped API: the integrations a job was created with, deleted fine-tuned models,
checkpoint metrics and removal, idempotency keys, and indexes on the files a job names

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:40:00
"""

from __future__ import annotations

from pathlib import PurePath

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("integrations", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("model_deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_jobs_training_file_id", ["training_file_id"])
        batch.create_index("ix_jobs_validation_file_id", ["validation_file_id"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    _names_instead_of_paths()
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("object_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner_id", "route", "key", name="uq_idempotency_keys_owner_route_key"),
    )


def _names_instead_of_paths() -> None:
    """Jobs from before this revision stored their model's folder in fine_tuned_model and the paths of
    their output files in result_files: a fine-tuned model is named now (ft:<base>:<suffix>:<job id>),
    and result files are uploaded files, so those paths are replaced by the name and dropped."""
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("model", sa.String),
                    sa.column("suffix", sa.String), sa.column("fine_tuned_model", sa.String),
                    sa.column("result_files", sa.JSON))
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.model, jobs.c.suffix, jobs.c.fine_tuned_model,
                                        jobs.c.result_files)).all()
    for job_id, model, suffix, fine_tuned, result_files in rows:
        values = {}
        if fine_tuned and not fine_tuned.startswith("ft:"):
            base = model.split(":")[1] if model.startswith("ft:") else (
                PurePath(model.rstrip("/")).name or "model").replace(":", "-")
            values["fine_tuned_model"] = f"ft:{base}:{suffix or ''}:{job_id}"
        if result_files and any(str(item).startswith("/") for item in result_files):
            values["result_files"] = []
        if values:
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("metrics")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_validation_file_id")
        batch.drop_index("ix_jobs_training_file_id")
        batch.drop_column("model_deleted_at")
        batch.drop_column("integrations")
