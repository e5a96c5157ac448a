"""The query type: terms and their arithmetic, filters inside the scan, paging, the string form."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import COLOURS, FakeEncoder, write_colour_images
from PIL import Image

import semdb
from semdb.cosine import CosineIndex
from semdb.errors import InvalidArgumentError
from semdb.index import SearchIndex, flat_index
from semdb.query import Query, Term, parse_terms


def colour_of(path: str) -> str:
    return Path(path).name.split("_")[0]


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[semdb.Database, Path, Path, FakeEncoder]:
    """Reds (and the rest) under ``a/``; no red under ``b/``; the files of ``b/`` dated 2020."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_colour_images(a, per_colour=3, seed=1)
    write_colour_images(b, per_colour=3, seed=2)
    for path in b.glob("red_*"):
        path.unlink()
    old = datetime(2020, 6, 1, 12).timestamp()
    for path in b.iterdir():
        os.utime(path, (old, old))
    encoder = FakeEncoder()
    db = semdb.connect(tmp_path / "db.semdb", encoder=encoder, bits=32)
    db.ingest([a, b])
    return db, a, b, encoder


def test_under_restricts_the_scan_to_the_folder(two_folders: tuple[semdb.Database, Path, Path, FakeEncoder]) -> None:
    db, a, b, _ = two_folders
    everywhere = db.query("red").limit(3).results()
    assert {colour_of(hit.path) for hit in everywhere} == {"red"}
    # b/ holds no red image and 12 others: the filter returns the best non-red ones of b/, all 12
    # of them when asked for more than exist (an over-fetch-and-drop would find none of them).
    in_b = db.query("red").under(b).limit(50).results()
    assert len(in_b) == 12 and all(Path(hit.path).parent == b for hit in in_b)
    assert db.search("red", k=50, under=str(b)) == in_b
    both = db.query("red").under(a, b).limit(3).results()
    assert both == everywhere
    assert db.query("red").under(a.parent / "elsewhere").results() == []
    # A folder that merely shares the prefix is not inside it.
    (a.parent / "a-other").mkdir()
    assert db.query("red").under(a.parent / "a-").results() == []


def test_modified_between_dates(two_folders: tuple[semdb.Database, Path, Path, FakeEncoder]) -> None:
    db, a, b, _ = two_folders
    old = db.query("blue").modified(before="2020-06-01").limit(50).results()
    assert {Path(hit.path).parent for hit in old} == {b} and len(old) == 12
    assert db.query("blue").modified(before="2020-05-31").results() == []
    recent = db.query("blue").modified(after="2021-01-01").limit(50).results()
    assert {Path(hit.path).parent for hit in recent} == {a} and len(recent) == 15
    with pytest.raises(InvalidArgumentError, match="not a date"):
        db.query("blue").modified(after="last tuesday")
    with pytest.raises(InvalidArgumentError, match="empty"):
        db.query("blue").modified(after="2022-01-02", before="2022-01-01")


def test_min_size_score_threshold_limit_and_offset(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_colour_images(folder, per_colour=4, size=24)
    for i, (width, height) in enumerate([(200, 50), (50, 200), (300, 300)]):
        Image.new("RGB", (width, height), COLOURS["red"]).save(folder / f"red_big{i}.png")
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32)
    db.ingest(folder)
    wide = db.query("red").min_size(width=100).limit(10).results()
    assert sorted(Path(hit.path).name for hit in wide) == ["red_big0.png", "red_big2.png"]
    big = db.query("blue").min_size(width=100, height=100).limit(10).results()
    assert [Path(hit.path).name for hit in big] == ["red_big2.png"]

    ranked = db.query("red").limit(23).results()
    assert len(ranked) == 23
    pages = [db.query("red").limit(5).offset(start).page() for start in range(0, 25, 5)]
    assert [hit for page in pages for hit in page.results] == ranked
    assert [page.more for page in pages] == [True, True, True, True, False]

    threshold = ranked[6].score
    cut = db.query("red").min_score(threshold).limit(20).page()
    assert cut.results == [hit for hit in ranked if hit.score >= threshold] and not cut.more
    with pytest.raises(InvalidArgumentError):
        db.query("red").limit(0)
    with pytest.raises(InvalidArgumentError):
        db.query("red").min_score(2)


