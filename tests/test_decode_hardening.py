"""Every kind of image file, and every kind of non-file named like one: indexed or skipped with a
reason, never a crash, never a hang."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder
from PIL import Image

import semdb
from semdb.errors import ImageReadError
from semdb.images import MAX_ASPECT_RATIO, ORIGINAL_SIZE_KEY, decode_image, find_images, load_image, read_bytes


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
