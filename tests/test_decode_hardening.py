"""Every kind of image file, and every kind of non-file named like one: indexed or skipped with a
reason, never a crash, never a hang."""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import struct
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FakeEncoder
from PIL import Image

import semdb
import semdb.images
from semdb.encoder import OpenClipEncoder, load_encoder
from semdb.errors import ImageReadError
from semdb.images import (
    MAX_ASPECT_RATIO,
    ORIGINAL_SIZE_KEY,
    BadFile,
    FoundFile,
    decode_image,
    find_images,
    load_image,
    read_bytes,
)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size", [(100, 1), (1, 1000), (1, 1), (3000, 2)])
def test_extreme_aspect_ratios_reach_the_model(size: tuple[int, int]) -> None:
    from semdb.bundled import make_preprocess

    image = decode_image(encoded(noise(*size), "PNG"), min_side=56)
    assert max(image.size) <= MAX_ASPECT_RATIO * min(image.size)
    assert image.info[ORIGINAL_SIZE_KEY] == size
    assert tuple(make_preprocess(28)(image).shape) == (3, 28, 28)  # raised "height and width must be > 0"


def test_an_extreme_query_image_can_be_searched_with(tmp_path: Path) -> None:
    from semdb.bundled import make_preprocess

    path = tmp_path / "strip.png"
    noise(1, 1000).save(path)
    assert tuple(make_preprocess(28)(load_image(path)).shape) == (3, 28, 28)


def image_kinds() -> dict[str, bytes]:
    sixteen = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16))
    palette = noise(32, 32).convert("P")
    frames = [noise(24, 24, seed=i) for i in range(3)]
    return {
        "16-bit.png": encoded(sixteen, "PNG"),
        "cmyk.jpg": encoded(noise(40, 30, "CMYK"), "JPEG"),
        "palette-alpha.png": encoded(palette, "PNG", transparency=0),
        "grey-alpha.png": encoded(noise(20, 20, "LA"), "PNG"),
        "one-bit.png": encoded(noise(20, 20, "1"), "PNG"),
        "animated.gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.webp": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "photo.jfif": encoded(noise(30, 30), "JPEG"),
        "photo.jpe": encoded(noise(30, 31), "JPEG"),
    }


@pytest.mark.parametrize("name", sorted(image_kinds()))
def test_every_image_kind_decodes_to_rgb(name: str) -> None:
    image = decode_image(image_kinds()[name])
    assert image.mode == "RGB" and min(image.size) >= 1


def test_sixteen_bit_greys_keep_their_range() -> None:
    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64))
    pixels = np.asarray(decode_image(encoded(ramp, "PNG")))
    assert pixels.min() == 0 and pixels.max() == 255


def test_formats_without_a_decoder_here_say_what_to_install(tmp_path: Path) -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + os.urandom(200)
    with pytest.raises(ImageReadError, match="HEIC images cannot be decoded here: install pillow-heif"):
        decode_image(heic)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "phone.heic").write_bytes(heic)
    avif = tmp_path / "photos" / "modern.avif"
    try:
        noise(32, 32).save(avif, "AVIF")
    except (KeyError, OSError):  # a Pillow without an AVIF encoder: a fake file, to be reported
        avif.write_bytes(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + os.urandom(200))
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    report = db.ingest(tmp_path / "photos")
    skipped = dict(report.skipped)
    assert "pillow-heif" in skipped[str(tmp_path / "photos" / "phone.heic")]
    assert report.added == 1 or "AVIF" in skipped[str(avif)]


def test_fifos_devices_and_folders_named_like_images_never_block(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zeros.jpg").symlink_to("/dev/zero")
    (folder / "album.jpg").mkdir()
    noise(8, 8).save(folder / "album.jpg" / "inside.png")
    noise(8, 8, seed=1).save(folder / "good.png")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    report = db.ingest(folder)
    skipped = {Path(path).name: reason for path, reason in report.skipped}
    assert "FIFO" in skipped["pipe.jpg"] and "character device" in skipped["zeros.jpg"]
    assert report.added == 2  # good.png, and album.jpg/inside.png: the folder was walked


def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(noise(8, 8), "JPEG"))
    found = [item for item in find_images([tmp_path]) if isinstance(item, semdb.images.FoundFile)]
    path.unlink()
    os.mkfifo(path)  # nobody writes it: a blocking open would wait forever
    assert stat.S_ISFIFO(os.stat(found[0].path).st_mode)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_bytes(found[0].path)


