"""Image paths stored as the file system's bytes.

Why: paths were stored as text, and a file name that is not valid UTF-8 was stored in a readable
escaped form (``a\\xffb.png``) — the same text as a file literally named ``a\\xffb.png``, so one of
the two flipped between indexed and skipped on every run. The bytes of ``os.fsencode(path)`` are
the file's real name: distinct names stay distinct, and semdb shows them readably when it prints.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On SQLite this rebuilds the images table (nothing references it), copying CAST(path AS BLOB):
    # the UTF-8 bytes of each stored path.
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.alter_column(
            "path",
            existing_type=sa.Text(),
            type_=sa.LargeBinary(),
            existing_nullable=False,
            postgresql_using="convert_to(path, 'UTF8')",
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.alter_column(
            "path",
            existing_type=sa.LargeBinary(),
            type_=sa.Text(),
            existing_nullable=False,
            postgresql_using="convert_from(path, 'UTF8')",
        )
