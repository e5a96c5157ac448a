"""Ingest and search through the Python API, with the fake encoder."""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, FakeEncoder, write_colour_images
from PIL import Image

import semdb
import semdb.database
from semdb.codecs import Codec, load_codec
from semdb.errors import DatabaseNotFoundError, InvalidArgumentError, ModelMismatchError, NotReadyError
from semdb.index import cache_path


def code_lengths(db_path: Path) -> list[int]:
    with sqlite3.connect(db_path) as connection:
        return [row[0] for row in connection.execute("SELECT length(code) FROM codes")]


def active_codec(db: semdb.Database) -> Codec | None:
    """The database's trained codec, loaded from its stored state."""
    assert db.store is not None
    with db.store.reading() as repository:
        row = repository.active_codec()
    return load_codec(row.name, row.state) if row is not None else None


def colour_of(path: str) -> str:
    return Path(path).name.split("_")[0]


def test_ingest_then_search_by_text_and_image(tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]) -> None:
    folder, labels = colour_folder
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    report = db.ingest([folder])
    assert report.added == len(labels) and not report.skipped
    assert report.codec_trained_on == len(labels)
    stats = db.stats()
    assert (stats.images, stats.staged, stats.bits_per_image, stats.codec) == (len(labels), 0, 32, "pq")
    assert code_lengths(tmp_path / "db.semdb") == [4] * len(labels)

    for colour in COLOURS:
        hits = db.search(f"a {colour} thing", k=6)
        assert [labels[hit.path] for hit in hits] == [colour] * 6
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    query = next(path for path, colour in labels.items() if colour == "green")
    assert {labels[hit.path] for hit in db.search_image(query, k=6)} == {"green"}


