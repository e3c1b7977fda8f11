"""jobs.priority: higher runs first; first come, first served within a priority

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 10:06:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    op.create_index("ix_jobs_queue_order", "jobs", ["status", "priority", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_order", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
