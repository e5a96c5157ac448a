"""Finding image files and decoding them safely.

Everything that can go wrong with a file on disk is turned into a :class:`BadFile` with a one-line
reason (recorded in the database and reported), never an exception that stops an ingest.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from semdb.errors import ImageReadError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)
# Wider or taller images are padded (black) to this ratio before the model sees them: models resize
# the shorter (or the longer) side to their input, and a 1000:1 strip would become a side of 0
# pixels, or a 224 x 224,000 one.
MAX_ASPECT_RATIO = 20
# ISO base media ("ftyp") brands of formats Pillow may lack a decoder for, and what adds one.
_ISOBMFF_BRANDS = {
    b"heic": ("HEIC", "pillow-heif"),
    b"heix": ("HEIC", "pillow-heif"),
    b"hevc": ("HEIC", "pillow-heif"),
    b"mif1": ("HEIF", "pillow-heif"),
    b"msf1": ("HEIF", "pillow-heif"),
    b"avif": ("AVIF", "a Pillow built with AVIF support (Pillow >= 11.3 wheels)"),
    b"avis": ("AVIF", "a Pillow built with AVIF support (Pillow >= 11.3 wheels)"),
}
# Pillow's own decompression-bomb limit is a process-wide setting; semdb's limit (max_pixels)
# replaces it for semdb's own decoding, swapped in under this lock.
_PIXEL_LIMIT_LOCK = threading.Lock()
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
    """A path that cannot be ingested, with the reason.

    ``path`` is the real absolute path (undecodable bytes of a non-UTF-8 name kept as surrogate
    escapes, so distinct names stay distinct); show it with :func:`~semdb.paths.display_path`.
    """

    path: str
    reason: str


def _is_valid_utf8(path: str) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stat_file(path: str) -> FoundFile | BadFile:
    """Stat ``path`` following symlinks; broken links and loops become :class:`BadFile`."""
    absolute = os.path.abspath(path)  # not resolved: a link is recorded where the user sees it
    try:
        info = os.stat(path)
    except OSError as error:
        if os.path.islink(path):
            if error.errno == 40:  # ELOOP
                return BadFile(absolute, "symlink loop")
            return BadFile(absolute, "broken symlink (its target does not exist)")
        return BadFile(absolute, f"cannot stat: {error.strerror or error}")
    if not stat.S_ISREG(info.st_mode):
        return BadFile(absolute, f"not a regular file ({_file_kind(info.st_mode)})")
    if not _is_valid_utf8(path):
        return BadFile(absolute, "file name is not valid UTF-8; rename the file")
    return FoundFile(absolute, info.st_size, info.st_mtime_ns)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


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
            yield BadFile(os.path.abspath(root_str), "no such file or folder")


def _walk(folder: str, seen_dirs: set[tuple[int, int]]) -> Iterator[FoundFile | BadFile]:
    try:
        info = os.stat(folder)
    except OSError as error:
        yield BadFile(os.path.abspath(folder), f"cannot open folder: {error.strerror or error}")
        return
    key = (info.st_dev, info.st_ino)
    if key in seen_dirs:
        if os.path.islink(folder):
            yield BadFile(os.path.abspath(folder), "symlink loop (folder already visited)")
        return
    seen_dirs.add(key)
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
    except OSError as error:
        yield BadFile(os.path.abspath(folder), f"cannot list folder: {error.strerror or error}")
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


def _open_for_reading(path: str) -> int:
    """A descriptor of ``path`` opened so that it can never block: a FIFO or a device named
    ``*.jpg`` (even one swapped in after the folder walk) is recognised by fstat, not read."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))