def test_second_run_skips_unchanged_files_without_encoding(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, labels = colour_folder
    encoder = FakeEncoder()
    db = semdb.connect(tmp_path / "db.semdb", encoder=encoder, bits=32)
    db.ingest([folder])
    encoded = encoder.images_encoded
    report = db.ingest([folder])
    assert (report.added, report.unchanged, encoder.images_encoded) == (0, len(labels), encoded)

    # Touching a file (new mtime, same bytes) re-hashes it but does not re-encode it.
    touched = folder / "red_0.png"
    os.utime(touched, ns=(1, 1))
    report = db.ingest([folder])
    assert (report.unchanged, report.updated, encoder.images_encoded) == (len(labels), 0, encoded)


def test_unchanged_folder_loads_neither_model_nor_codec(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, labels = colour_folder
    db_path = tmp_path / "db.semdb"
    semdb.connect(db_path, encoder=FakeEncoder(), bits=32).ingest([folder])
    loaded: list[str] = []
    codecs_loaded: list[str] = []
    real_load_codec = semdb.database.load_codec

    def load_encoder(spec: str, device: str | None = None) -> FakeEncoder:
        loaded.append(spec)
        return FakeEncoder()

    def load_codec(name: str, state: bytes, **options: object) -> Codec:
        codecs_loaded.append(name)
        return real_load_codec(name, state, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(semdb.database, "load_encoder", load_encoder)
    monkeypatch.setattr(semdb.database, "load_codec", load_codec)
    # As the CLI opens it: by path, the model named by the database, not loaded yet.
    report = semdb.connect(db_path).ingest([folder])
    assert (report.unchanged, report.added, loaded, codecs_loaded) == (len(labels), 0, [], [])

    # A new file: the model is loaded (once) to encode it, and the codec to code it.
    Image.new("RGB", (24, 24), COLOURS["red"]).save(folder / "red_new.png")
    report = semdb.connect(db_path).ingest([folder])
    assert (report.added, report.unchanged, loaded, codecs_loaded) == (1, len(labels), ["fake-encoder"], ["pq"])


def test_model_loaded_late_is_still_checked_against_the_database(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, labels = colour_folder
    db_path = tmp_path / "db.semdb"
    semdb.connect(db_path, encoder=FakeEncoder(), bits=32).ingest([folder])
    monkeypatch.setattr(semdb.database, "load_encoder", lambda spec, device=None: FakeEncoder(dim=16))
    Image.new("RGB", (24, 24), COLOURS["red"]).save(folder / "red_new.png")
    with pytest.raises(ModelMismatchError, match=r"gives 16-d embeddings; database .* holds 32-d ones"):
        semdb.connect(db_path).ingest([folder])
    assert semdb.connect(db_path).stats().images == len(labels)


def test_same_content_under_a_second_path_is_not_encoded_twice(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, labels = colour_folder
    encoder = FakeEncoder()
    db = semdb.connect(tmp_path / "db.semdb", encoder=encoder, bits=32)
    db.ingest([folder])
    encoded = encoder.images_encoded
    copy = tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    shutil.copy(folder / "blue_1.png", copy)
    report = db.ingest([copy.parent])
    assert (report.added, report.duplicates, encoder.images_encoded) == (0, 1, encoded)
    stats = db.stats()
    assert (stats.images, stats.distinct_contents) == (len(labels) + 1, len(labels))
    paths = [hit.path for hit in db.search("blue", k=len(labels) + 1)]
    assert str(copy.resolve()) in paths and str((folder / "blue_1.png").resolve()) in paths


def test_changed_file_is_re_encoded_and_old_code_dropped(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, labels = colour_folder
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    db.ingest([folder])
    target = folder / "red_0.png"
    Image.new("RGB", (24, 24), COLOURS["yellow"]).save(target)
    report = db.ingest([folder])
    assert report.updated == 1
    assert db.stats().distinct_contents == len(labels)  # the old red content is gone
    yellow = [Path(hit.path).name for hit in db.search("yellow", k=7)]
    assert "red_0.png" in yellow


def test_prune_forgets_deleted_files(tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]) -> None:
    folder, labels = colour_folder
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    db.ingest([folder])
    (folder / "purple_0.png").unlink()
    assert db.ingest([folder]).pruned == 0
    assert db.stats().images == len(labels)
    report = db.ingest([folder], prune=True)
    assert report.pruned == 1
    assert db.stats().images == len(labels) - 1
    assert all(Path(hit.path).name != "purple_0.png" for hit in db.search("purple", k=len(labels)))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_tiny_collections_get_exact_codes(tmp_path: Path, count: int) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for i, colour in enumerate(list(COLOURS)[:count]):
        Image.new("RGB", (20, 20), COLOURS[colour]).save(folder / f"{colour}_{i}.png")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=64)
    db.ingest([folder])
    assert db.stats().images == count
    assert code_lengths(tmp_path / "db.semdb") == [8] * count
    assert colour_of(db.search("red", k=1)[0].path) == "red"


def test_codec_trains_once_enough_embeddings_are_staged(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    labels = write_colour_images(folder, per_colour=8)
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=16)
    report = db.ingest([folder], batch_size=4, train_size=12)
    assert report.codec_trained_on == 12  # three batches of four, then trained; the rest coded directly
    stats = db.stats()
    assert (stats.images, stats.staged) == (len(labels), 0)
    assert code_lengths(tmp_path / "db.semdb") == [2] * len(labels)


def test_staged_embeddings_are_searchable_before_the_codec_exists(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, labels = colour_folder
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    # A run killed before training leaves staged embeddings; simulate it by skipping the final training.
    ingestor_finish = semdb.ingest.BatchWriter.finish_training
    try:
        semdb.ingest.BatchWriter.finish_training = lambda self: None  # type: ignore[method-assign]
        db.ingest([folder])
    finally:
        semdb.ingest.BatchWriter.finish_training = ingestor_finish  # type: ignore[method-assign]
    assert db.stats().staged == len(labels)
    assert {colour_of(hit.path) for hit in db.search("green", k=6)} == {"green"}
    db.ingest([folder])  # the next run trains the codec and codes what was staged
    assert db.stats().staged == 0 and len(code_lengths(tmp_path / "db.semdb")) == len(labels)


def test_index_cache_is_rebuilt_when_missing_stale_or_corrupt(
    tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, labels = colour_folder
    db_path = tmp_path / "db.semdb"
    db = semdb.connect(db_path, encoder=FakeEncoder(), bits=32)
    db.ingest([folder])
    expected = [hit.path for hit in db.search("blue", k=5)]
    cache = cache_path(db_path)
    assert cache.is_file()
    assert cache.stat().st_mode & 0o777 == db_path.stat().st_mode & 0o666  # readable by whoever reads the db

    fresh = semdb.connect(db_path, encoder=FakeEncoder())
    assert [hit.path for hit in fresh.search("blue", k=5)] == expected  # served from the cache

    cache.unlink()
    assert [hit.path for hit in semdb.connect(db_path, encoder=FakeEncoder()).search("blue", k=5)] == expected
    cache.write_bytes(b"garbage")
    assert [hit.path for hit in semdb.connect(db_path, encoder=FakeEncoder()).search("blue", k=5)] == expected

    # A stale cache (the store changed since) is not used: a new blue image must be found.
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (24, 24), COLOURS["blue"]).save(extra / "blue_new.png")
    semdb.connect(db_path, encoder=FakeEncoder()).ingest([extra])
    hits = semdb.connect(db_path, encoder=FakeEncoder()).search("blue", k=len(labels))
    assert str((extra / "blue_new.png").resolve()) in [hit.path for hit in hits]


def test_database_is_bound_to_its_model_and_codec(tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]) -> None:
    folder, _ = colour_folder
    db_path = tmp_path / "db.semdb"
    semdb.connect(db_path, encoder=FakeEncoder(), bits=32).ingest([folder])
    with pytest.raises(ModelMismatchError, match="fake-encoder"):
        semdb.connect(db_path, model="ViT-B-32:openai")
    with pytest.raises(ModelMismatchError, match="bits per image 32"):
        semdb.connect(db_path, bits=64)
    with pytest.raises(ModelMismatchError, match="codec pq"):
        semdb.connect(db_path, codec="opq")
    other = FakeEncoder(dim=16)
    other.spec = "fake-encoder"
    with pytest.raises(ModelMismatchError, match="16-d"):
        semdb.connect(db_path, encoder=other).ingest([folder])


def test_user_mistakes_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatabaseNotFoundError, match="semdb ingest"):
        semdb.connect(tmp_path / "missing.semdb", create=False)
    with pytest.raises(InvalidArgumentError, match="multiple of 8"):
        semdb.connect(tmp_path / "db.semdb", bits=12)
    with pytest.raises(InvalidArgumentError, match="choose one of"):
        semdb.connect(tmp_path / "db.semdb", codec="zip")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder())
    with pytest.raises(NotReadyError):
        db.search("red")
    with pytest.raises(InvalidArgumentError):
        db.ingest([])


def test_search_results_are_plain_dataclasses(tmp_path: Path, colour_folder: tuple[Path, dict[str, str]]) -> None:
    folder, _ = colour_folder
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    db.ingest([folder])
    hit = db.search("red", k=1)[0]
    assert set(hit.to_dict()) == {"id", "path", "score"}
    assert isinstance(hit.score, float) and np.isfinite(hit.score)


def test_search_ranks_coded_images_by_cosine_to_their_reconstructions(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    write_colour_images(folder, per_colour=16)
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=8)
    # 2 x 16 k-means centroids of 64 images: centroids are averages, shorter than the embeddings.
    db.ingest([folder], batch_size=16, train_size=64)
    codec = active_codec(db)
    assert codec is not None
    with sqlite3.connect(tmp_path / "db.semdb") as connection:
        rows = connection.execute(
            "SELECT images.path, codes.code FROM images JOIN codes ON codes.content_id = images.content_id"
        ).fetchall()
    decoded = codec.decode(np.frombuffer(b"".join(code for _, code in rows), np.uint8).reshape(len(rows), -1))
    paths = [os.fsdecode(path) for path, _ in rows]
    # Reconstruction norms differ, so inner product and cosine would rank differently.
    assert np.ptp(np.linalg.norm(decoded, axis=1)) > 0.01
    query = FakeEncoder().encode_texts(["a purple thing"])
    cosine = (decoded @ query[0]) / np.linalg.norm(decoded, axis=1)
    hits = db.search_vectors(query, k=len(paths))[0]
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(cosine)[::-1], rtol=1e-4, atol=1e-5)
    by_path = dict(zip(paths, cosine, strict=True))
    np.testing.assert_allclose([by_path[hit.path] for hit in hits], [hit.score for hit in hits], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("codec_name", ["pqvae-pca", "pcapq"])
def test_principal_axis_codecs_serve_a_database_from_their_codes(tmp_path: Path, codec_name: str) -> None:
    folder = tmp_path / "many"
    write_colour_images(folder, per_colour=16)
    db_path = tmp_path / "db.semdb"
    db = semdb.connect(db_path, encoder=FakeEncoder(), codec=codec_name, bits=16)
    db.ingest([folder], batch_size=16, train_size=64)
    codec = active_codec(db)
    assert codec is not None and codec.name == codec_name
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT images.path, codes.code FROM images JOIN codes ON codes.content_id = images.content_id"
        ).fetchall()
    assert {len(code) for _, code in rows} == {2}
    decoded = codec.decode(np.frombuffer(b"".join(code for _, code in rows), np.uint8).reshape(len(rows), -1))
    query = FakeEncoder().encode_texts(["a purple thing"])
    cosine = (decoded @ query[0]) / np.linalg.norm(decoded, axis=1)
    hits = db.search_vectors(query, k=len(rows))[0]
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(cosine)[::-1], rtol=1e-4, atol=1e-5)
    # A second connection is served from the index cache and answers the same.
    assert cache_path(db_path).is_file()
    again = semdb.connect(db_path, encoder=FakeEncoder()).search_vectors(query, k=len(rows))[0]
    assert [hit.path for hit in again] == [hit.path for hit in hits]
