"""jobs.preempted_by (the waiting job a pausing job makes room for: it goes back to the queue, not to
paused) and jobs.preemptions (how many times it was preempted)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preempted_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("preemptions", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preemptions")
        batch.drop_column("preempted_by")