def test_like_uses_the_stored_code_not_the_file(two_folders: tuple[semdb.Database, Path, Path, FakeEncoder]) -> None:
    db, a, _, encoder = two_folders
    green = next(hit for hit in db.query("green").under(a).limit(1).results())
    Path(green.path).unlink()  # a search by a stored image never reads its file
    before = encoder.images_encoded
    hits = db.query(f"id:{green.id}").limit(3).results()
    assert hits[0].id == green.id and hits[0].score > 0.99
    assert {colour_of(hit.path) for hit in hits} == {"green"}
    assert encoder.images_encoded == before
    assert db.query().like(green.id).limit(3).results() == hits
    with pytest.raises(InvalidArgumentError, match="no image with id"):
        db.query("id:999999").results()


def test_staged_rows_are_restricted_by_an_id_selector() -> None:
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((50, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = np.arange(100, 150, dtype=np.int64)
    index = SearchIndex("tag", [], flat_index(embeddings), ids)
    allowed = np.array([103, 110, 120, 149, 5000], dtype=np.int64)
    scores, found = index.search(embeddings[:2], 10, allowed=allowed)
    assert found.shape == (2, 4) and set(found[0]) == {103, 110, 120, 149}
    expected = np.sort(embeddings[[3, 10, 20, 49]] @ embeddings[0])[::-1]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
    assert index.search(embeddings[:1], 10, allowed=np.array([7], dtype=np.int64))[1].shape == (1, 0)


def test_arithmetic_weights_the_unit_term_vectors(two_folders: tuple[semdb.Database, Path, Path, FakeEncoder]) -> None:
    db, *_ = two_folders
    from semdb.query import query_vector

    encoder = FakeEncoder()
    red, blue = encoder.encode_texts(["red"])[0], encoder.encode_texts(["blue"])[0]
    expected = red - 0.5 * blue
    vector = query_vector(db, parse_terms("red - 0.5:blue"))[0]
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    mixed = db.query("red + blue").limit(6).results()
    assert {colour_of(hit.path) for hit in mixed} <= {"red", "blue", "purple"}
    with pytest.raises(InvalidArgumentError, match="cancel out"):
        db.query("red - red").results()
    by_vector = db.query().vector(red).limit(5).results()
    assert by_vector == db.query("red").limit(5).results()


def test_query_strings_parse_as_documented(tmp_path: Path) -> None:
    image = tmp_path / "q.png"
    Image.new("RGB", (4, 4)).save(image)
    assert parse_terms("a t-shirt") == [Term("text", "a t-shirt")]
    assert parse_terms("red dress + 0.5:beach - night") == [
        Term("text", "red dress"),
        Term("text", "beach", 0.5),
        Term("text", "night", -1.0),
    ]
    assert parse_terms("2:sneaker - id:7") == [Term("text", "sneaker", 2.0), Term("id", 7, -1.0)]
    assert parse_terms(f"{image} + snow") == [Term("image", str(image)), Term("text", "snow")]
    # The server parses without paths: a request never names a file for semdb to read.
    assert parse_terms(f"{image}", allow_paths=False) == [Term("text", str(image))]
    for bad in ("", "   ", "red + ", "- red", "0:red", "2:"):
        with pytest.raises(InvalidArgumentError):
            parse_terms(bad)
    with pytest.raises(InvalidArgumentError, match=r"around '-' \(a query cannot start with '-'"):
        parse_terms("- red")
    assert Query().parse("red - 0.5:blue").describe() == "“red” - 0.5 × “blue”"
    with pytest.raises(InvalidArgumentError, match="no database"):
        Query().text("red").results()


def test_restricted_cosine_index_matches_brute_force_over_the_subset() -> None:
    # Enough items for several parts of different norms, each searched by its own FAISS index.
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((70_000, 8)).astype(np.float32) * rng.uniform(0.5, 1.5, (70_000, 1))
    norms = np.linalg.norm(vectors, axis=1)

    def make_index(codes: np.ndarray) -> faiss.Index:
        # A code here is the item's row number; the index holds its (not unit-norm) vector.
        index = faiss.IndexFlatIP(8)
        index.add(vectors[np.ascontiguousarray(codes).view(np.int64)[:, 0]])
        return index

    codes = np.arange(70_000, dtype=np.int64).view(np.uint8).reshape(70_000, 8)
    index = CosineIndex.build(codes, make_index, (1 / norms).astype(np.float32))
    assert len(index.parts) > 1
    selected = rng.random(70_000) < 0.3
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = index.restricted(selected).search(queries, 20)
    cosines = np.where(selected, queries @ vectors.T / norms, -np.inf)
    expected = np.argsort(-cosines, axis=1)[:, :20]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(cosines, expected, axis=1), rtol=1e-5)


def test_arguments_of_the_wrong_type_or_size_are_one_line_errors(
    two_folders: tuple[semdb.Database, Path, Path, FakeEncoder],
) -> None:
    db, a, _, _ = two_folders
    for call, fragment in (
        (lambda: db.search("red", k="5"), "whole number"),  # type: ignore[arg-type]
        (lambda: db.search("red", k=2.5), "whole number"),  # type: ignore[arg-type]
        (lambda: db.search("red", k=True), "whole number"),
        (lambda: db.search(None), "a text query is a str"),  # type: ignore[arg-type]
        (lambda: db.search(b"red"), "got bytes"),  # type: ignore[arg-type]
        (lambda: db.search("red", under=123), "is a path"),  # type: ignore[arg-type]
        (lambda: db.search("red", min_width="a"), "whole number"),  # type: ignore[arg-type]
        (lambda: db.search("red", min_width=2**70), "between 1 and"),
        (lambda: db.search("red", min_score="high"), "finite number"),  # type: ignore[arg-type]
        (lambda: db.search("red", modified_after=2020), "is a date"),  # type: ignore[arg-type]
        (lambda: db.search("red", offset=2.5), "whole number"),  # type: ignore[arg-type]
        (lambda: db.query().like(2**70).results(), "no image with id"),
        (lambda: db.query().like(5.7), "whole number"),  # type: ignore[arg-type]
        (lambda: db.query("id:99999999999999999999").results(), "no image with id"),
        (lambda: db.query().text("red", weight="2"), "finite number"),  # type: ignore[arg-type]
        (lambda: db.query().vector(np.ones((2, 8))), r"one \(d,\) embedding, got shape \(2, 8\)"),
        (lambda: db.query().image(42), "file path or a PIL image"),  # type: ignore[arg-type]
        (lambda: db.query().under(*[f"/x{i}" for i in range(100)]), "at most"),
        (lambda: db.search_vectors(np.ones((1, 32), np.float32), k=2.5), "whole number"),  # type: ignore[arg-type]
        (lambda: db.search_vectors(np.ones((1, 32), np.float32), allowed=np.array([1.0])), "float64"),
    ):
        with pytest.raises(InvalidArgumentError, match=fragment):
            call()
    # What is well-formed keeps working: no folder filter, either end of the calendar, a decoded image.
    assert len(db.search("red", under=None, modified_before="9999-12-31", k=100)) == len(db.search("red", k=100))
    assert db.search("red", modified_before="0001-01-02") == []
    picture = Image.open(next(a.glob("red_*")))
    assert colour_of(db.search_image(picture, k=1)[0].path) == "red"
    assert all(-1.0 <= hit.score <= 1.0 for hit in db.search_image(picture, k=50))
