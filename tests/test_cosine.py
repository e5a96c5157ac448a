"""CosineIndex: exact cosine top-k over an inner-product index, however the norms vary."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from semdb import cosine
from semdb.codecs import train_codec
from semdb.codecs.pqvae import PQVAECodec
from semdb.cosine import CosineIndex, inverse_norms
from semdb.index import CodedGroup, SearchIndex, load_cache, save_cache


def brute_force_cosine(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: top-k of ``<q, x> / ‖x‖`` by full sort."""
    scores = queries @ items.T * inverse_norms(items)[None, :]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_ranking(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Same scores in the same order, and the same rows wherever scores are not tied."""
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    distinct = np.abs(np.diff(want[0], axis=1, prepend=np.inf, append=-np.inf)).min(axis=None) > 1e-4
    if distinct:
        np.testing.assert_array_equal(got[1], want[1])


def flat(items: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``items`` (stands in for a codec's index over codes)."""
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items))
    return index


@pytest.mark.parametrize("rows_per_part", [100_000, 700])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_exact_when_norms_vary_a_hundredfold(k: int, rows_per_part: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Norms from 0.01 to 1. One part (100_000 rows per part): the first depth cannot prove the
    # answer, so the search must go deeper. Several parts (700 rows each): parts of similar norm.
    # Either way the result must be the exact cosine top-k.
    monkeypatch.setattr(cosine, "ROWS_PER_PART", rows_per_part)
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((5000, 16)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    items = directions * rng.uniform(0.01, 1.0, size=(5000, 1)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = CosineIndex.build(items, flat, inverse_norms(items))
    assert len(index.parts) == (1 if rows_per_part > 5000 else 8)
    got = index.search(queries, k)
    want = brute_force_cosine(items, queries, k)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    # Rows must be the reference rows (scores of random data are distinct here).
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(want[1], axis=1))
    # A plain inner-product search would have returned other rows: the test can fail.
    plain = flat(items).search(queries, k)[1]
    assert not np.array_equal(np.sort(plain, axis=1), np.sort(want[1], axis=1))


def test_negative_scores_and_k_beyond_n() -> None:
    rng = np.random.default_rng(1)
    items = rng.standard_normal((50, 8)).astype(np.float32) * rng.uniform(0.1, 2, size=(50, 1)).astype(np.float32)
    queries = -items[:3] / np.linalg.norm(items[:3], axis=1, keepdims=True)  # mostly negative scores
    scores, rows = CosineIndex.build(items, flat, inverse_norms(items)).search(queries, 80)
    assert scores.shape == rows.shape == (3, 50)
    want = brute_force_cosine(items, queries, 50)
    np.testing.assert_allclose(scores, want[0], rtol=1e-4, atol=1e-5)
    assert (np.sort(rows, axis=1) == np.arange(50)).all()


@pytest.mark.parametrize("name", ["pq", "opq", "rq", "pcapq"])
def test_codec_cosine_index_ranks_by_cosine_to_reconstructions(name: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codec = train_codec(name, x[:2000], 32)
    codes = codec.encode(x[2000:])
    index = codec.cosine_index(codes)
    assert index.parts[0].inverse_norms is not None and index.ntotal == 1000
    got = index.search(x[:10], 10)
    assert_same_ranking(got, brute_force_cosine(codec.decode(codes), x[:10], 10))


def test_unit_norm_codec_needs_no_rescaling() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pqvae = PQVAECodec.train(x, 16, steps=20, anchors=0)
    index = pqvae.cosine_index(pqvae.encode(x))
    assert len(index.parts) == 1 and index.parts[0].inverse_norms is None
    assert_same_ranking(index.search(x[:5], 7), brute_force_cosine(pqvae.decode(pqvae.encode(x)), x[:5], 7))


def test_index_cache_keeps_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cosine, "ROWS_PER_PART", 300)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codec = train_codec("pq", x[:600], 32)
    coded = codec.cosine_index(codec.encode(x))
    assert len(coded.parts) == 4
    ids = np.arange(1000, 2200, dtype=np.int64)
    original = SearchIndex("db:7:token", [CodedGroup(1, coded, ids)], None, np.empty(0, np.int64))
    save_cache(original, tmp_path / "db.index")
    expected = {1: (1200, 16)}
    assert load_cache(tmp_path / "db.index", "other:7:token", expected) is None  # another database's
    assert load_cache(tmp_path / "db.index", "db:7:token", {1: (1199, 16)}) is None  # more rows than the store
    assert load_cache(tmp_path / "db.index", "db:7:token", {2: (1200, 16)}) is None  # a codec not stored
    assert load_cache(tmp_path / "db.index", "db:7:token", {1: (1200, 8)}) is None  # another dimension
    earlier = load_cache(tmp_path / "db.index", "db:8:other", expected)  # an earlier state: read, tagged
    assert earlier is not None and earlier.tag == "db:7:token" and earlier.changes_seq == -1
    loaded = load_cache(tmp_path / "db.index", "db:7:token", expected)
    assert loaded is not None
    restored = SearchIndex("db:7:token", loaded.groups, None, np.empty(0, np.int64))
    for got, want in zip(restored.search(x[:20], 15), original.search(x[:20], 15), strict=True):
        np.testing.assert_array_equal(got, want)
