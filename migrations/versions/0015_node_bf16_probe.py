"""nodes.cpu_bf16_slowdown: a CPU node's bf16 matmul time over fp32's, measured at its workers' start

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch_op:
        batch_op.add_column(sa.Column("cpu_bf16_slowdown", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch_op:
        batch_op.drop_column("cpu_bf16_slowdown")