def test_bad_paths_are_recorded_absolute_whatever_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "dangling.png").symlink_to("missing.png")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    for working in (tmp_path, folder):
        monkeypatch.chdir(working)
        db.ingest(os.path.relpath(folder / "sub", working))
    assert db.skipped() == [(str(folder / "sub" / "dangling.png"), "broken symlink (its target does not exist)")]


def test_a_non_utf8_name_and_its_escaped_look_alike_stay_two_files(tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    literal = folder / "a\\xffb.png"  # a real name with a backslash, x, f, f
    noise(8, 8).save(literal)
    raw = os.path.join(os.fsencode(folder), b"a\xffb.png")  # the byte 0xff: not UTF-8
    with open(raw, "wb") as handle:
        handle.write(encoded(noise(8, 8, seed=3), "PNG"))
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    for _ in range(3):  # the same answer on every run: nothing flips between indexed and skipped
        db.ingest(folder)
        stats = db.stats()
        assert (stats.images, stats.skipped) == (1, 1)
        assert [path for path, _ in db.skipped()] == [str(literal)]  # shown escaped: the same text
        assert [hit.path for hit in db.search("red", k=2)] == [str(literal)]


def test_large_images_are_kept_at_about_the_size_the_model_needs() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = decode_image(encoded(noise(2000, 1500), fmt), min_side=112)
        assert 112 <= min(image.size) < 2 * 112, (fmt, image.size)
        assert image.info[ORIGINAL_SIZE_KEY] == (2000, 1500)


# --- strips: padded where the model's side is known, never enlarged past it ------------------------

EXTREME_SIZES = [(100, 1), (1, 1000), (1, 1), (1000, 3), (3, 5000)]


@pytest.mark.parametrize("min_side", [None, 64])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("size", EXTREME_SIZES)
def test_strips_go_through_the_bundled_preprocess(size: tuple[int, int], fmt: str, min_side: int | None) -> None:
    from semdb.bundled import make_preprocess

    image = decode_image(encoded(Image.new("RGB", size, (230, 230, 230)), fmt), min_side=min_side)
    assert image.info[ORIGINAL_SIZE_KEY] == size
    pixels = make_preprocess(32)(image)
    assert tuple(pixels.shape) == (3, 32, 32)
    assert torch.isfinite(pixels).all()


@pytest.fixture(scope="module")
def longest_side_encoder(tiny_model_spec: str) -> OpenClipEncoder:
    """The tiny open_clip model behind open_clip's own fit-and-pad preprocess (``resize_mode="longest"``),
    which gives a strip a side of 0 pixels; it records the size of every image it is given."""
    import open_clip

    encoder = load_encoder(tiny_model_spec, device="cpu")
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    seen: list[tuple[int, int]] = []

    def recording(image: Image.Image) -> torch.Tensor:
        seen.append(image.size)
        return transform(image)

    encoder.preprocess = recording
    encoder.seen_sizes = seen  # type: ignore[attr-defined]
    return encoder


def test_the_open_clip_encoder_pads_strips_to_a_bounded_size(longest_side_encoder: OpenClipEncoder) -> None:
    seen = longest_side_encoder.seen_sizes  # type: ignore[attr-defined]
    seen.clear()
    images = [Image.new("RGB", size, (200, 30, 30)) for size in [*EXTREME_SIZES, (1, 100_000), (40, 30)]]
    embeddings = longest_side_encoder.encode_images(images)
    assert embeddings.shape == (len(images), longest_side_encoder.dim)
    assert np.isfinite(embeddings).all()
    assert seen[-1] == (40, 30)  # ordinary images reach the model untouched
    for width, height in seen:
        assert max(width, height) <= MAX_ASPECT_RATIO * min(width, height)
        assert max(width, height) <= MAX_ASPECT_RATIO * 32  # at most ratio × the model's side, however long


def test_strips_are_ingested(tmp_path: Path, longest_side_encoder: OpenClipEncoder) -> None:
    folder = tmp_path / "strips"
    folder.mkdir()
    for i, size in enumerate(EXTREME_SIZES):
        noise(*size, seed=i).save(folder / f"strip{i}.png")
    for i in range(4):
        noise(40, 30, seed=10 + i).save(folder / f"photo{i}.jpg")
    db = semdb.connect(tmp_path / "db.semdb", encoder=longest_side_encoder, bits=8)
    report = db.ingest(folder)
    assert report.skipped == []
    assert db.stats().images == len(EXTREME_SIZES) + 4


def test_a_strip_loaded_as_a_query_can_be_encoded(tmp_path: Path, longest_side_encoder: OpenClipEncoder) -> None:
    path = tmp_path / "query.png"
    noise(1, 1000).save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (1, 1000))  # no model side known: not padded here
    assert longest_side_encoder.encode_images([image]).shape == (1, longest_side_encoder.dim)


