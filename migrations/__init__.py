"""Alembic revisions of the semdb schema (installed as ``semdb._migrations``)."""
