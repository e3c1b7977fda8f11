"""gpu_leases.attempt: the attempt of the job a lease was taken for (a recovered job's old attempt
releases nothing of the new one's)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 22:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gpu_leases") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gpu_leases") as batch:
        batch.drop_column("attempt")
