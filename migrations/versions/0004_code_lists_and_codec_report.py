"""Room for inverted lists and for what a codec reports about itself.

Why: a collection of millions is searched by probing a few inverted lists instead of scanning every
code. Each code's list is assigned at ingest from its float embedding (which is gone afterwards), so
the list number is stored beside the code, and the coarse centroids are stored with the codec that
was trained with them. A codec also records why it was chosen and how faithful its codes are on the
collection's own images (JSON), so ``semdb stats`` can say so.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("list_no", sa.Integer(), nullable=True))
    with op.batch_alter_table("codecs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lists", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("report", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("codecs", schema=None) as batch_op:
        batch_op.drop_column("report")
        batch_op.drop_column("lists")
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.drop_column("list_no")
