"""Issue 10: search restricted to allowed ids, the exact path, and the 4-bit fast scan with exact re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from semdb.codecs import Codec, train_codec
from semdb.codecs.faiss_codecs import PQCodec
from semdb.cosine import inverse_norms
from semdb.index import CodedGroup, SearchIndex, flat_index
from semdb.index.fastscan import FastScan, _block_lists, four_bit_layout
from semdb.index.search_index import cosine_arrays

DIM = 32
N = 3000


def clustered(n: int, seed: int) -> np.ndarray:
    """``(n, DIM)`` unit vectors around 20 centres (what embeddings look like, not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(N, 0), clustered(12, 1)


def brute_force(codec: Codec, codes: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference ids: top-k of the cosine to every reconstruction (what the exact path promises)."""
    vectors = codec.scored_vectors(codes)
    scores = queries @ vectors.T * inverse_norms(vectors)[None, :]
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def four_bit_pq(x: np.ndarray, bits: int) -> Codec:
    """A ``pq`` codec at a 4-bit layout (the default layout is 8-bit words)."""
    import faiss

    index = faiss.IndexPQ(DIM, bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    return PQCodec(index)


CODECS = {
    "pcapq": lambda x: train_codec("pcapq", x, 64),
    "pq-4bit": lambda x: four_bit_pq(x, 64),
    "pq-8bit": lambda x: train_codec("pq", x, 64),
}


def index_of(codec: Codec, codes: np.ndarray, ids: np.ndarray, fast: bool) -> SearchIndex:
    cosine = codec.cosine_index(codes)
    scan = None
    if fast:
        layout = four_bit_layout(codec)
        assert layout is not None
        scan = FastScan.build(layout, ids, codes, cosine_arrays(cosine)[1])
    return SearchIndex("t", [CodedGroup(1, cosine, ids, scan)], None, np.empty(0, np.int64))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_exact_path_equals_brute_force_and_allowed_restricts(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    codec = CODECS[name](x)
    codes = codec.encode(x)
    ids = np.arange(N, dtype=np.int64) * 3 + 7  # image ids are not row numbers
    index = index_of(codec, codes, ids, fast=False)
    _, got = index.search(queries, 10, exact=True)
    np.testing.assert_array_equal(got, brute_force(codec, codes, ids, queries, 10))
    allowed = ids[::7]
    _, restricted = index.search(queries, 10, allowed=allowed, exact=True)
    keep = np.isin(ids, allowed)
    np.testing.assert_array_equal(restricted, brute_force(codec, codes[keep], ids[keep], queries, 10))
    # Fewer allowed than k: exactly those, each once.
    _, few = index.search(queries, 10, allowed=ids[[5, 50, 500]], exact=True)
    assert few.shape == (len(queries), 3)
    assert all(set(row) == set(ids[[5, 50, 500]]) for row in few)


@pytest.mark.parametrize("name", ["pcapq", "pq-4bit", "pqvae-pca"])
def test_fast_scan_reranks_exactly(
    name: str, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from semdb.index import search_index

    monkeypatch.setattr(search_index, "EXACT_ALLOWED_MAX", 0)  # allowed sets take the fast scan here
    x, queries = data
    codec = train_codec("pqvae-pca", x, 64) if name == "pqvae-pca" else CODECS[name](x)
    codes = codec.encode(x)
    ids = np.arange(N, dtype=np.int64) * 2 + 1
    index = index_of(codec, codes, ids, fast=True)
    want = brute_force(codec, codes, ids, queries, 10)
    # Re-ranking every candidate is the exact answer: the fast scan's codes are the stored ones.
    scores, got = index.search(queries, 10, rerank=N)
    np.testing.assert_array_equal(got, want)
    exact_scores, _ = index.search(queries, 10, exact=True)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)
    # A short re-rank finds nearly all of them.
    _, approx = index.search(queries, 10, rerank=100)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, want, strict=True)])
    assert recall >= 0.9
    # allowed runs inside the scan: every hit allowed, and the answer is the restricted exact one.
    allowed = ids[::5]
    _, restricted = index.search(queries, 10, allowed=allowed, rerank=N)
    keep = np.isin(ids, allowed)
    np.testing.assert_array_equal(restricted, brute_force(codec, codes[keep], ids[keep], queries, 10))


@pytest.mark.parametrize("name", ["pcapq", "pq-4bit", "pqvae-pca", "weighted pqvae-pca"])
def test_the_layout_gives_the_norms_of_what_is_scored(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    if name == "weighted pqvae-pca":
        codec = train_codec("pqvae-pca", x, 64, queries=queries, steps=0)
    elif name == "pqvae-pca":
        codec = train_codec("pqvae-pca", x, 64)
    else:
        codec = CODECS[name](x)
    layout = four_bit_layout(codec)
    assert layout is not None
    codes = codec.encode(x[:500])
    # The table sum (orthonormal rows) or the Gram form, never a decode: the same 1/‖x̂‖ as decoding.
    np.testing.assert_allclose(
        layout.inverse_norms(codes, chunk=128), inverse_norms(codec.scored_vectors(codes)), rtol=2e-5
    )


def test_eight_bit_words_have_no_fast_layout(data: tuple[np.ndarray, np.ndarray]) -> None:
    assert four_bit_layout(CODECS["pq-8bit"](data[0])) is None
    assert four_bit_layout(CODECS["pq-4bit"](data[0])) is not None


def test_fast_scan_catches_up(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    codec = CODECS["pcapq"](x)
    codes = codec.encode(x)
    norms = cosine_arrays(codec.cosine_index(codes))[1]
    ids = np.arange(N, dtype=np.int64)
    layout = four_bit_layout(codec)
    assert layout is not None and norms is not None
    # 2048 rows of 8-byte codes: a full block multiple, where FAISS's own append would overrun.
    scan = FastScan.build(layout, ids[:2048], codes[:2048], norms[:2048])
    scan.add(ids[2048:2500], codes[2048:2500], norms[2048:2500], None)
    scan.add(ids[2500:], codes[2500:], norms[2500:], None)
    gone = ids[::4]
    scan.remove(gone)
    keep = ~np.isin(ids, gone)
    _, got = scan.search(queries, 10, rerank=N)
    np.testing.assert_array_equal(got, brute_force(codec, codes[keep], ids[keep], queries, 10))
    assert not np.isin(got, gone).any()


def weighted_codec(x: np.ndarray, queries: np.ndarray) -> Codec:
    """A query-weighted ``pqvae-pca``: its layout's query map is not orthonormal (the norm bands' case)."""
    return train_codec("pqvae-pca", x, 64, queries=queries, steps=0)


def test_norm_bands_only_where_the_norm_is_measured_through_a_weighting(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.index.fastscan import BANDS

    x, queries = data
    for codec, banded in ((CODECS["pcapq"](x), False), (weighted_codec(x, queries), True)):
        codes = codec.encode(x)
        layout = four_bit_layout(codec)
        assert layout is not None and layout.orthonormal is not banded
        norms = cosine_arrays(codec.cosine_index(codes))[1]
        ids = np.arange(N, dtype=np.int64)
        scan = FastScan.build(layout, ids, codes, norms)
        assert scan.bands == (BANDS if banded else 1)
    # Equal-count bands, each its own FAISS list; and they find the best cosines from fewer candidates.
    blocks = _block_lists(scan.index)
    assert [int(blocks.list_size(band)) for band in range(BANDS)] == [N // BANDS] * BANDS
    one_band = FastScan(layout, None)
    one_band.add(ids, codes, norms, None)
    want = brute_force(codec, codes, ids, queries, 10)

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, want, strict=True)]))

    assert recall(scan.search(queries, 10, rerank=20)[1]) >= recall(one_band.search(queries, 10, rerank=20)[1]) + 0.05


def test_norm_bands_rerank_exactly_and_catch_up(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.index.lists import assign_lists, train_lists

    x, queries = data
    codec = weighted_codec(x, queries)
    codes = codec.encode(x)
    norms = cosine_arrays(codec.cosine_index(codes))[1]
    ids = np.arange(N, dtype=np.int64) * 3
    layout = four_bit_layout(codec)
    centroids = train_lists(x, lists=16)
    lists = assign_lists(centroids, x)
    assert layout is not None and norms is not None and lists is not None
    for coarse, item_lists in ((None, None), (centroids, lists)):
        half = N // 2
        part = None if item_lists is None else item_lists[:half]
        scan = FastScan.build(layout, ids[:half], codes[:half], norms[:half], part, coarse)
        assert scan.bands > 1
        # New codes fall in the bands fixed at the build; then a quarter of everything is removed.
        scan.add(ids[half:], codes[half:], norms[half:], None if item_lists is None else item_lists[half:])
        gone = ids[::4]
        scan.remove(gone)
        keep = ~np.isin(ids, gone)
        # Every band and list scanned, every candidate re-ranked: the exact answer, bit for bit.
        _, got = scan.search(queries, 10, rerank=N, nprobe=16)
        np.testing.assert_array_equal(got, brute_force(codec, codes[keep], ids[keep], queries, 10))


def test_staged_rows_respect_allowed() -> None:
    embeddings = clustered(50, 3)
    ids = np.arange(50, dtype=np.int64) + 100
    index = SearchIndex("t", [], flat_index(embeddings), ids)
    _, got = index.search(embeddings[:3], 5, allowed=ids[10:20])
    assert np.isin(got, ids[10:20]).all() and got.shape == (3, 5)


def test_allowed_must_be_integer_ids(data: tuple[np.ndarray, np.ndarray]) -> None:
    from semdb.errors import InvalidArgumentError

    index = SearchIndex("t", [], flat_index(data[0][:10]), np.arange(10, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="integer image ids"):
        index.search(data[1], 3, allowed=np.array([[1.5]]))


def test_lists_are_assigned_from_embeddings_and_stored_strictly() -> None:
    from semdb.errors import DatabaseDamagedError
    from semdb.index.lists import assign_lists, list_count, lists_from_bytes, lists_to_bytes, train_lists

    x = clustered(2000, 4)
    assert list_count(100) == 0 and train_lists(x[:100]) is None and assign_lists(None, x) is None
    centroids = train_lists(x)
    assert centroids is not None and centroids.shape == (list_count(2000), DIM)
    lists = assign_lists(centroids, x)
    assert lists is not None
    np.testing.assert_array_equal(lists, np.argmax(x @ centroids.T, axis=1))
    blob = lists_to_bytes(centroids)
    restored = lists_from_bytes(blob, DIM)
    assert restored is not None
    np.testing.assert_array_equal(restored, centroids)
    assert blob is not None
    with pytest.raises(DatabaseDamagedError, match=r"codecs\.lists"):
        lists_from_bytes(blob[:-3], DIM)


def test_fast_scan_probes_inverted_lists(data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    from semdb.index.lists import assign_lists, train_lists

    x, queries = data
    codec = CODECS["pcapq"](x)
    codes = codec.encode(x)
    norms = cosine_arrays(codec.cosine_index(codes))[1]
    ids = np.arange(N, dtype=np.int64)
    centroids = train_lists(x, lists=16)
    lists = assign_lists(centroids, x)
    layout = four_bit_layout(codec)
    assert layout is not None and centroids is not None
    half = N // 2
    scan = FastScan.build(layout, ids[:half], codes[:half], norms[:half], lists[:half], centroids)
    scan.add(ids[half:], codes[half:], norms[half:], lists[half:])  # appended list by list
    want = brute_force(codec, codes, ids, queries, 10)
    # Every list probed and every candidate re-ranked: exact.
    _, everything = scan.search(queries, 10, nprobe=16, rerank=N)
    np.testing.assert_array_equal(everything, want)
    # One list probed: only items of the query's nearest list come back.
    _, one = scan.search(queries, 10, nprobe=1, rerank=N)
    nearest = np.argmax(queries @ centroids.T, axis=1)
    for row, list_no in zip(one, nearest, strict=True):
        assert set(lists[row[row >= 0]]) <= {list_no}
    # Allowed images all outside the probed list: the index falls back to the exact restricted scan.
    from semdb.index import search_index

    monkeypatch.setattr(search_index, "EXACT_ALLOWED_MAX", 0)
    index = SearchIndex("t", [CodedGroup(1, codec.cosine_index(codes), ids, scan)], None, np.empty(0, np.int64))
    elsewhere = ids[lists != nearest[0]][:50]
    _, found = index.search(queries[:1], 10, allowed=elsewhere, nprobe=1)
    keep = np.isin(ids, elsewhere)
    np.testing.assert_array_equal(found, brute_force(codec, codes[keep], ids[keep], queries[:1], 10))


def test_add_embeddings_and_an_index_that_catches_up(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import semdb
    from semdb.errors import InvalidArgumentError
    from semdb.index import build, cache_path
    from semdb.index.lists import list_count

    # Small thresholds so that a few thousand rows take the fast scan and the inverted lists.
    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 500)
    monkeypatch.setattr(build, "LISTS_MIN_ITEMS", 1000)
    x = clustered(2200, 5)
    path = tmp_path / "bulk.semdb"
    paths = [f"/nowhere/{i}.png" for i in range(len(x))]
    with semdb.connect(path, codec="pcapq", bits=64, model="hf-hub:none/none") as db:
        with pytest.raises(InvalidArgumentError, match="one row per path"):
            db.add_embeddings(paths[:3], x[:2])
        report = db.add_embeddings(paths[:2000], x[:2000], train_size=1000)
        # One transaction holds all 2,000: the codec (and its lists) train on all of them after it.
        assert report.added == 2000 and report.codec_trained_on == 2000
        queries = clustered(5, 6)
        fast = db.search_vectors(queries, k=10)
        exact = db.search_vectors(queries, k=10, exact=True)
        group = db.index().coded[0]
        assert group.fast is not None and group.fast.lists == list_count(2000) and group.lists is not None
        overlap = np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(fast, exact, strict=True)])
        assert overlap >= 0.8  # the default nprobe over 16 lists of this small set
        with pytest.raises(InvalidArgumentError, match="nprobe"):
            db.search_vectors(queries, k=10, nprobe=0)
        # Every list probed: the default re-rank depth finds the exact answer on this set.
        every_list = [[h.id for h in row] for row in db.search_vectors(queries, k=10, nprobe=1000)]
        assert every_list == [[h.id for h in row] for row in exact]
        before = db.index()
        db.add_embeddings(paths[2000:], x[2000:])  # appended: the open index catches up in place
        after = db.index()
        assert after is not before and after.coded[0].fast is before.coded[0].fast
        assert after.coded[0].fast.ntotal == 2200
        # The caught-up fast scan, every list probed and every candidate re-ranked, is the exact answer.
        _, exhaustive = after.search(queries, 10, rerank=2200, nprobe=1000)
        _, exact_ids = after.search(queries, 10, exact=True)
        np.testing.assert_array_equal(exhaustive, exact_ids)
        allowed = np.array(sorted(h.id for h in db.search_vectors(queries, k=400, exact=True)[0])[::3], np.int64)
        hits = db.search_vectors(queries[:1], k=20, allowed=allowed, exact=True)[0]
        assert {h.id for h in hits} <= set(allowed.tolist()) and len(hits) == 20
    # A reopen starts from the cache (an exact tag) and answers exactly as before.
    with semdb.connect(path) as db:
        reopened = db.search_vectors(queries, k=10, exact=True)
        final_ids = [[h.id for h in row] for row in reopened]
    assert cache_path(path).is_file()
    cache_path(path).unlink()  # rebuilt from the store alone: the same answer
    with semdb.connect(path) as db:
        assert [[h.id for h in row] for row in db.search_vectors(queries, k=10, exact=True)] == final_ids


def test_a_fast_group_is_cached_by_its_codes_and_an_altered_one_is_rebuilt(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import semdb
    from semdb.index import build, cache, cache_path

    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 500)
    x = clustered(1200, 7)
    path = tmp_path / "cached.semdb"
    queries = clustered(5, 8)
    with semdb.connect(path, codec="pcapq", bits=64, model="hf-hub:none/none") as db:
        db.add_embeddings([f"/nowhere/{i}.png" for i in range(len(x))], x)
        want = [[h.id for h in row] for row in db.search_vectors(queries, k=10)]
        fast = db.index().coded[0].fast
        assert db.index().coded[0].index is None  # the fast scan alone: no exact scan built to save
        # pcapq's layout is orthonormal: 1/‖x̂‖ comes from the candidates' words, none is held.
        assert fast is not None and fast.norms_from_words and fast.inverse_norms is None
        exact = [[h.id for h in row] for row in db.search_vectors(queries, k=10, exact=True)]
    arrays = cache._read_npz(cache_path(path), 2**30)
    assert arrays is not None and "g0_codes" in arrays and "g0_part_sizes" not in arrays
    with semdb.connect(path) as db:
        group = db.index().coded[0]
        assert group.fast is not None and group.stored_arrays is None and group.index is None
        assert [[h.id for h in row] for row in db.search_vectors(queries, k=10)] == want
    # Codes one byte too wide, under a checksum that matches: not used, the index is read from the store.
    arrays = dict(arrays)
    arrays.pop("checksum")
    arrays["g0_codes"] = np.concatenate([arrays["g0_codes"], np.zeros((len(arrays["g0_codes"]), 1), np.uint8)], axis=1)
    arrays["checksum"] = cache._checksum(arrays)
    with cache_path(path).open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    with semdb.connect(path) as db:
        assert [[h.id for h in row] for row in db.search_vectors(queries, k=10)] == want
    rewritten = cache._read_npz(cache_path(path), 2**30)  # by the full read that replaced it
    assert rewritten is not None and rewritten["g0_codes"].shape == (len(x), 8)
    # Cached with a fast scan that no longer applies: the exact scan from the cached codes, norms recomputed.
    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 10**9)
    with semdb.connect(path) as db:
        assert db.index().coded[0].fast is None
        assert [[h.id for h in row] for row in db.search_vectors(queries, k=10)] == exact


@pytest.mark.parametrize(("words", "n"), [(16, 1), (16, 31), (32, 32), (32, 100), (64, 257)])
def test_blocked_layout_is_faiss_own_and_reads_back(words: int, n: int) -> None:
    """pack_blocks writes what FAISS's own conversion writes; unpack_blocks reads any code back."""
    import faiss

    from semdb.index.fastscan import pack_blocks, unpack_blocks, unpack_list

    rng = np.random.default_rng(words + n)
    codes = rng.integers(0, 256, (n, words // 2), dtype=np.uint8)
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(words), words, 1, words, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.by_residual = False
    ivf.train(rng.standard_normal((512, words)).astype(np.float32))
    labels = np.arange(n, dtype=np.int64)
    ivf.invlists.add_entries(0, n, faiss.swig_ptr(labels), faiss.swig_ptr(codes))
    ivf.ntotal = n
    fast = faiss.IndexIVFPQFastScan(ivf)
    blocks = _block_lists(fast)
    theirs = faiss.rev_swig_ptr(blocks.get_codes(0), -(-n // 32) * 32 * words // 2)
    np.testing.assert_array_equal(pack_blocks(codes), theirs)
    shuffled = rng.permutation(n)
    np.testing.assert_array_equal(unpack_blocks(theirs, shuffled, words // 2), codes[shuffled])
    np.testing.assert_array_equal(unpack_list(theirs, n, words // 2), codes)


def coded_in_lists(codec: Codec, x: np.ndarray, lists: int):  # type: ignore[no-untyped-def]
    """``(codes, 1/‖x̂‖, inverted list of each row, the lists' centroids, the 4-bit layout)`` of ``x``."""
    from semdb.index.lists import assign_lists, train_lists

    codes = codec.encode(x)
    norms = cosine_arrays(codec.cosine_index(codes))[1]
    centroids = train_lists(x, lists=lists)
    assigned = assign_lists(centroids, x)
    layout = four_bit_layout(codec)
    assert layout is not None and norms is not None and assigned is not None
    return codes, norms, assigned, centroids, layout


def test_the_fast_scan_holds_each_code_once_and_gives_the_rows_back(data: tuple[np.ndarray, np.ndarray]) -> None:

    x, queries = data
    codec = weighted_codec(x, queries)  # norm bands: 1/‖x̂‖ held by id, lists × bands FAISS lists
    codes, norms, lists, centroids, layout = coded_in_lists(codec, x, 16)
    ids = np.arange(N, dtype=np.int64) * 5 + 2
    scan = FastScan.build(layout, ids[::2], codes[::2], norms[::2], lists[::2], centroids)
    scan.add(ids[1::2], codes[1::2], norms[1::2], lists[1::2])  # interleaved ids: lists merged in order
    scan.remove(ids[::3])
    keep = np.ones(N, bool)
    keep[::3] = False
    got_ids, got_codes, got_lists = scan.rows()
    np.testing.assert_array_equal(got_ids, ids[keep])
    np.testing.assert_array_equal(got_codes, codes[keep])
    np.testing.assert_array_equal(got_lists, lists[keep])
    np.testing.assert_array_equal(scan.ids_by_row(), ids[keep])
    np.testing.assert_array_equal(scan.inverse_norms_by_row(got_ids, got_codes), norms[keep])
    assert scan.contains(ids).tolist() == keep.tolist() and scan.ntotal == int(keep.sum())
    # Bytes: the blocks and labels FAISS holds, one bit per id, 4 bytes per id of 1/‖x̂‖, the centroids.
    assert scan.nbytes() >= int(keep.sum()) * (codes.shape[1] + 8) + 4 * int(ids[-1])


@pytest.mark.parametrize("removal_batch", [50, 1 << 20])
def test_places_in_the_labels_stay_right_through_rounds_of_adds_and_removals(
    data: tuple[np.ndarray, np.ndarray], removal_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends to list ends and removals (holes filled from list ends, offsets renumbered), interleaved:
    every code is still read from where its label says, and a full re-rank equals brute force."""
    from semdb.index import fastscan

    monkeypatch.setattr(fastscan, "REMOVAL_BATCH", removal_batch)  # labels read a few lists at a time, or all

    x, queries = data
    codec = CODECS["pcapq"](x)
    codes, norms, lists, centroids, layout = coded_in_lists(codec, x, 4)
    ids = np.arange(N, dtype=np.int64) * 3 + 1
    rng = np.random.default_rng(5)
    held = np.zeros(N, bool)
    held[:600] = True
    scan = FastScan.build(layout, ids[:600], codes[:600], norms[:600], lists[:600], centroids)
    for start in range(600, N, 600):
        new = np.arange(start, min(start + 600, N))
        scan.add(ids[new], codes[new], norms[new], lists[new])
        held[new] = True
        gone = rng.choice(np.flatnonzero(held), size=150, replace=False)
        scan.remove(ids[gone])
        held[gone] = False
        got_ids, got_codes, got_lists = scan.rows()
        np.testing.assert_array_equal(got_ids, ids[held])
        np.testing.assert_array_equal(got_codes, codes[held])
        np.testing.assert_array_equal(got_lists, lists[held])
        _, got = scan.search(queries, 10, rerank=N, nprobe=4)
        np.testing.assert_array_equal(got, brute_force(codec, codes[held], ids[held], queries, 10))


def test_ids_beyond_what_a_label_holds_keep_the_exact_scan(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from semdb.index import build
    from semdb.index.fastscan import MAX_IMAGE_ID

    x, _ = data
    codec = CODECS["pcapq"](x)
    codes = codec.encode(x)
    ids = np.arange(N, dtype=np.int64)
    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 100)
    assert build.fast_scan(codec, ids, codes, None) is not None
    assert build.fast_scan(codec, ids + MAX_IMAGE_ID, codes, None) is None
    layout = four_bit_layout(codec)
    assert layout is not None
    with pytest.raises(ValueError, match="image ids must lie"):
        FastScan.build(layout, ids + MAX_IMAGE_ID, codes, None)
