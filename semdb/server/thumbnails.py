"""Thumbnails made on demand from the original files, cached on disk within a size bound.

The database keeps no pixels, so a thumbnail is made from the file the first time it is asked
for and kept under the content's sha256 (a changed file has another sha256, so a cached
thumbnail is never stale, and copies of one picture share it). The original is served, and a
thumbnail made, only if the file still hashes to the content the database holds: a file replaced
after ingest — by another picture, or by a symlink to something private — is refused.
When the cache outgrows its bound, the least recently used thumbnails are deleted.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image

from semdb.errors import ImageReadError, SemdbError
from semdb.images import decode_image, file_sha256, read_bytes
from semdb.store.repository import ImageDetails

THUMBNAIL_SIDE = 256
DEFAULT_CACHE_BYTES = 256 * 2**20
_SUFFIX = ".webp"


class OriginalUnavailableError(SemdbError):
    """An image's original file is missing, unreadable, or no longer what was ingested."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/semdb/thumbnails`` (``~/.cache/semdb/thumbnails``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "semdb" / "thumbnails"


def read_original(details: ImageDetails) -> bytes:
    """The bytes of an indexed image's file, if it still is the content the database holds.

    ``read_bytes`` opens what the stored path names now and checks it is a regular file; the
    sha256 check then refuses anything but the ingested picture, whatever the path leads to.
    """
    path = os.fsdecode(details.path_bytes)
    if not os.path.lexists(path):
        raise OriginalUnavailableError(f"the original {details.path} is missing (moved or deleted)", missing=True)
    try:
        data = read_bytes(path)
    except ImageReadError as error:
        raise OriginalUnavailableError(f"the original {details.path} cannot be read: {error}", missing=False) from None
    if file_sha256(data) != details.sha256:
        raise OriginalUnavailableError(
            f"{details.path} changed since it was ingested; run `semdb ingest` on its folder", missing=False
        )
    return data


class ThumbnailCache:
    """WebP thumbnails (at most ``side`` px a side) under ``folder``, at most ``max_bytes`` in all."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_CACHE_BYTES, side: int = THUMBNAIL_SIDE) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.side = side
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.total_bytes = sum(entry.stat().st_size for entry in self._entries())

    def _entries(self) -> list[os.DirEntry[str]]:
        with os.scandir(self.folder) as entries:
            return [entry for entry in entries if entry.name.endswith(_SUFFIX) and entry.is_file()]

    def _path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}-{self.side}{_SUFFIX}"

    def get(self, details: ImageDetails) -> tuple[bytes, bool]:
        """The thumbnail of an indexed image and whether it came from the cache."""
        path = self._path(details.sha256)
        try:
            data = path.read_bytes()
            os.utime(path)  # the mtime is the last use, for eviction
            return data, True
        except FileNotFoundError:
            pass
        data = self.make(read_original(details))
        self._store(path, data)
        return data, False

    def make(self, original: bytes) -> bytes:
        """Image bytes → WebP thumbnail bytes fitting ``side`` x ``side``."""
        try:
            image = decode_image(original, min_side=self.side)
        except ImageReadError as error:
            raise OriginalUnavailableError(f"the original cannot be decoded: {error}", missing=False) from None
        image.thumbnail((self.side, self.side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=80, method=4)
        return buffer.getvalue()

    def _store(self, path: Path, data: bytes) -> None:
        """Write atomically (a reader never sees half a file), then evict down to the bound."""
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # deleted while serving: made again
            descriptor, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            return  # a cache that cannot be written (gone, full, read-only) only costs speed
        with self._lock:
            self.total_bytes += len(data)
            if self.total_bytes > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        """Delete the least recently used thumbnails until the cache is within 90% of its bound."""
        entries = sorted(self._entries(), key=lambda entry: entry.stat().st_mtime_ns)
        total = sum(entry.stat().st_size for entry in entries)
        for entry in entries:
            if total <= 0.9 * self.max_bytes:
                break
            size = entry.stat().st_size
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            total -= size
        self.total_bytes = total
