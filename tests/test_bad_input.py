"""A corpus of bad files: each is skipped with its reason recorded, and the run goes on."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder
from PIL import Image

import semdb
import semdb.images


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def image_bytes(fmt: str, colour: tuple[int, int, int] = (200, 40, 40), size: int = 32) -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((size, size, 3), colour, np.uint8)
    pixels[::4] = 255 - pixels[::4]  # some texture so that formats really encode something
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_corpus(root: Path) -> tuple[set[str], dict[str, str]]:
    """Good images of every supported format, and bad files of every kind; returns (good, bad→reason)."""
    root.mkdir()
    good: set[str] = set()
    for name, fmt in [
        ("a.jpg", "JPEG"),
        ("b.png", "PNG"),
        ("c.webp", "WEBP"),
        ("d.bmp", "BMP"),
        ("e.tiff", "TIFF"),
        ("f.JPEG", "JPEG"),
    ]:
        (root / name).write_bytes(image_bytes(fmt))
        good.add(name)
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(0, 0, 255), (255, 0, 0)]]
    frames[0].save(root / "g.gif", save_all=True, append_images=frames[1:])
    good.add("g.gif")

    bad: dict[str, str] = {}
    jpeg = image_bytes("JPEG", size=64)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["truncated.jpg"] = "truncated"
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    bad["corrupt.png"] = "corrupt"
    (root / "notes.jpg").write_text("this is a text file, not a picture\n")
    bad["notes.jpg"] = "not an image"
    (root / "empty.png").write_bytes(b"")
    bad["empty.png"] = "empty file"
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    bad["bomb.png"] = "decompression bomb"
    (root / "locked.png").write_bytes(image_bytes("PNG"))
    bad["locked.png"] = "permission denied"
    (root / "dangling.png").symlink_to(root / "does-not-exist.png")
    bad["dangling.png"] = "broken symlink"
    (root / "loop1.jpg").symlink_to(root / "loop2.jpg")
    (root / "loop2.jpg").symlink_to(root / "loop1.jpg")
    bad["loop1.jpg"] = bad["loop2.jpg"] = "symlink loop"
    (root / "sub").mkdir()
    (root / "sub" / "back-to-root").symlink_to(root)  # a folder loop: must not be walked forever
    bad["back-to-root"] = "symlink loop"
    non_utf8 = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(non_utf8, "wb") as handle:
        handle.write(image_bytes("PNG"))
    bad["caf\\xe9.png"] = "not valid UTF-8"
    (root / "readme.txt").write_text("ignored: not an image suffix")
    return good, bad


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, set[str], dict[str, str]]:
    root = tmp_path / "corpus"
    good, bad = make_corpus(root)
    locked = root / "locked.png"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads anything: make this one file's open fail as it would for a normal user
        real_open = semdb.images._open_for_reading

        def guarded_open(path: str) -> int:
            if path == str(locked):
                raise PermissionError(13, "Permission denied")
            return real_open(path)

        monkeypatch.setattr(semdb.images, "_open_for_reading", guarded_open)
    return root, good, bad


def test_bad_files_are_skipped_with_reasons_and_good_ones_indexed(
    tmp_path: Path, corpus: tuple[Path, set[str], dict[str, str]]
) -> None:
    root, good, bad = corpus
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=16)
    report = db.ingest([root], max_pixels=50_000_000)

    reported = {Path(path).name: reason for path, reason in report.skipped}
    assert set(reported) == set(bad)
    for name, expected in bad.items():
        assert expected in reported[name], (name, reported[name])
    recorded = {Path(path).name: reason for path, reason in db.skipped()}
    assert recorded == reported
    stats = db.stats()
    assert (stats.images, stats.skipped) == (len(good), len(bad))
    indexed = {Path(hit.path).name for hit in db.search("red", k=50)}
    assert indexed == good


def test_a_skipped_file_that_is_fixed_gets_indexed(
    tmp_path: Path, corpus: tuple[Path, set[str], dict[str, str]]
) -> None:
    root, good, bad = corpus
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=16)
    db.ingest([root])
    (root / "notes.jpg").write_bytes(image_bytes("JPEG"))
    report = db.ingest([root])
    assert "notes.jpg" not in {Path(path).name for path, _ in report.skipped}
    assert db.stats().images == len(good) + 1
    assert db.stats().skipped == len(bad) - 1


def test_decode_image_refuses_oversized_images() -> None:
    with pytest.raises(semdb.errors.ImageReadError, match="pixel limit"):
        semdb.images.decode_image(image_bytes("PNG", size=64), max_pixels=1000)
    assert semdb.images.decode_image(image_bytes("PNG", size=64), max_pixels=4096).size == (64, 64)


def test_header_bombs_are_refused_before_decoding() -> None:
    # Below PIL's own limit but above semdb's default: caught by semdb's check, from the header alone.
    with pytest.raises(semdb.errors.ImageReadError, match="over the 64000000 pixel limit"):
        semdb.images.decode_image(png_header_only(9_000, 9_000))
    # Far above PIL's limit, and the user allowed it: semdb's limit replaces PIL's, and the file
    # (a header with no pixel data) is reported for what it is.
    with pytest.raises(semdb.errors.ImageReadError, match="truncated"):
        semdb.images.decode_image(png_header_only(100_000, 100_000), max_pixels=10**11)


def test_semdb_pixel_limit_replaces_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if Pillow's limit were below the image
    assert semdb.images.decode_image(image_bytes("PNG", size=64), max_pixels=5000).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after decoding
    with pytest.raises(semdb.errors.ImageReadError, match="pixel limit"):
        semdb.images.decode_image(image_bytes("PNG", size=64), max_pixels=4000)


def test_jpeg_decoded_at_reduced_scale_keeps_its_original_size() -> None:
    data = image_bytes("JPEG", size=512)
    full = semdb.images.decode_image(data)
    small = semdb.images.decode_image(data, min_side=64)
    assert full.size == (512, 512)
    assert small.size == (64, 64)  # decoded at 1/8 scale, the smallest that keeps 64 px
    assert small.info[semdb.images.ORIGINAL_SIZE_KEY] == (512, 512)
    png = semdb.images.decode_image(image_bytes("PNG", size=512), min_side=64)
    assert png.size == (64, 64)  # no DCT scaling, so reduced right after decoding
    assert png.info[semdb.images.ORIGINAL_SIZE_KEY] == (512, 512)


def test_ingest_records_the_full_size_of_jpegs_decoded_small(tmp_path: Path) -> None:
    import sqlite3

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(image_bytes("JPEG", size=640))
    encoder = FakeEncoder()
    encoder.image_size = 32  # type: ignore[attr-defined]  # as a small model would report
    db = semdb.connect(tmp_path / "db.semdb", encoder=encoder, bits=16)
    db.ingest([folder])
    with sqlite3.connect(tmp_path / "db.semdb") as connection:
        assert connection.execute("SELECT width, height FROM contents").fetchall() == [(640, 640)]


def test_search_vectors_refuses_queries_of_the_wrong_shape_or_not_finite(tmp_path: Path) -> None:
    from conftest import broad_embeddings

    from semdb.errors import InvalidArgumentError

    x, _ = broad_embeddings(50, 32)
    with semdb.connect(tmp_path / "q.semdb", codec="pq", bits=32, model="hf-hub:none/none") as db:
        db.add_embeddings([f"/nowhere/{i}.png" for i in range(len(x))], x)
        assert len(db.search_vectors(x[:2], 3)) == 2
        for bad, message in (
            (x[:1, :7], r"\(q, 32\) array"),
            (x[0], r"\(q, 32\) array"),
            (np.full((1, 32), np.nan, np.float32), "NaN or infinite"),
        ):
            for image_queries in (False, True):
                with pytest.raises(InvalidArgumentError, match=message):
                    db.search_vectors(bad, 3, image_queries=image_queries)
