"""Finding image files and decoding them safely.

Everything that can go wrong with a file on disk is turned into a :class:`BadFile` with a one-line
reason (recorded in the database and reported), never an exception that stops an ingest.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import io
import math
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
from semdb.paths import display_path as display_path  # re-exported: it used to live here

IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".avif",
        ".heic",
        ".heif",
        ".jxl",
    }
)
# Wider or taller images are padded (black) to this ratio before the model sees them: models resize
# the shorter (or the longer) side to their input, and a 1000:1 strip would become a side of 0
# pixels, or a 224 x 224,000 one.
MAX_ASPECT_RATIO = 20
# Downscaling filter: Lanczos after a box reduce() by the integer part of the factor (reducing_gap),
# which Pillow documents as indistinguishable from a full Lanczos resample, at a fraction of the cost.
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0
# EXIF orientation tag → the transpose that shows the picture upright (the EXIF 2.3 table).
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
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
# The plugin packages that add a decoder to Pillow, by the import name that registers them.
_PLUGIN_REGISTRARS = {"pillow_heif": "register_heif_opener", "pillow_jxl": None, "pillow_avif": None}
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
    except OSError as error:
        raise ImageReadError(_open_failure(path, error)) from None
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


def _open_failure(path: str, error: OSError) -> str:
    """The one-line reason ``os.open(path)`` failed with ``error``."""
    if isinstance(error, PermissionError):
        return "permission denied (unreadable file)"
    if error.errno == errno.ENOENT:
        if os.path.islink(path):
            return "broken symlink (its target does not exist)"
        return "file vanished before it could be read (moved or deleted)"
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if error.errno in (errno.ENXIO, errno.ENODEV):  # what open() says of a socket or a device with no driver
        with contextlib.suppress(OSError):
            return f"not a regular file ({_file_kind(os.stat(path).st_mode)})"
    return f"cannot read: {error.strerror or error}"


@contextmanager
def _pillow_limit_at_least(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's own limit to ``max_pixels`` while opening, where it is lower.

    :func:`decode_image` applies ``max_pixels`` itself right after, from the header, before any
    pixel is decoded. Pillow's limit is a process-wide global, so this is a compromise: the lock
    keeps semdb's threads from restoring each other's values, and the global is only ever raised
    (never switched off), to semdb's limit, for the time of an ``Image.open`` (a header parse), so
    another thread opening an image at that moment gets a guard no looser than ``max_pixels``.
    Serialising whole decodes instead would stall the decode thread behind a query's.
    """
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and previous < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


@functools.cache
def _register_decoder_plugins() -> None:
    """Let Pillow open HEIC/HEIF, JPEG XL and AVIF through the plugin packages installed here, once."""
    for module_name, registrar in _PLUGIN_REGISTRARS.items():
        try:
            module = importlib.import_module(module_name)  # pillow_jxl and pillow_avif register on import
        except ImportError:
            continue
        if registrar is not None:
            getattr(module, registrar)()


def _bomb_refusal(size: tuple[int, int], max_pixels: int) -> str:
    width, height = size
    return (
        f"possible decompression bomb, not decoded: {width}x{height} = {width * height} pixels, "
        f"over the {max_pixels} pixel limit (raise --max-pixels to allow it)"
    )


def _missing_decoder(data: bytes) -> str | None:
    """The reason an image in a format Pillow cannot read here was refused, if it is one."""
    if data.startswith((b"\xff\x0a", b"\0\0\0\x0cJXL \r\n\x87\n")):  # a JPEG XL codestream, or its container
        return "JPEG XL images cannot be decoded here: install pillow-jxl-plugin"
    if data[4:8] != b"ftyp":
        return None
    known = _ISOBMFF_BRANDS.get(data[8:12])
    if known is None:
        return None
    name, remedy = known
    return f"{name} images cannot be decoded here: install {remedy}"


def _resizable(image: Image.Image) -> Image.Image:
    """``image`` in a mode that Pillow reduces and resizes with real filters, as few bands as will do.

    Pillow's ``reduce`` refuses 1-bit, palette and 16-bit images, ``resize`` refuses 16-bit ones and
    takes the nearest pixel for 1-bit and palette ones; greys stay one band (cheaper than RGB until
    the last step).
    """
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if image.mode.startswith("I;16"):
        return _grey_to_8_bits(image)
    return image


def _ratio_for(side: int, max_ratio: int = MAX_ASPECT_RATIO) -> int:
    """The aspect ratio strips are padded to for a model of input ``side``: ``max_ratio``, or ``side``
    if smaller, so that a resize of the long side to ``side`` leaves the short one at least a pixel."""
    return min(max_ratio, max(1, side))


