"""One active codec, a database identity and a change token.

Why: two ingests into a new database each trained their own codec, and codes made by one were
decoded with the other. ``codecs.active`` with a unique partial index makes a second active codec
impossible, whoever writes. The index cache was tagged only with a counter that repeats across
databases and after a restore; ``database_id`` (random, set once) and ``change_token`` (random,
new at every change) let the cache tell a foreign or stale copy from its own. ``format`` marks the
file as semdb's, so that a newer semdb's database can be told apart from someone else's SQLite file.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN: SQLite does it in place (a batch rebuild would drop a table that codes reference).
    op.add_column("codecs", sa.Column("active", sa.Boolean(), server_default=sa.false(), nullable=False))
    # The most recent codec was the one in use.
    op.execute("UPDATE codecs SET active = (id = (SELECT max(id) FROM codecs))")
    op.create_index(
        "uq_codecs_one_active",
        "codecs",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )
    settings = sa.table("settings", sa.column("key", sa.String), sa.column("value", sa.Text))
    connection = op.get_bind()
    present = {row[0] for row in connection.execute(sa.select(settings.c.key))}
    for key, value in (
        ("format", "semdb"),
        ("database_id", uuid.uuid4().hex),
        ("change_token", uuid.uuid4().hex),
        ("generation", "0"),
    ):
        if key not in present:
            connection.execute(sa.insert(settings).values(key=key, value=value))


def downgrade() -> None:
    op.drop_index("uq_codecs_one_active", table_name="codecs")
    with op.batch_alter_table("codecs", schema=None) as batch_op:
        batch_op.drop_column("active")
    op.execute("DELETE FROM settings WHERE key IN ('format', 'database_id', 'change_token')")
