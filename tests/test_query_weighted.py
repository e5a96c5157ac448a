"""Query-weighted codecs: same code sizes, bit-exact state, and less score error where queries look."""

from __future__ import annotations

import numpy as np
import pytest

from semdb.codecs import load_codec, train_codec
from semdb.codecs.query_weighted import QueryWeightedCodec, query_weights
from semdb.errors import InvalidArgumentError

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items spread over all 32 dimensions; queries that share a mean and differ only in the first 4.

    Returns (train items (2000, 32), test items (500, 32), training queries (40, 32), other queries (40, 32)).
    """
    items = unit(rng.standard_normal((2500, DIM)))
    mean = unit(rng.standard_normal((1, DIM)))

    def queries(n: int) -> np.ndarray:
        q = np.repeat(mean, n, axis=0)
        q[:, :4] += 0.5 * rng.standard_normal((n, 4))
        return unit(q)

    return items[:2000], items[2000:], queries(40), queries(40)


@pytest.mark.parametrize("name", ["pq", "opq", "rq", "pcapq", "pqvae", "pqvae-pca"])
def test_sizes_round_trip_and_search_agree_with_decode(name: str) -> None:
    rng = np.random.default_rng(0)
    train, test, train_queries, queries = sample(rng)
    codec = train_codec(name, train[:600], 32, queries=train_queries)
    assert isinstance(codec, QueryWeightedCodec)
    assert "query-weighted" in codec.describe()
    codes = codec.encode(test)
    assert codes.shape == (len(test), 4) and codes.dtype == np.uint8
    decoded = codec.decode(codes)
    assert decoded.shape == test.shape and decoded.dtype == np.float32

    restored = load_codec(name, codec.to_bytes())
    np.testing.assert_array_equal(restored.encode(test), codes)
    np.testing.assert_array_equal(restored.decode(codes), decoded)

    # The index scans the base codes behind a transform of the queries; its scores must be the
    # inner products with the vectors it says it scores: the decoded ones, or (pqvae-pca, which
    # scans its codes through its linear decoder) the same directions before normalisation.
    scored = codec.scored_vectors(codes)
    np.testing.assert_allclose(
        scored / np.linalg.norm(scored, axis=1, keepdims=True),
        decoded / np.linalg.norm(decoded, axis=1, keepdims=True),
        atol=1e-4,
    )
    scores, rows = codec.search_index(codes).search(queries[:5], 3)
    np.testing.assert_allclose(scores, np.take_along_axis(queries[:5] @ scored.T, rows, axis=1), atol=2e-4)
    cos_scores, _ = codec.cosine_index(codes).search(queries[:5], 3)
    want = queries[:5] @ (decoded / np.linalg.norm(decoded, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cos_scores, -np.sort(-want, axis=1)[:, :3], atol=2e-4)


def test_weighting_cuts_the_score_error_of_unseen_queries() -> None:
    rng = np.random.default_rng(1)
    train, test, train_queries, queries = sample(rng)

    def score_error(codec_queries: np.ndarray | None) -> float:
        codec = train_codec("pq", train, 16, queries=codec_queries)
        decoded = codec.decode(codec.encode(test))
        # Spread of the score errors across queries (what reorders them), queries never trained on.
        errors = queries @ (test - decoded).T
        return float(np.mean((errors - errors.mean(axis=0)) ** 2))

    plain, weighted = score_error(None), score_error(train_queries)
    assert weighted < 0.5 * plain


def test_weights_and_bad_input() -> None:
    rng = np.random.default_rng(2)
    q = unit(rng.standard_normal((10, 8)))
    w = query_weights(q, ridge=0.3)
    np.testing.assert_allclose(w, w.T, atol=1e-6)
    assert np.linalg.eigvalsh(w.astype(np.float64)).min() > 0
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        query_weights(q[:1])
    with pytest.raises(InvalidArgumentError, match="differ"):
        query_weights(np.repeat(q[:1], 3, axis=0))
    with pytest.raises(InvalidArgumentError, match="ridge"):
        query_weights(q, ridge=0)
    x = unit(rng.standard_normal((300, 8)))
    codec = train_codec("pq", x, 16, queries=q)
    with pytest.raises(InvalidArgumentError, match="query-weighted pq, not rq"):
        load_codec("rq", codec.to_bytes())
    with pytest.raises(InvalidArgumentError, match="query-weighted"):
        QueryWeightedCodec.from_bytes(b"nonsense")


def test_a_codec_can_train_differently_when_query_weighted() -> None:
    rng = np.random.default_rng(5)
    train, _, train_queries, _ = sample(rng)
    weighted = train_codec("pqvae-pca", train[:600], 32, queries=train_queries)
    assert isinstance(weighted, QueryWeightedCodec)
    config = weighted.base.model.config  # type: ignore[attr-defined]
    assert (config.steps, config.anchor_kl_weight) == (500, 100.0)  # PrincipalPQVAECodec's weighted defaults
    given = train_codec("pqvae-pca", train[:600], 32, queries=train_queries, steps=0)
    assert given.base.model.config.steps == 0  # type: ignore[attr-defined]  # what is given wins
    assert train_codec("pqvae-pca", train[:600], 32).model.config.steps == 0  # type: ignore[attr-defined]


def test_plain_weight_keeps_the_items_neighbours_and_data_weight_can_be_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(6)
    train, test, train_queries, _ = sample(rng)  # queries differ in 4 of 32 axes; items in all 32
    truth = np.argsort(-(test @ test.T), axis=1)[:, :10]

    def item_recall(**hyper: float) -> float:
        codec = train_codec("pqvae-pca", train, 32, queries=train_queries, steps=100, **hyper)
        restored = load_codec("pqvae-pca", codec.to_bytes())
        assert restored.base.model.config.plain_weight == hyper.get("plain_weight", 0)  # type: ignore[attr-defined]
        decoded = unit(restored.decode(restored.encode(test)))
        found = np.argsort(-(test @ decoded.T), axis=1)[:, :10]
        return float(np.mean([len(np.intersect1d(t, f)) / 10 for t, f in zip(truth, found, strict=True)]))

    # The loss measured back in the searched space spends bits where the items differ, not only
    # where these queries do.
    assert item_recall(plain_weight=30.0) > item_recall() + 0.02  # measured .440 against .414

    # data_weight among a codec's query_weighted_defaults weights as query_weights(data_weight=...).
    from semdb.codecs.pqvae import PrincipalPQVAECodec

    defaults = {**PrincipalPQVAECodec.query_weighted_defaults, "data_weight": 2.0, "steps": 0}
    monkeypatch.setattr(PrincipalPQVAECodec, "query_weighted_defaults", defaults)
    codec = train_codec("pqvae-pca", train[:600], 32, queries=train_queries)
    assert isinstance(codec, QueryWeightedCodec)
    np.testing.assert_allclose(codec.weights, query_weights(train_queries, data=train[:600], data_weight=2.0))
    given = train_codec("pqvae-pca", train[:600], 32, queries=train_queries, data_weight=0.0)
    np.testing.assert_allclose(given.weights, query_weights(train_queries))  # type: ignore[attr-defined]


def test_an_item_decoder_is_stored_and_serves_item_queries() -> None:
    rng = np.random.default_rng(7)
    train, test, train_queries, _ = sample(rng)
    codec = train_codec("pqvae-pca", train, 32, queries=train_queries, steps=50, plain_weight=10.0, item_decoder=1)
    assert isinstance(codec, QueryWeightedCodec)
    restored = load_codec("pqvae-pca", codec.to_bytes())
    codes = codec.encode(test)
    items = codec.base.item_vectors(codes)  # type: ignore[attr-defined]
    assert items is not None and items.shape == test.shape
    np.testing.assert_allclose(restored.base.item_vectors(codes), items, atol=1e-5)  # type: ignore[attr-defined]
    index = restored.item_cosine_index(codes)
    assert index is not None
    _, found = index.search(test[:5], 3)
    expected = np.argsort(-(test[:5] @ unit(items).T), axis=1)[:, :3]
    assert (found == expected).mean() > 0.9  # ties aside, the item path ranks by cosine to the item vectors
    # Without an item decoder there is no separate item path.
    assert train_codec("pqvae-pca", train, 32, queries=train_queries, steps=5).item_cosine_index(codes) is None
