"""Distributed ingest on a real local Ray cluster (2 CPUs) into a real PostgreSQL server: no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import FakeEncoder, write_colour_images
from PIL import Image
from sqlalchemy import create_engine, text

import semdb
from semdb.codecs import load_codec
from semdb.errors import InvalidArgumentError
from semdb.images import file_sha256
from semdb.store.postgres import parse_url

pytestmark = pytest.mark.usefixtures("ray_local")


def content_codes(url: str) -> dict[str, bytes]:
    """sha256 → stored code, read straight from the server."""
    engine = create_engine(parse_url(url))
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT c.sha256, k.code FROM contents c JOIN codes k ON k.content_id = c.id"))
        codes = {str(sha): bytes(code) for sha, code in rows}
    engine.dispose()
    return codes


def codec_states(url: str) -> list[bytes]:
    engine = create_engine(parse_url(url))
    with engine.connect() as connection:
        states = [bytes(state) for state in connection.execute(text("SELECT state FROM codecs")).scalars()]
    engine.dispose()
    return states


def a_collection(folder: Path) -> Path:
    """25 colour images, a byte copy under a second path and two bad files."""
    write_colour_images(folder, per_colour=5)
    shutil.copy(folder / "red_0.png", folder / "red-copy.png")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "truncated.png").write_bytes((folder / "blue_0.png").read_bytes()[:60])
    return folder


def test_a_ray_ingest_makes_the_database_a_single_process_ingest_makes(postgres_server: object, tmp_path: Path) -> None:
    from servers import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    folder = a_collection(tmp_path / "images")
    local_url, ray_url = postgres_server.create_database(), postgres_server.create_database()
    with semdb.connect(local_url, encoder=FakeEncoder(), bits=16) as local:
        expected = local.ingest(folder, batch_size=4)
        expected_stats = local.stats()
    with semdb.connect(ray_url, encoder=FakeEncoder(), bits=16) as distributed:
        report = distributed.ingest(folder, batch_size=4, ray=True, actors=2)
        stats = distributed.stats()
        assert all("yellow" in hit.path for hit in distributed.search("yellow", k=5))
    assert (report.added, report.duplicates, report.codec_trained_on) == (expected.added, expected.duplicates, 25)
    assert sorted(report.skipped) == sorted(expected.skipped)
    assert (stats.images, stats.skipped, stats.distinct_contents, stats.staged) == (
        expected_stats.images,
        expected_stats.skipped,
        expected_stats.distinct_contents,
        0,
    )
    assert codec_states(ray_url) == codec_states(local_url)  # one codec, trained on the same embeddings
    codes = content_codes(ray_url)
    assert len(codes) == 25 and codes == content_codes(local_url)

    # A second run finds everything committed, as a resumed one does.
    with semdb.connect(ray_url, encoder=FakeEncoder()) as distributed:
        again = distributed.ingest(folder, batch_size=4, ray=True, actors=2)
    assert (again.added, again.unchanged) == (0, 26)


def test_actors_train_the_codec_once_mid_run_and_adopt_it(postgres_url: str, tmp_path: Path) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    labels = {**write_colour_images(folders[0], per_colour=6, seed=1), **write_colour_images(folders[1], seed=2)}
    with semdb.connect(postgres_url, encoder=FakeEncoder(), bits=16) as db:
        report = db.ingest(folders, batch_size=4, train_size=12, ray=True, actors=2)
        stats = db.stats()
    assert report.added == len(labels) and report.codec_trained_on is not None and report.codec_trained_on >= 12
    assert (stats.images, stats.staged, stats.codec_trained_on) == (len(labels), 0, report.codec_trained_on)
    states = codec_states(postgres_url)
    assert len(states) == 1
    # Every actor coded its images with that one codec (adopted from the database, whoever trained it).
    codec = load_codec("pq", states[0], bits_per_image=16)
    paths = sorted(labels)
    expected = codec.encode(FakeEncoder().encode_images([Image.open(path) for path in paths]))
    codes = content_codes(postgres_url)
    assert all(
        codes[file_sha256(Path(path).read_bytes())] == code.tobytes()
        for path, code in zip(paths, expected, strict=True)
    )


class RefusingEncoder(FakeEncoder):
    """An encoder that refuses every image with a user-facing error (as a model out of reach would)."""

    def encode_images(self, images: object) -> object:
        raise InvalidArgumentError("this model refuses every image")


def test_a_users_mistake_in_a_worker_is_the_same_one_line_error(tmp_path: Path) -> None:
    write_colour_images(tmp_path / "images", per_colour=1)
    with (
        semdb.connect(tmp_path / "db.semdb", encoder=RefusingEncoder(), bits=16) as db,
        pytest.raises(InvalidArgumentError, match=r"^this model refuses every image$"),
    ):
        db.ingest(tmp_path / "images", ray=True)
