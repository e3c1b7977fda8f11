"""jobs across nodes: jobs.placement, gpu_leases.node_rank / joined_by, nodes.cpu_ranks

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=True))
    with op.batch_alter_table("gpu_leases") as batch_op:
        batch_op.add_column(sa.Column("node_rank", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("joined_by", sa.String(200), nullable=True))
    with op.batch_alter_table("nodes") as batch_op:
        batch_op.add_column(sa.Column("cpu_ranks", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch_op:
        batch_op.drop_column("cpu_ranks")
    with op.batch_alter_table("gpu_leases") as batch_op:
        batch_op.drop_column("joined_by")
        batch_op.drop_column("node_rank")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("placement")
