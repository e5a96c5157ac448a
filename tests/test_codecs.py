"""Codecs on plain arrays: sizes, shapes, serialisation, search over codes, small collections."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
import pytest
import torch

from semdb.codecs import list_codecs, load_codec, train_codec
from semdb.codecs.faiss_codecs import byte_aligned_pq, choose_layout
from semdb.codecs.pcapq import pcapq_layout, principal_basis
from semdb.codecs.pqvae import unpack_indices
from semdb.errors import InvalidArgumentError

FAISS_CODECS = ["pq", "opq", "rq", "pcapq"]
ALL_BITS = [8, 16, 32, 64, 128, 256]
DIM = 32


def unit_rows(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    """``(n, d)`` float32 rows on the unit sphere, drawn around a few cluster centres."""
    centres = rng.standard_normal((8, d))
    x = centres[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread() -> Iterator[None]:
    """FAISS's OpenMP threads spin-wait; on a busy machine one thread is several times faster."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """(train (400, 32), test (50, 32)) float32 unit vectors."""
    rng = np.random.default_rng(0)
    return unit_rows(rng, 400), unit_rows(rng, 50)


def test_registry_lists_the_codecs() -> None:
    assert list_codecs() == ["opq", "pcapq", "pq", "pqvae", "pqvae-pca", "rq"]