def read_bytes(path: str) -> bytes:
    """Read a whole regular file, as :class:`ImageReadError` on failure.

    What is checked is the opened file itself (``fstat``), not the name: it must be a regular file
    within :data:`MAX_FILE_BYTES`, and it must not change while it is read.
    """
    try:
        descriptor = _open_for_reading(path)
    except PermissionError:
        raise ImageReadError("permission denied (unreadable file)") from None
    except OSError as error:
        raise ImageReadError(f"cannot read: {error.strerror or error}") from None
    try:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            raise ImageReadError(f"not a regular file ({_file_kind(before.st_mode)})")
        if before.st_size > MAX_FILE_BYTES:
            raise ImageReadError(f"file is {before.st_size} bytes, over the {MAX_FILE_BYTES} byte limit")
        chunks = []
        remaining = before.st_size + 1  # one byte more than expected shows a file that grew
        while remaining > 0:
            chunk = os.read(descriptor, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        after = os.fstat(descriptor)
    except PermissionError:
        raise ImageReadError("permission denied (unreadable file)") from None
    except OSError as error:
        raise ImageReadError(f"cannot read: {error.strerror or error}") from None
    finally:
        os.close(descriptor)
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ImageReadError("file changed while being read; run ingest again when it is complete")
    return data


@contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Switch Pillow's own limit off while opening: :func:`decode_image` applies ``max_pixels``
    right after, from the header, before any pixel is decoded."""
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _missing_decoder(data: bytes) -> str | None:
    """The reason an image in a container Pillow cannot read here was refused, if it is one."""
    if data[4:8] != b"ftyp":
        return None
    known = _ISOBMFF_BRANDS.get(data[8:12])
    if known is None:
        return None
    name, remedy = known
    return f"{name} images cannot be decoded here: install {remedy}"


def _bounded_aspect(image: Image.Image) -> Image.Image:
    """Pad ``image`` with black so that neither side is more than :data:`MAX_ASPECT_RATIO` times the other."""
    width, height = image.size
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return image
    side = -(-max(width, height) // MAX_ASPECT_RATIO)  # ceil
    padded = Image.new("RGB", (max(width, side), max(height, side)))
    padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
    return padded


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing empty, corrupt, truncated and oversized ones.

    GIFs and other multi-frame formats give their first frame. ``min_side``: the caller only needs
    the image with its shorter side at least this long, so a JPEG is decoded at 1/2, 1/4 or 1/8
    scale (DCT scaling) and any other image is reduced right after decoding: what is kept costs
    about ``min_side²`` pixels, not the original's. The full size stays in
    ``image.info[ORIGINAL_SIZE_KEY]``. The result is padded to an aspect ratio of at most
    :data:`MAX_ASPECT_RATIO`. ``max_pixels`` replaces Pillow's own decompression-bomb limit, up or down.
    """
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want a hard limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pillow_limit_off():
                image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"possible decompression bomb, not decoded: {width}x{height} = {width * height} pixels, "
                    f"over the {max_pixels} pixel limit (raise --max-pixels to allow it)"
                )
            if width < 1 or height < 1:
                raise ImageReadError(f"image has no pixels ({width}x{height})")
            image.seek(0)
            if min_side is not None and image.format == "JPEG":
                # draft() picks the smallest DCT scale whose result is at least the requested size.
                scale = max(1, min(width, height) // min_side)
                image.draft("RGB", (max(1, width // scale), max(1, height // scale)))
            image.load()
            if min_side is not None:
                factor = min(image.size) // min_side
                if factor >= 2:
                    image = image.reduce(factor)  # box filter over factor x factor blocks: fast, no aliasing
            rgb = _to_rgb(image)
            rgb = _bounded_aspect(rgb)
            rgb.info[ORIGINAL_SIZE_KEY] = (width, height)
            return rgb
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(_missing_decoder(data) or "not an image, or corrupt (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"possible decompression bomb, not decoded: {error}") from None
    except MemoryError:
        raise ImageReadError("not enough memory to decode this image (lower --max-pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, struct.error) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageReadError(f"corrupt or truncated image: {message}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB: transparency over black, 16-bit and float greys scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode the image at ``path`` (e.g. a query image)."""
    return decode_image(read_bytes(os.fspath(path)), max_pixels)