def test_the_long_side_of_a_strip_is_bounded_as_it_is_decoded() -> None:
    # Padded at full length, a 4000×20 strip would become 4000×200 (a 2×100,000 one, a few hundred
    # bytes of PNG, 1.5 GB); what the model can use along it is ratio × its side.
    image = decode_image(encoded(noise(4000, 20), "PNG"), min_side=40)
    assert image.size == (MAX_ASPECT_RATIO * 40, 40)  # reduced to 800×4, then padded to 20:1
    assert image.info[ORIGINAL_SIZE_KEY] == (4000, 20)


# --- every pixel mode, reduced as soon as it is decoded -------------------------------------------


def _sixteen_bit() -> bytes:
    return encoded(Image.fromarray(np.full((64, 64), 40_000, np.uint16)), "PNG")


def _cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(0, (0, 0, 64, 8))  # a transparent band at the top
    return encoded(image, "PNG", transparency=0)


def _grey_alpha() -> bytes:
    return encoded(Image.new("LA", (64, 64), (200, 255)), "PNG")


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), colour) for colour in [(0, 0, 255), (255, 0, 0)]]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)


def _one_bit() -> bytes:
    return encoded(Image.new("1", (64, 64), 1), "PNG")


KINDS: dict[str, tuple[Callable[[], bytes], tuple[int, int, int]]] = {
    "16-bit PNG": (_sixteen_bit, (155, 155, 155)),
    "CMYK JPEG": (_cmyk_jpeg, (255, 0, 0)),
    "palette PNG with transparency": (_palette_with_transparency, (255, 0, 0)),
    "LA PNG": (_grey_alpha, (200, 200, 200)),
    "animated GIF": (lambda: _animated("GIF"), (0, 0, 255)),
    "animated WebP": (lambda: _animated("WEBP"), (0, 0, 255)),
    "1-bit PNG": (_one_bit, (255, 255, 255)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("min_side", [None, 16])
def test_every_image_kind_is_reduced_in_its_colours(kind: str, min_side: int | None) -> None:
    make, colour = KINDS[kind]
    image = decode_image(make(), min_side=min_side)
    assert image.mode == "RGB"
    assert image.size == ((64, 64) if min_side is None else (16, 16))
    assert image.info[ORIGINAL_SIZE_KEY] == (64, 64)
    centre = np.asarray(image)[image.height // 2, image.width // 2].astype(int)
    assert np.abs(centre - colour).max() <= 6, (kind, centre)  # the first frame, in its colours


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_format_is_reduced_to_min_side(fmt: str) -> None:
    image = decode_image(encoded(noise(400, 300), fmt), min_side=60)
    assert image.size == (80, 60)
    assert image.info[ORIGINAL_SIZE_KEY] == (400, 300)


def test_a_jpeg_is_reduced_to_min_side_beyond_its_dct_scale() -> None:
    image = decode_image(encoded(noise(512, 384), "JPEG"), min_side=40)
    assert image.size == (53, 40)  # DCT scaling gives 1/8 (64×48); a resize does the rest
    assert image.info[ORIGINAL_SIZE_KEY] == (512, 384)


def test_reduced_images_keep_their_content() -> None:
    # Left half red, right half blue: a good filter keeps both halves clean after a 10× reduction.
    pixels = np.zeros((200, 400, 3), np.uint8)
    pixels[:, :200, 0] = 255
    pixels[:, 200:, 2] = 255
    image = np.asarray(decode_image(encoded(Image.fromarray(pixels), "PNG"), min_side=20)).astype(int)
    assert image.shape == (20, 40, 3)
    assert np.abs(image[:, :18] - (255, 0, 0)).max() <= 2
    assert np.abs(image[:, 22:] - (0, 0, 255)).max() <= 2


def test_images_smaller_than_min_side_are_not_enlarged() -> None:
    assert decode_image(encoded(noise(30, 20), "PNG"), min_side=64).size == (30, 20)


# --- semdb's pixel limit, in place of Pillow's -----------------------------------------------------


def test_pillows_limit_is_raised_to_semdbs_while_opening_never_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    limits: list[int | None] = []
    real_open = Image.open

    def recording_open(*args: Any, **kwargs: Any) -> Image.Image:
        limits.append(Image.MAX_IMAGE_PIXELS)  # what another thread opening an image now would get
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    gif = encoded(noise(64, 64).convert("P"), "GIF")  # GIF checks its frames' sizes as well
    assert decode_image(gif, max_pixels=5000).size == (64, 64)
    decode_image(encoded(noise(16, 16).convert("P"), "GIF"), max_pixels=500)  # below Pillow's limit: left alone
    assert limits == [5000, 1000]
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_pillows_refusals_name_semdbs_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match=r"^possible decompression bomb, not decoded: .*over the 1000 pixel limit"):
        decode_image(encoded(noise(64, 64), "PNG"), max_pixels=1000)


def test_a_gif_header_bomb_is_refused_before_decoding() -> None:
    data = bytearray(encoded(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 60_000, 60_000)  # its logical screen: 3.6 G pixels
    with pytest.raises(ImageReadError, match="over the 64000000 pixel limit"):
        decode_image(bytes(data))


# --- files that are not regular, vanish or change --------------------------------------------------


def _read_in_thread(path: Path, timeout: float = 5.0) -> BaseException | bytes | None:
    """``read_bytes(path)`` on a thread: its result or exception, None if still blocked after ``timeout``."""
    outcome: list[BaseException | bytes] = []

    def target() -> None:
        try:
            outcome.append(read_bytes(str(path)))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: the open returns
        return None
    return outcome[0]


def test_a_fifo_named_jpg_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    assert list(find_images([tmp_path])) == [BadFile(str(fifo), "not a regular file (a FIFO)")]
    outcome = _read_in_thread(fifo)
    assert isinstance(outcome, ImageReadError), outcome
    assert str(outcome) == "not a regular file (a FIFO)"


def test_a_character_device_named_jpg_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "z.jpg"
    link.symlink_to("/dev/zero")
    assert list(find_images([tmp_path])) == [BadFile(str(link), "not a regular file (a character device)")]
    with pytest.raises(ImageReadError, match=r"^not a regular file \(a character device\)$"):
        read_bytes(str(link))  # would read /dev/zero for ever without the fstat check


def test_a_file_that_vanishes_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "gone.png"
    noise(8, 8).save(path)
    [found] = find_images([tmp_path])
    path.unlink()
    with pytest.raises(ImageReadError, match=r"^file vanished before it could be read \(moved or deleted\)$"):
        read_bytes(found.path)


def test_a_link_broken_after_the_walk(tmp_path: Path) -> None:
    target = tmp_path / "target.png"
    noise(8, 8).save(target)
    (tmp_path / "link.png").symlink_to(target)
    found = [item for item in find_images([tmp_path]) if item.path.endswith("link.png")]
    target.unlink()
    with pytest.raises(ImageReadError, match=r"^broken symlink \(its target does not exist\)$"):
        read_bytes(found[0].path)


@pytest.mark.parametrize("change", ["grows", "shrinks", "is rewritten"])
def test_a_file_that_changes_while_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    path = tmp_path / "busy.png"
    path.write_bytes(encoded(noise(16, 16), "PNG"))
    real_fstat = os.fstat
    calls = 0

    def fstat_then_change(fd: int) -> os.stat_result:
        nonlocal calls
        result = real_fstat(fd)
        calls += 1
        if calls == 1:  # a writer strikes between semdb's first look and its read
            if change == "grows":
                with path.open("ab") as handle:
                    handle.write(b"more")
            elif change == "shrinks":
                os.truncate(path, result.st_size // 2)
            else:
                os.utime(path, ns=(result.st_atime_ns, result.st_mtime_ns + 1_000_000_000))
        return result

    monkeypatch.setattr(os, "fstat", fstat_then_change)
    with pytest.raises(ImageReadError, match="changed while being read"):
        read_bytes(str(path))


def test_the_size_limit_is_checked_on_the_open_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 100)
    monkeypatch.setattr(semdb.images, "MAX_FILE_BYTES", 99)
    with pytest.raises(ImageReadError, match="over the 99 byte limit"):
        read_bytes(str(path))


# --- formats Pillow may not decode here ------------------------------------------------------------


def test_every_image_suffix_is_found(tmp_path: Path) -> None:
    names = ["a.heic", "b.HEIF", "c.avif", "d.jpe", "e.jfif", "f.jxl"]
    for name in names:
        (tmp_path / name).write_bytes(b"placeholder")
    found = [Path(item.path).name for item in find_images([tmp_path]) if isinstance(item, FoundFile)]
    assert found == names


def test_jfif_and_jpe_files_are_indexed(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    noise(32, 32, seed=1).save(folder / "a.jfif", format="JPEG")
    noise(32, 32, seed=2).save(folder / "b.JPE", format="JPEG")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    report = db.ingest(folder)
    assert (report.skipped, db.stats().images) == ([], 2)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(_installed("pillow_heif"), reason="pillow-heif is installed here")
def test_a_heif_without_a_decoder_says_what_to_install() -> None:
    heif = b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic" + os.urandom(200)
    with pytest.raises(ImageReadError, match=r"^HEIF images cannot be decoded here: install pillow-heif$"):
        decode_image(heif)


@pytest.mark.skipif(_installed("pillow_jxl"), reason="pillow-jxl-plugin is installed here")
@pytest.mark.parametrize("start", [b"\xff\x0a", b"\0\0\0\x0cJXL \r\n\x87\n"], ids=["codestream", "container"])
def test_a_jpeg_xl_without_a_decoder_says_what_to_install(start: bytes) -> None:
    with pytest.raises(ImageReadError, match=r"^JPEG XL images cannot be decoded here: install pillow-jxl-plugin$"):
        decode_image(start + os.urandom(64))


def test_an_installed_decoder_plugin_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Installing pillow-heif, as the reason says, must be enough: semdb registers its opener.
    registered: list[str] = []
    plugin = types.ModuleType("pillow_heif")
    plugin.register_heif_opener = lambda: registered.append("heif")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pillow_heif", plugin)
    semdb.images._register_decoder_plugins.cache_clear()
    try:
        decode_image(encoded(noise(8, 8), "PNG"))
        decode_image(encoded(noise(8, 8), "PNG"))
    finally:
        semdb.images._register_decoder_plugins.cache_clear()
    assert registered == ["heif"]  # once per process


# --- bad paths, absolute from any working folder ---------------------------------------------------


def test_every_bad_path_is_absolute_from_any_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(folder / "sub" / "pipe.jpg")
    expected = {
        str(folder / "sub" / "dangling.png"): "broken symlink (its target does not exist)",
        str(folder / "sub" / "pipe.jpg"): "not a regular file (a FIFO)",
        str(folder / "missing"): "no such file or folder",
    }
    for working, roots in [(tmp_path, ["photos", "photos/missing"]), (folder / "sub", ["..", "../missing"])]:
        monkeypatch.chdir(working)
        assert {item.path: item.reason for item in find_images(roots) if isinstance(item, BadFile)} == expected


@pytest.mark.parametrize("min_side", [None, 8])
def test_exif_orientation_is_applied(min_side: int | None) -> None:
    # A 40 x 20 picture, left half red, stored with "rotate 90° clockwise to view" (orientation 6).
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95), min_side=min_side)
    width, height = image.size
    assert height > width  # upright: taller than wide
    top = np.asarray(image)[: height // 4].mean(axis=(0, 1))
    assert top[0] > 150 and top[1] < 100  # the red half is now on top
