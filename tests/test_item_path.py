"""Issue 11: image queries searched through the default codec's item path (its second decoder),
in the exact scan, the fast scan, the database and the query language; text queries unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from test_scale_search import DIM, N, clustered

from semdb.codecs import Codec, train_codec
from semdb.cosine import inverse_norms
from semdb.evaluation import recall_at_k
from semdb.index import build
from semdb.index.fastscan import four_bit_layout, item_layout
from semdb.index.lists import assign_lists, train_lists


def text_like(n: int, seed: int) -> np.ndarray:
    """``(n, DIM)`` queries that share a mean and differ in 4 dimensions (what weights a codec)."""
    rng = np.random.default_rng(seed)
    q = np.repeat(rng.standard_normal((1, DIM)), n, axis=0)
    q[:, :4] += 0.5 * rng.standard_normal((n, 4))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trained() -> tuple[np.ndarray, Codec, Codec]:
    """``(items, codec with an item path, the same training without one)``: query-weighted ``pqvae-pca``."""
    x = clustered(N, 0)
    sample = text_like(60, 1)
    with_items = train_codec("pqvae-pca", x, 64, queries=sample, steps=30, plain_weight=10.0, item_decoder=1)
    without = train_codec("pqvae-pca", x, 64, queries=sample, steps=30, plain_weight=10.0)
    return x, with_items, without


def item_brute_force(codec: Codec, codes: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):  # type: ignore[no-untyped-def]
    """``(ids (q, k), cosines (q, k))``: top-k by cosine to every item vector (the item path's promise)."""
    vectors = codec.item_vectors(codes)  # type: ignore[attr-defined]
    scores = queries @ vectors.T * inverse_norms(vectors)[None, :]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def test_the_item_path_is_the_codecs_own_and_only_where_there_is_one(trained) -> None:  # type: ignore[no-untyped-def]
    x, with_items, without = trained
    assert with_items.has_item_path and not without.has_item_path
    assert item_layout(without) is None and not train_codec("pcapq", x, 64).has_item_path
    layout, items = four_bit_layout(with_items), item_layout(with_items)
    assert layout is not None and items is not None and items.words == layout.words
    codes = with_items.encode(x[:200])
    # The item layout scores what the item decoder outputs, and gives its norms, from the words alone.
    vectors = with_items.item_vectors(codes)  # type: ignore[attr-defined]
    words = items.words_of(items.faiss_order(codes)).astype(np.int64) + np.arange(items.words) * 16
    np.testing.assert_allclose(items.words_inverse_norms(words), inverse_norms(vectors), rtol=1e-4)
    # The exact item index scores the codes (no float copy) and ranks as brute force does.
    queries = clustered(8, 2)
    _, found = with_items.image_cosine_index(codes).search(queries, 10)
    want, _ = item_brute_force(with_items, codes, np.arange(200), queries, 10)
    assert recall_at_k(want, found) >= 0.99  # float rounding may swap a tie
    # Without an item path, image queries search what text queries do.
    plain = without.encode(x[:200])
    np.testing.assert_array_equal(
        without.image_cosine_index(plain).search(queries, 10)[1], without.cosine_index(plain).search(queries, 10)[1]
    )


@pytest.mark.parametrize("with_lists", [False, True])
def test_the_fast_scan_scores_image_queries_through_the_item_path(trained, with_lists: bool) -> None:  # type: ignore[no-untyped-def]
    x, codec, _ = trained
    codes = codec.encode(x)
    ids = np.arange(N, dtype=np.int64) * 5 + 3
    coarse = train_lists(x, lists=16) if with_lists else None
    lists = assign_lists(coarse, x) if coarse is not None else None
    scan = build.fast_scan(codec, ids, codes, None, lists, coarse) if N >= build.FAST_SCAN_MIN_ITEMS else None
    if scan is None:  # below the database's threshold: built directly, as fast_scan would
        from semdb.index.fastscan import FastScan

        layout = four_bit_layout(codec)
        assert layout is not None
        scan = FastScan.build(layout, ids, codes, None, lists, coarse, scaled=True, items=item_layout(codec))
    assert scan.item_layout is not None and scan.bands > 1  # a weighted layout: norm bands
    assert scan.item_band_scales is not None and scan.item_band_scales.shape == (scan.bands,)
    queries = clustered(12, 3)
    want_ids, want_scores = item_brute_force(codec, codes, ids, queries, 10)
    # Every list probed and every candidate re-ranked: the item path's exact answer and cosines.
    scores, found = scan.search(queries, 10, rerank=N, nprobe=16, image_queries=True)
    assert recall_at_k(want_ids, found) >= 0.99
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    # At the default depth it keeps nearly all of it; and text queries still get the text path.
    _, default = scan.search(queries, 10, nprobe=16, image_queries=True)
    assert recall_at_k(want_ids, default) >= 0.9
    text_ids = codec.cosine_index(codes).search(queries, 10)[1]
    _, as_text = scan.search(queries, 10, rerank=N, nprobe=16)
    assert recall_at_k(ids[text_ids], as_text) >= 0.99
    assert recall_at_k(want_ids, as_text) < 0.99  # the two paths rank differently: the flag matters


def test_the_database_searches_image_queries_through_the_item_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from conftest import FakeEncoder, broad_embeddings

    import semdb
    from semdb.query import Query

    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 500)  # a few thousand rows take the fast scan
    x, _ = broad_embeddings(2500, 64, seed=3)
    paths = [f"/nowhere/{i}.png" for i in range(len(x))]
    with semdb.connect(tmp_path / "items.semdb", encoder=FakeEncoder(dim=64)) as db:
        db.add_embeddings(paths, x, train_size=len(x))  # the default codec, trained on all of them
        group = db.index().coded[0]
        assert db._store is not None
        with db._store.reading() as repository:
            row = repository.active_codec()
        assert row is not None
        codec = db._load_codec(row)
        assert codec.has_item_path and group.fast is not None and group.fast.item_layout is not None
        ids, codes = group.ids, group.arrays()[0]
        queries = clustered64(6, 4)
        want, _ = item_brute_force(codec, codes, ids, queries, 10)
        exact = db.search_vectors(queries, 10, exact=True, image_queries=True)
        assert recall_at_k(want, np.array([[h.id for h in row] for row in exact])) >= 0.99
        fast = db.search_vectors(queries, 10, image_queries=True)
        assert recall_at_k(want, np.array([[h.id for h in row] for row in fast])) >= 0.85
        as_text = db.search_vectors(queries, 10, exact=True)  # text queries keep the text path
        text_want = ids[codec.cosine_index(codes).search(queries, 10)[1]]
        assert recall_at_k(text_want, np.array([[h.id for h in row] for row in as_text])) >= 0.99
        # "More like this" (a stored image alone) is an image query, by the item path's reconstruction.
        first = int(ids[0])
        vector = db.stored_vector(first)
        np.testing.assert_allclose(vector, codec.item_vectors(codes[:1])[0], rtol=1e-4, atol=1e-6)  # type: ignore[attr-defined]
        similar = Query(database=db).like(first).limit(10).exact(True).results()
        want_similar, _ = item_brute_force(codec, codes, ids, (vector / np.linalg.norm(vector))[None], 10)
        assert recall_at_k(want_similar, np.array([[h.id for h in similar]])) >= 0.9


