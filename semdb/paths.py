"""File paths as semdb stores and shows them.

A path is stored as its file system bytes (``os.fsencode``), so that names in any encoding stay
distinct, and shown as valid UTF-8 text, with undecodable bytes escaped.
"""

from __future__ import annotations

import os


def display_path(path: str | bytes) -> str:
    """A path as valid UTF-8 text: undecodable bytes are shown as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