def _target_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The smallest size worth keeping of an image of ``size`` for a model that wants ``min_side``.

    The shorter side is brought down to ``min_side``, and the longer one to at most ``ratio *
    min_side`` (:func:`_ratio_for`): :func:`pad_to_aspect_ratio` would shrink it to that anyway.
    Never enlarged.
    """
    width, height = size
    scale = min(1.0, min_side / min(width, height), _ratio_for(min_side) * min_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def pad_to_aspect_ratio(image: Image.Image, side: int, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """``image`` if neither side is more than ``max_ratio`` times the other; else the image, its long
    side shrunk to at most ``max_ratio * side``, centred on a black canvas of exactly that ratio.

    ``side`` is the model's input side (the ratio is held to at most that, :func:`_ratio_for`). What
    a fit-and-pad model sees of a strip is unchanged (it pads with black anyway); a crop model sees
    the strip across the centre of its square. The canvas costs at most ``max_ratio * side²`` pixels,
    however long the strip.
    """
    ratio = _ratio_for(side, max_ratio)
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long <= ratio * short:
        return image
    image = _resizable(image)
    new_long = min(long, ratio * side)
    if new_long < long:
        new_short = max(1, round(short * new_long / long))
        image = image.resize((new_long, new_short) if width >= height else (new_short, new_long), _RESAMPLE)
    canvas_short = math.ceil(new_long / ratio)
    canvas = Image.new(image.mode, (new_long, canvas_short) if width >= height else (canvas_short, new_long))
    canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
    return canvas


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing empty, corrupt, truncated and oversized ones.

    GIFs and other multi-frame formats give their first frame. ``min_side``: the caller only needs
    the image with its shorter side at least this long, so a JPEG is decoded at 1/2, 1/4 or 1/8
    scale (DCT scaling) and every image is then resized, as soon as it is decoded and before it is
    made RGB, to :func:`_target_size` (short side ``min_side``, long side at most
    ``MAX_ASPECT_RATIO * min_side``) and padded to that aspect ratio (:func:`pad_to_aspect_ratio`):
    what a batch keeps costs at most ``MAX_ASPECT_RATIO * min_side²`` pixels per image, not the
    original's. Without ``min_side`` the image keeps its decoded size (within ``max_pixels``).
    The full size stays in ``image.info[ORIGINAL_SIZE_KEY]``. ``max_pixels`` replaces Pillow's own
    decompression-bomb limit, up or down.
    """
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    _register_decoder_plugins()
    width = height = 0
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want a hard limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pillow_limit_at_least(max_pixels):
                image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(_bomb_refusal((width, height), max_pixels))
            if width < 1 or height < 1:
                raise ImageReadError(f"image has no pixels ({width}x{height})")
            image.seek(0)
            target = (width, height) if min_side is None else _target_size((width, height), min_side)
            if target != (width, height) and image.format in ("JPEG", "MPO"):
                # draft() picks the smallest DCT scale whose result is at least the requested size.
                image.draft(None, target)
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if image.size != target:
                image = _resizable(image).resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
            if orientation in _EXIF_TRANSPOSE:
                # Phones store pictures sideways and say how to turn them; the model should see them upright.
                image = image.transpose(_EXIF_TRANSPOSE[orientation])
            if min_side is not None:
                image = pad_to_aspect_ratio(image, min_side)
            rgb = _to_rgb(image)
            rgb.info[ORIGINAL_SIZE_KEY] = (width, height)
            return rgb
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(_missing_decoder(data) or "not an image, or corrupt (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's limit is at least max_pixels while semdb opens an image, so this image (or one of
        # its frames) is over semdb's limit; Pillow raised before the size was known here.
        if width and height:
            raise ImageReadError(_bomb_refusal((width, height), max_pixels)) from None
        raise ImageReadError(
            f"possible decompression bomb, not decoded: over the {max_pixels} pixel limit "
            "(raise --max-pixels to allow it)"
        ) from None
    except MemoryError:
        raise ImageReadError("not enough memory to decode this image (lower --max-pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, struct.error) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageReadError(f"corrupt or truncated image: {message}") from None


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image → mode ``L``: 16-bit scaled from its full range, the
    others from their maximum (Pillow's own conversion clips them at 255)."""
    pixels = np.asarray(image, dtype=np.float32)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
    return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB: transparency over black, 16-bit and float greys scaled to 8 bits."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _grey_to_8_bits(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode the image at ``path`` (e.g. a query image); errors name the path."""
    name = os.fspath(path)
    if not os.path.lexists(name):
        raise ImageReadError(f"cannot read {display_path(name)}: no such file")
    try:
        return decode_image(read_bytes(name), max_pixels)
    except ImageReadError as error:
        raise ImageReadError(f"cannot use {display_path(name)}: {error}") from None
