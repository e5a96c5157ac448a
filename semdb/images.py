"""Finding image files and decoding them safely.

Everything that can go wrong with a file on disk is turned into a :class:`BadFile` with a one-line
reason (recorded in the database and reported), never an exception that stops an ingest.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from semdb.errors import ImageReadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# Decompression-bomb guard: refuse images with more pixels than this (PIL's own default is ~89 M).
DEFAULT_MAX_PIXELS = 64_000_000
# Where decode_image leaves an image's full (width, height) when it decoded it at a reduced scale.
ORIGINAL_SIZE_KEY = "semdb_original_size"
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class FoundFile:
    """A candidate image file: its path as stored (str) and its stat at discovery time."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class BadFile:
    """A path that cannot be ingested, with the reason."""

    path: str
    reason: str


def display_path(path: str | bytes) -> str:
    """A path as valid UTF-8 text: undecodable bytes are shown as ``\\xNN`` escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def _is_valid_utf8(path: str) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stat_file(path: str) -> FoundFile | BadFile:
    """Stat ``path`` following symlinks; broken links and loops become :class:`BadFile`."""
    try:
        info = os.stat(path)
    except OSError as error:
        if os.path.islink(path):
            if error.errno == 40:  # ELOOP
                return BadFile(display_path(path), "symlink loop")
            return BadFile(display_path(path), "broken symlink (its target does not exist)")
        return BadFile(display_path(path), f"cannot stat: {error.strerror or error}")
    if not stat.S_ISREG(info.st_mode):
        return BadFile(display_path(path), "not a regular file")
    if not _is_valid_utf8(path):
        return BadFile(display_path(path), "file name is not valid UTF-8; rename the file")
    return FoundFile(os.path.abspath(path), info.st_size, info.st_mtime_ns)


def find_images(roots: Iterable[str | os.PathLike[str]]) -> Iterator[FoundFile | BadFile]:
    """Walk ``roots`` (files or folders, recursively) and yield image candidates and bad paths.

    Folders contribute files with an image suffix; a file named explicitly is always tried.
    Symlinked folders are followed once (loops are detected and reported, not followed forever).
    Each path is yielded once, in a stable (sorted) order.
    """
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root_str = os.fspath(root)
        if os.path.isdir(root_str):
            yield from _walk(root_str, seen_dirs)
        elif os.path.lexists(root_str):
            yield _stat_file(root_str)
        else:
            yield BadFile(display_path(root_str), "no such file or folder")


def _walk(folder: str, seen_dirs: set[tuple[int, int]]) -> Iterator[FoundFile | BadFile]:
    try:
        info = os.stat(folder)
    except OSError as error:
        yield BadFile(display_path(folder), f"cannot open folder: {error.strerror or error}")
        return
    key = (info.st_dev, info.st_ino)
    if key in seen_dirs:
        if os.path.islink(folder):
            yield BadFile(display_path(folder), "symlink loop (folder already visited)")
        return
    seen_dirs.add(key)
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
    except OSError as error:
        yield BadFile(display_path(folder), f"cannot list folder: {error.strerror or error}")
        return
    for entry in entries:
        path = os.path.join(folder, entry.name)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(path, seen_dirs)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            yield _stat_file(path)


def file_sha256(data: bytes) -> str:
    """Hex sha256 of a file's bytes: the content key that dedups copies under other paths."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str) -> bytes:
    """Read a whole file, as :class:`ImageReadError` on failure."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ImageReadError(f"file is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
        with open(path, "rb") as handle:
            return handle.read()
    except PermissionError:
        raise ImageReadError("permission denied (unreadable file)") from None
    except OSError as error:
        raise ImageReadError(f"cannot read: {error.strerror or error}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing empty, corrupt, truncated and oversized ones.

    GIFs and other multi-frame formats give their first frame. ``min_side``: the caller only needs
    the image with its shorter side at least this long, so a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale (several times faster); the full size stays in ``image.info[ORIGINAL_SIZE_KEY]``.
    """
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want a hard limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"possible decompression bomb, not decoded: {width}x{height} = {width * height} pixels, "
                    f"over the {max_pixels} pixel limit (raise --max-pixels to allow it)"
                )
            image.seek(0)
            if min_side is not None and image.format == "JPEG":
                # draft() picks the smallest DCT scale whose result is at least the requested size.
                scale = max(1, min(width, height) // min_side)
                image.draft("RGB", (max(1, width // scale), max(1, height // scale)))
            image.load()
            rgb = image.convert("RGB")
            rgb.info[ORIGINAL_SIZE_KEY] = (width, height)
            return rgb
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or corrupt (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"possible decompression bomb, not decoded: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageReadError(f"corrupt or truncated image: {message}") from None


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode the image at ``path`` (e.g. a query image)."""
    return decode_image(read_bytes(os.fspath(path)), max_pixels)
