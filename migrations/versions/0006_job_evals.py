"""jobs.evals (the evaluations a job asked for) and eval_results.truncated

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 12:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("evals", sa.JSON(), nullable=True))
    with op.batch_alter_table("eval_results") as batch:
        batch.add_column(sa.Column("truncated", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("eval_results") as batch:
        batch.drop_column("truncated")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("evals")
