"""semdb's exception classes.

Every error a user can cause is a :class:`SemdbError`; its message is one line that says what was
wrong and how to fix it. The CLI prints that line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class SemdbError(Exception):
    """Base class of the errors that users cause and can fix."""


class InvalidArgumentError(SemdbError, ValueError):
    """A parameter is out of range or malformed (e.g. ``--bits 12``)."""


class DatabaseNotFoundError(SemdbError, FileNotFoundError):
    """The database file does not exist and the command does not create one."""


class ModelMismatchError(SemdbError):
    """The database is bound to another model (or codec) than the one asked for."""


class ModelUnavailableError(SemdbError):
    """A model spec is unknown, or its weights cannot be found or downloaded."""


class ImageReadError(SemdbError):
    """A file could not be decoded as an image (corrupt, truncated, too large, unreadable...)."""


class NotReadyError(SemdbError):
    """The database cannot answer yet (e.g. nothing has been ingested)."""


class DatasetMissingError(SemdbError, FileNotFoundError):
    """A data set needed by the demo, training or evaluation is not installed."""


class NotASemdbDatabaseError(SemdbError):
    """A file is not a semdb database (not SQLite at all, or someone else's SQLite file)."""


class DatabaseDamagedError(SemdbError):
    """A semdb database (or something stored in it, such as a codec state) is damaged."""


class ReadOnlyDatabaseError(SemdbError, PermissionError):
    """A command needs to write a database that this process may only read."""


class SchemaVersionError(SemdbError):
    """The database's schema is older (``older``) or newer than this semdb's."""

    def __init__(self, message: str, *, older: bool = False) -> None:
        super().__init__(message)
        self.older = older


class DatabaseLockedError(SemdbError):
    """Another writer held the database's write lock for longer than the wait allows."""


class DiskFullError(SemdbError, OSError):
    """The disk (or the database's size limit) filled up during a write; committed data is kept."""
