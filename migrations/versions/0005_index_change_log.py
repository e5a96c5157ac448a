"""A log of what changed, so that the search index catches up in O(changes) instead of O(codes).

Why: an open index (or its cache file) of an earlier state was reconciled with the store by reading
every code again — seconds at a million images, for a change of a thousand. Every insert, delete
and relevant update of ``images`` and ``codes`` now appends a row to ``index_changes``, written by
triggers in the same transaction, so no writer (ingest, prune, bulk import, Ray workers, or SQL
typed by hand) can change the searchable content without leaving a trace. Each content state's
change token is logged too (a marker row), so that an index knows whether the database passed
through the state it was built from (a restored backup did not). The log is trimmed from its
oldest end; an index older than the log's oldest marker is rebuilt instead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite: an image's index row changes when it is added or removed, or its content or status changes;
# a code's when it is added, replaced or removed (logged by content: every image of that content).
SQLITE_TRIGGERS = (
    """CREATE TRIGGER index_changes_image_insert AFTER INSERT ON images
       BEGIN INSERT INTO index_changes (image_id) VALUES (NEW.id); END""",
    """CREATE TRIGGER index_changes_image_update AFTER UPDATE OF content_id, status ON images
       WHEN OLD.content_id IS NOT NEW.content_id OR OLD.status IS NOT NEW.status
       BEGIN INSERT INTO index_changes (image_id) VALUES (NEW.id); END""",
    """CREATE TRIGGER index_changes_image_delete AFTER DELETE ON images
       BEGIN INSERT INTO index_changes (image_id) VALUES (OLD.id); END""",
    """CREATE TRIGGER index_changes_code_insert AFTER INSERT ON codes
       BEGIN INSERT INTO index_changes (content_id) VALUES (NEW.content_id); END""",
    """CREATE TRIGGER index_changes_code_update AFTER UPDATE ON codes
       BEGIN
         INSERT INTO index_changes (content_id) VALUES (OLD.content_id);
         INSERT INTO index_changes (content_id) VALUES (NEW.content_id);
       END""",
    """CREATE TRIGGER index_changes_code_delete AFTER DELETE ON codes
       BEGIN INSERT INTO index_changes (content_id) VALUES (OLD.content_id); END""",
)
SQLITE_TRIGGER_NAMES = (
    "index_changes_image_insert",
    "index_changes_image_update",
    "index_changes_image_delete",
    "index_changes_code_insert",
    "index_changes_code_update",
    "index_changes_code_delete",
)

POSTGRES_FUNCTIONS = (
    """CREATE FUNCTION semdb_log_image_change() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'DELETE' THEN
           INSERT INTO index_changes (image_id) VALUES (OLD.id);
           RETURN OLD;
         END IF;
         IF TG_OP = 'UPDATE' AND OLD.content_id IS NOT DISTINCT FROM NEW.content_id
            AND OLD.status IS NOT DISTINCT FROM NEW.status THEN
           RETURN NEW;
         END IF;
         INSERT INTO index_changes (image_id) VALUES (NEW.id);
         RETURN NEW;
       END $$""",
    """CREATE FUNCTION semdb_log_code_change() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP IN ('UPDATE', 'DELETE') THEN
           INSERT INTO index_changes (content_id) VALUES (OLD.content_id);
         END IF;
         IF TG_OP IN ('INSERT', 'UPDATE') THEN
           INSERT INTO index_changes (content_id) VALUES (NEW.content_id);
           RETURN NEW;
         END IF;
         RETURN OLD;
       END $$""",
    """CREATE TRIGGER index_changes_images AFTER INSERT OR UPDATE OR DELETE ON images
       FOR EACH ROW EXECUTE FUNCTION semdb_log_image_change()""",
    """CREATE TRIGGER index_changes_codes AFTER INSERT OR UPDATE OR DELETE ON codes
       FOR EACH ROW EXECUTE FUNCTION semdb_log_code_change()""",
)


def upgrade() -> None:
    op.create_table(
        "index_changes",
        # BIGINT on PostgreSQL (a busy collection can pass 2^31 changes); INTEGER on SQLite, where only
        # an INTEGER PRIMARY KEY is the rowid AUTOINCREMENT keeps increasing.
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("content_id", sa.Integer(), nullable=True),
        sa.Column("token", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_index_changes_token", "index_changes", ["token"], unique=False)
    statements = SQLITE_TRIGGERS if op.get_bind().dialect.name == "sqlite" else POSTGRES_FUNCTIONS
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS index_changes_images ON images")
        op.execute("DROP TRIGGER IF EXISTS index_changes_codes ON codes")
        op.execute("DROP FUNCTION IF EXISTS semdb_log_image_change()")
        op.execute("DROP FUNCTION IF EXISTS semdb_log_code_change()")
    op.drop_index("ix_index_changes_token", table_name="index_changes")
    op.drop_table("index_changes")
