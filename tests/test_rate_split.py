"""The rate split (semdb.codecs.rate_split): a query-weighted primary code plus a plain PQ of its residual."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import broad_embeddings

from semdb.codecs import train_codec
from semdb.codecs.choice import train_for_database
from semdb.codecs.rate_split import RateSplitCodec, pack_words, unpack_words
from semdb.errors import InvalidArgumentError
from semdb.index.fastscan import four_bit_layout


def broad(n: int = 2000, d: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return broad_embeddings(n, d, seed)


def test_words_pack_high_first_and_back() -> None:
    words = np.array([[1, 2, 15, 0]])
    assert pack_words(words).tolist() == [[0x12, 0xF0]]
    assert unpack_words(pack_words(words)).tolist() == words.tolist()


def test_a_rate_split_is_one_four_bit_pq_that_faiss_and_the_fast_scan_score_alike() -> None:
    x, q = broad()
    codec = train_for_database(
        x, codec=None, bits=64, fidelity=None, queries=lambda _: q, steps=20, residual_bits=16
    ).codec
    assert isinstance(codec, RateSplitCodec)
    assert codec.bits_per_image == 64 and codec.primary.bits_per_image == 48 and codec.code_size == 8
    codes = codec.encode(x[:300])
    assert codes.shape == (300, 8)
    vectors = codec.scored_vectors(codes)
    scores, found = codec.search_index(codes).search(x[:5], 4)
    np.testing.assert_allclose(scores, np.take_along_axis(x[:5] @ vectors.T, found, axis=1), atol=1e-4)
    layout = four_bit_layout(codec)
    assert layout is not None and layout.words == 16
    words = layout.words_of(layout.faiss_order(codes))
    lifted = layout.centroids[np.arange(layout.words), words].reshape(len(codes), -1)
    assert layout.matrix is not None
    np.testing.assert_allclose(lifted @ layout.matrix, vectors, atol=1e-4)
    # The residual words bring the reconstructions closer than the primary's code alone.
    primary = codec.primary.decode(codes[:, : codec.primary.code_size])
    primary /= np.linalg.norm(primary, axis=1, keepdims=True)
    assert (codec.decode(codes) * x[:300]).sum(1).mean() > (primary * x[:300]).sum(1).mean() + 0.02


def test_a_rate_split_refuses_what_it_cannot_code() -> None:
    x, q = broad(d=32)
    primary = train_codec("pqvae-pca", x, 32, queries=q, steps=5)
    with pytest.raises(InvalidArgumentError):
        RateSplitCodec.train(x, 32, primary=primary)  # no bits left for the residual
    with pytest.raises(InvalidArgumentError):
        RateSplitCodec.train(x, 32 + 64, primary=primary, residual_dims=8)  # 16 words x 8 axes > 32
    codec = RateSplitCodec.train(x, 48, primary=primary, residual_dims=2)  # narrower than the primary's words
    assert codec.scanner is None and four_bit_layout(codec) is None
    codes = codec.encode(x[:50])
    scores, found = codec.search_index(codes).search(x[:3], 2)
    np.testing.assert_allclose(scores, np.take_along_axis(x[:3] @ codec.scored_vectors(codes).T, found, 1), atol=1e-4)


def test_a_residual_for_item_queries_leaves_text_queries_to_the_primary() -> None:
    x, q = broad()
    hyper = {"steps": 20, "residual_bits": 8, "item_residual": 1, "item_decoder": 1}
    codec = train_for_database(x, codec=None, bits=64, fidelity=None, queries=lambda _: q, **hyper).codec
    assert isinstance(codec, RateSplitCodec) and codec.items_only
    codes = codec.encode(x[:300])
    first = codes[:, : codec.primary.code_size]
    np.testing.assert_allclose(codec.scored_vectors(codes), codec.primary.scored_vectors(first), atol=1e-6)
    layout = four_bit_layout(codec)  # text queries: the residual's words score zero
    assert layout is not None and layout.matrix is not None
    words = layout.words_of(layout.faiss_order(codes))
    lifted = layout.centroids[np.arange(layout.words), words].reshape(len(codes), -1)
    np.testing.assert_allclose(lifted @ layout.matrix, codec.scored_vectors(codes), atol=1e-4)
    items, alone = codec.item_vectors(codes), codec.primary.item_vectors(first)  # type: ignore[attr-defined]
    assert items is not None and alone is not None
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    assert (unit(items) * x[:300]).sum(1).mean() > (unit(alone) * x[:300]).sum(1).mean() + 0.01
    index = codec.item_cosine_index(codes)
    assert index is not None
    _, found = index.search(x[:3], 3)
    assert (found == np.argsort(-(x[:3] @ unit(items).T), axis=1)[:, :3]).mean() > 0.9
    with pytest.raises(InvalidArgumentError):  # an item residual needs an item decoder (the default has one)
        train_for_database(
            x,
            codec=None,
            bits=64,
            fidelity=None,
            queries=lambda _: q,
            steps=5,
            residual_bits=8,
            item_residual=1,
            item_decoder=0,
        )


def test_image_queries_of_an_item_residual_search_its_item_path() -> None:
    x, q = broad()
    hyper = {"steps": 20, "residual_bits": 8, "item_residual": 1, "item_decoder": 1}
    codec = train_for_database(x, codec=None, bits=64, fidelity=None, queries=lambda _: q, **hyper).codec
    codes = codec.encode(x[:300])
    assert codec.has_item_path
    text = codec.cosine_index(codes)
    items = codec.item_cosine_index(codes)
    assert items is not None
    # What evaluation, fidelity and the database search image queries with: the item path, not the text one.
    chosen = codec.image_cosine_index(codes, text)
    np.testing.assert_array_equal(chosen.search(x[:20], 10)[1], items.search(x[:20], 10)[1])
    assert (chosen.search(x[:20], 10)[1] != text.search(x[:20], 10)[1]).any()