# RQ trains one k-means per 8 bits with a beam search in between: 128 and 256 bits take tens of
# seconds, so those sizes are covered by the small-collection test below.
@pytest.mark.parametrize(
    ("name", "bits"), [(name, bits) for name in FAISS_CODECS for bits in ALL_BITS if name != "rq" or bits <= 64]
)
def test_codes_sizes_shapes_and_round_trip(name: str, bits: int, data: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = data
    codec = train_codec(name, train, bits)
    codes = codec.encode(test)
    assert codec.bits_per_image == bits
    assert codes.shape == (len(test), bits // 8)
    assert codes.dtype == np.uint8
    decoded = codec.decode(codes)
    assert decoded.shape == test.shape
    assert decoded.dtype == np.float32

    restored = load_codec(name, codec.to_bytes())
    assert restored.bits_per_image == bits
    assert np.array_equal(restored.encode(test), codes)
    assert np.array_equal(restored.decode(codes), decoded)
    assert restored.to_bytes() == codec.to_bytes()


@pytest.mark.parametrize("name", FAISS_CODECS)
def test_training_is_deterministic(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = data
    assert train_codec(name, train, 64, seed=3).to_bytes() == train_codec(name, train, 64, seed=3).to_bytes()


@pytest.mark.parametrize("name", FAISS_CODECS)
def test_search_index_scores_codes_by_inner_product(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = data
    codec = train_codec(name, train, 64)
    codes = codec.encode(test)
    index = codec.search_index(codes)
    assert index.ntotal == len(test)
    scores, ids = index.search(train[:7], 5)
    expected = train[:7] @ codec.decode(codes).T  # (7, 50): row i of the index is codes[i]
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, axis=1), atol=1e-4)
    assert np.array_equal(ids[:, 0], expected.argmax(axis=1))


@pytest.mark.parametrize("name", FAISS_CODECS)
def test_reconstruction_beats_chance(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = data
    codec = train_codec(name, train, 64)
    rng = np.random.default_rng(1)

    def mean_cosine(codes: np.ndarray) -> float:
        decoded = codec.decode(codes)
        return float(np.mean(np.sum(decoded * test, axis=1) / np.linalg.norm(decoded, axis=1)))

    random_codes = rng.integers(0, 256, (len(test), codec.code_size), dtype=np.uint8)
    trained = mean_cosine(codec.encode(test))
    assert trained > mean_cosine(random_codes) + 0.3


@pytest.mark.parametrize("name", FAISS_CODECS)
@pytest.mark.parametrize("n", [1, 2, 5, 40])
@pytest.mark.parametrize("bits", [8, 64, 256])
def test_tiny_training_sets_still_give_exact_size_codes(name: str, n: int, bits: int) -> None:
    rng = np.random.default_rng(n)
    train = unit_rows(rng, n)
    codec = train_codec(name, train, bits)
    codes = codec.encode(train)
    assert codes.shape == (n, bits // 8)
    if n <= 2:
        # No more vectors than centroids: every training vector is reproduced exactly.
        np.testing.assert_allclose(codec.decode(codes), train, atol=1e-5)
    assert load_codec(name, codec.to_bytes()).search_index(codes).ntotal == n


def test_layout_prefers_bytes_and_falls_back_for_small_collections() -> None:
    assert choose_layout(384, 64, 100_000, split_dims=True) == (8, 8)
    assert choose_layout(384, 64, 20, split_dims=True) == (16, 4)  # 16 centroids <= 20 vectors
    assert choose_layout(384, 64, 1, split_dims=True) == (64, 1)
    assert choose_layout(16, 256, 100_000, split_dims=True) == (16, 16)  # 8-bit would need 32 | 16
    assert choose_layout(30, 64, 100_000, split_dims=False) == (8, 8)


@pytest.mark.parametrize("name", ["pq", "opq"])
def test_impossible_layout_is_a_clear_error(name: str) -> None:
    x = unit_rows(np.random.default_rng(0), 100, d=7)
    with pytest.raises(InvalidArgumentError, match="no product-quantiser layout"):
        train_codec(name, x, 64)


@pytest.mark.parametrize("bits", [0, 12, -8])
def test_bad_bit_rates_are_rejected(bits: int, data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InvalidArgumentError, match="multiple of 8"):
        train_codec("pq", data[0], bits)


@pytest.mark.parametrize("name", FAISS_CODECS)
def test_foreign_state_is_rejected(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    other = "rq" if name != "rq" else "pq"
    with pytest.raises(InvalidArgumentError):
        load_codec(name, train_codec(other, data[0], 32).to_bytes())
    with pytest.raises(InvalidArgumentError):
        load_codec(name, b"not a codec")


def test_pcapq_layout_spreads_half_a_bit_over_each_kept_dimension() -> None:
    assert pcapq_layout(384, 64) == (128, 16, 4)  # 16 sub-vectors of 8 dims, 16 words each
    assert pcapq_layout(384, 256) == (384, 64, 4)  # every dimension kept, 6 per sub-vector
    assert pcapq_layout(16, 128) == (16, 16, 8)  # 4-bit words would need 32 sub-vectors of 16 dims
    with pytest.raises(InvalidArgumentError, match="no pcapq layout"):
        pcapq_layout(2, 128)


def test_pcapq_scans_its_4_bit_codes_a_byte_at_a_time(data: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = data
    codec = train_codec("pcapq", train, 64)
    codes = codec.encode(test)
    index = codec.search_index(codes)
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    assert (inner.pq.nbits, inner.pq.M, inner.code_size) == (8, 8, 8)
    # The same scores as the codec's own 4-bit PQ (FAISS's packing, first index in the low bits).
    own = faiss.clone_index(codec.index)
    faiss.downcast_index(faiss.downcast_index(own).index).add_sa_codes(codes)
    own.ntotal = len(codes)
    want, want_rows = own.search(train[:5], 6)
    got, got_rows = index.search(train[:5], 6)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.array_equal(got_rows, want_rows)


def test_byte_aligned_pq_rejects_words_that_do_not_pack() -> None:
    with pytest.raises(ValueError, match="whole bytes"):
        byte_aligned_pq(np.zeros((3, 16, 2), dtype=np.float32), 4, first_index_high=False)


def test_principal_basis_is_orthonormal_and_starts_with_the_mean_direction(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    train, _ = data
    basis = principal_basis(train, 12)
    assert basis.shape == (12, DIM) and basis.dtype == np.float32
    np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-5)
    mean = train.mean(axis=0)
    np.testing.assert_allclose(basis[0], mean / np.linalg.norm(mean), atol=1e-5)
    # The other axes come by decreasing variance.
    spread = ((train - mean) @ basis[1:].T).var(axis=0)
    assert (np.diff(spread) <= 1e-6).all()


def test_wrong_shapes_are_rejected(data: tuple[np.ndarray, np.ndarray]) -> None:
    codec = train_codec("pq", data[0], 32)
    with pytest.raises(InvalidArgumentError, match="dimension"):
        codec.encode(np.zeros((2, DIM + 1), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="codes must have shape"):
        codec.decode(np.zeros((2, 5), dtype=np.uint8))


def test_pqvae_sizes_round_trip_and_determinism(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.codecs.pqvae import PQVAECodec

    train, test = data
    for bits in (8, 24):
        codec = PQVAECodec.train(train, bits, steps=30)
        codes = codec.encode(test)
        assert codes.shape == (len(test), bits // 8) and codes.dtype == np.uint8
        decoded = codec.decode(codes)
        assert decoded.shape == test.shape and decoded.dtype == np.float32
        restored = load_codec("pqvae", codec.to_bytes())
        assert np.array_equal(restored.encode(test), codes)
        assert np.array_equal(restored.decode(codes), decoded)
        assert PQVAECodec.train(train, bits, steps=30).to_bytes() == codec.to_bytes()
    with pytest.raises(InvalidArgumentError):
        load_codec("pqvae", train_codec("pq", train, 32).to_bytes())


@pytest.mark.parametrize("codebook_bits", [1, 2, 4])
def test_pqvae_small_shared_codebooks_pack_into_exact_bytes(
    codebook_bits: int, data: tuple[np.ndarray, np.ndarray]
) -> None:
    from semdb.codecs.pqvae import PQVAECodec, pack_indices, unpack_indices

    train, test = data
    codec = PQVAECodec.train(train, 16, steps=30, codebook_bits=codebook_bits)
    assert codec.model.config.subvectors == 16 // codebook_bits
    assert f"x {2**codebook_bits}-word" in codec.describe()
    codes = codec.encode(test)
    assert codes.shape == (len(test), 2) and codes.dtype == np.uint8
    indices = unpack_indices(codes, codebook_bits)
    assert indices.shape == (len(test), 16 // codebook_bits) and indices.max() < 2**codebook_bits
    assert np.array_equal(pack_indices(indices, codebook_bits), codes)
    restored = load_codec("pqvae", codec.to_bytes())
    assert np.array_equal(restored.decode(codes), codec.decode(codes))
    # Every index position can be told apart: the packed codes of the test set are not all alike.
    assert len(np.unique(codes, axis=0)) > 1


def test_pqvae_rejects_codebooks_that_do_not_pack(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.codecs.pqvae import PQVAECodec

    with pytest.raises(InvalidArgumentError, match="codebook_bits must be one of"):
        PQVAECodec.train(data[0], 24, steps=1, codebook_bits=3)


def test_pqvae_training_beats_its_random_initialisation(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.codecs.pqvae import PQVAECodec

    train, test = data

    def mean_cosine(codec: PQVAECodec) -> float:
        return float(np.mean(np.sum(codec.decode(codec.encode(test)) * test, axis=1)))

    untrained = mean_cosine(PQVAECodec.train(train, 32, steps=1, learning_rate=0.0))
    trained = mean_cosine(PQVAECodec.train(train, 32, steps=200))
    assert trained > untrained + 0.2


def test_pqvae_works_on_one_vector() -> None:
    x = unit_rows(np.random.default_rng(0), 1)
    codec = train_codec("pqvae", x, 16)
    assert codec.encode(x).shape == (1, 2)


def test_pqvae_pca_is_a_closed_form_shared_codebook_over_principal_axes(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.codecs.pqvae import PrincipalPQVAECodec

    train, test = data
    codec = train_codec("pqvae-pca", train, 32)
    assert isinstance(codec, PrincipalPQVAECodec)
    config = codec.model.config
    assert (config.encoder, config.subvectors, config.latent_dim, config.codebook_size) == ("principal", 8, 4, 16)
    codes = codec.encode(test)
    assert codes.shape == (len(test), 4) and codes.dtype == np.uint8
    assert train_codec("pqvae-pca", train, 32).to_bytes() == codec.to_bytes()  # deterministic
    restored = load_codec("pqvae-pca", codec.to_bytes())
    assert np.array_equal(restored.encode(test), codes)
    assert np.array_equal(restored.decode(codes), codec.decode(codes))

    # The decoder inverts the encoder on the kept axes: a latent that is not quantised comes back as
    # the embedding's projection on the first 32 principal axes (here all of them).
    with torch.no_grad():
        x = torch.from_numpy(test)
        back = torch.nn.functional.normalize(codec.model.decoder(codec.model.encoder(x)), dim=-1).numpy()
    np.testing.assert_allclose(back, test, atol=1e-4)

    # And its shared codebook beats a random one of the same structure.
    def mean_cosine(c: np.ndarray) -> float:
        return float(np.mean(np.sum(codec.decode(c) * test, axis=1)))

    random_codes = np.random.default_rng(1).integers(0, 256, codes.shape, dtype=np.uint8)
    assert mean_cosine(codes) > mean_cosine(random_codes) + 0.2


def test_pqvae_pca_rejects_more_sub_vectors_than_dimensions(data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InvalidArgumentError, match="choose fewer --bits"):
        train_codec("pqvae-pca", data[0], 512)
    with pytest.raises(InvalidArgumentError, match="pqvae encoder must be one of"):
        from semdb.codecs.pqvae import PQVAECodec

        PQVAECodec.train(data[0], 32, encoder="conv")


@pytest.mark.parametrize("bits", [16, 64])
def test_pqvae_pca_searches_its_codes_not_a_float_copy(bits: int) -> None:
    rng = np.random.default_rng(4)
    x = unit_rows(rng, 1500)
    codec = train_codec("pqvae-pca", x[:1000], bits)
    codes = codec.encode(x[1000:])
    index = codec.search_index(codes)
    # A transform in front of a PQ holding the bits/8-byte codes: no decoded floats.
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    assert isinstance(inner, faiss.IndexPQ) and inner.code_size == bits // 8 and index.ntotal == 500
    assert inner.pq.nbits == 8  # 4-bit words scanned a byte at a time
    # It scores the decoder's output before normalisation ...
    with torch.no_grad():
        indices = torch.from_numpy(unpack_indices(codes, codec.model.config.codebook_bits))
        raw = codec.model.decoder(codec.model.codebook[indices].reshape(500, -1)).numpy()
    scores, rows = index.search(x[:6], 5)
    np.testing.assert_allclose(scores, np.take_along_axis(x[:6] @ raw.T, rows, axis=1), atol=1e-4)
    # ... and the cosine index ranks by cosine, i.e. by the normalised reconstructions decode() gives.
    want = x[:6] @ codec.decode(codes).T
    cos_scores, cos_rows = codec.cosine_index(codes).search(x[:6], 5)
    np.testing.assert_allclose(cos_scores, -np.sort(-want, axis=1)[:, :5], atol=1e-4)
    np.testing.assert_allclose(cos_scores, np.take_along_axis(want, cos_rows, axis=1), atol=1e-4)


def test_mlp_pqvae_still_searches_decoded_vectors(data: tuple[np.ndarray, np.ndarray]) -> None:
    codec = train_codec("pqvae", data[0], 16)
    index = codec.search_index(codec.encode(data[1]))
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == len(data[1])


def test_fine_tuned_pqvae_pca_still_searches_its_codes(data: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = data
    closed_form = train_codec("pqvae-pca", train, 32)
    tuned = train_codec("pqvae-pca", train, 32, steps=30)
    assert tuned.to_bytes() != closed_form.to_bytes()  # the gradient steps changed something
    codes = tuned.encode(test)
    index = tuned.search_index(codes)  # owns its parts: keep it alive while looking inside
    assert isinstance(faiss.downcast_index(faiss.downcast_index(index).index), faiss.IndexPQ)
    want = train[:4] @ tuned.decode(codes).T
    scores, _ = tuned.cosine_index(codes).search(train[:4], 5)
    np.testing.assert_allclose(scores, -np.sort(-want, axis=1)[:, :5], atol=1e-4)


def test_hyper_parameters_reach_only_codecs_that_take_them(data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InvalidArgumentError, match="codec pq takes no hyper-parameters"):
        train_codec("pq", data[0], 32, steps=10)
    with pytest.raises(InvalidArgumentError, match="unknown pqvae hyper-parameter"):
        train_codec("pqvae", data[0], 32, stepz=10)