def clustered64(n: int, seed: int) -> np.ndarray:
    """``(n, 64)`` unit query vectors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_the_item_decoder_refit_is_the_least_squares_map_of_its_codes() -> None:
    import torch

    x = clustered(N, 5)
    sample = text_like(60, 6)
    settings = {"queries": sample, "steps": 30, "plain_weight": 10.0, "item_decoder": 1, "seed": 0}
    trained = train_codec("pqvae-pca", x, 64, **settings)  # type: ignore[arg-type]
    refitted = train_codec("pqvae-pca", x, 64, item_refit=1, **settings)  # type: ignore[arg-type]
    codes = trained.encode(x)
    np.testing.assert_array_equal(refitted.encode(x), codes)  # the same training: only the map differs

    def squared_error(codec: Codec) -> float:
        vectors = codec.item_vectors(codes)  # type: ignore[attr-defined]
        return float(((vectors - x) ** 2).sum())

    assert squared_error(refitted) < squared_error(trained)
    # The normal equations hold: the residual is orthogonal to the latents (up to the tiny ridge).
    model = refitted.base.model  # type: ignore[attr-defined]
    with torch.no_grad():
        weighted = np.ascontiguousarray(x @ refitted.weights, dtype=np.float32)  # type: ignore[attr-defined]
        latents = model.codebook[model.nearest(model.latent(torch.from_numpy(weighted)))]
    a = latents.reshape(len(x), -1).numpy() + model.item_decoder.shift.detach().numpy()
    residual = refitted.item_vectors(codes) - x  # type: ignore[attr-defined]
    assert np.abs(a.T @ residual).max() < 1e-2 * np.abs(a.T @ x).max()
