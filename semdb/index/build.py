"""Building the search index from the store, through the cache when it can be trusted, catching up otherwise.

An index of the store's exact state (same tag) is used as it is: the one in memory, else the cache
file. Otherwise the codes are streamed from the store in chunks straight into numpy
(:meth:`~semdb.store.repository.Repository.coded_chunks`) and reconciled with the index of an
earlier state of the same database — the one in memory, else an earlier cache file — row by row:
an image whose id and code bytes are unchanged keeps its ``1/‖x̂‖`` (the costly part: decoding its
code), every other row is (re)computed, and rows gone from the store go. The result holds exactly
the store's ``(image id, code)`` pairs whatever the earlier index was, so a stale cache can only
save work, never change an answer. The fast scan is appended to and masked in place when few rows
changed, rebuilt otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from semdb.codecs import Codec
from semdb.codecs.base import DECODE_CHUNK
from semdb.cosine import CosineIndex, inverse_norms
from semdb.errors import DatabaseDamagedError
from semdb.index.cache import load_cache, load_earlier_cache, save_cache
from semdb.index.fastscan import FastScan, four_bit_layout
from semdb.index.lists import lists_from_bytes
from semdb.index.search_index import CodedGroup, SearchIndex, flat_index
from semdb.store import CodecRow, Repository, Store

# Below this many codes a group keeps only the exact scan: it takes about as long as the fast scan's
# fixed costs there (docs/benchmarks.md, "Scale").
FAST_SCAN_MIN_ITEMS = 50_000
# From this many codes on, a group with inverted lists probes them rather than scanning every code:
# at 1 M they took 1.14 ms against 4.17 ms for the full fast scan, at 200k 1.94 ms against 1.58 ms
# (docs/benchmarks.md, "Scale"); the crossover between was not measured.
LISTS_MIN_ITEMS = 500_000
# A fast scan is caught up in place when at most this fraction of its rows changed; rebuilt beyond.
CATCH_UP_FRACTION = 0.1


@dataclass
class StoredGroup:
    """What the store holds for one codec: ``ids`` ``(n,)`` int64 sorted, ``codes`` ``(n, code_size)``
    uint8, ``lists`` ``(n,)`` int64 or None, ``coarse`` ``(lists, d)`` float32 or None, the codec row."""

    row: CodecRow
    ids: np.ndarray
    codes: np.ndarray
    lists: np.ndarray | None
    coarse: np.ndarray | None


def group_arrays(cosine: CosineIndex) -> tuple[np.ndarray, np.ndarray | None]:
    """``(codes (n, code_size) uint8, inverse norms (n,) float32 or None)`` of a cosine index, by row."""
    n = cosine.ntotal
    codes: np.ndarray | None = None
    norms = None if cosine.parts and cosine.parts[0].inverse_norms is None else np.ones(n, np.float32)
    for part in cosine.parts:
        inner: Any = faiss.downcast_index(part.index)
        while isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        part_codes = faiss.vector_to_array(inner.codes).reshape(inner.ntotal, inner.code_size)
        if codes is None:
            codes = np.empty((n, inner.code_size), np.uint8)
        codes[part.rows] = part_codes
        if norms is not None and part.inverse_norms is not None:
            norms[part.rows] = part.inverse_norms
    return (codes if codes is not None else np.empty((0, 0), np.uint8)), norms


def fast_scan(
    codec: Codec,
    ids: np.ndarray,
    codes: np.ndarray,
    norms: np.ndarray | None,
    lists: np.ndarray | None = None,
    coarse: np.ndarray | None = None,
) -> FastScan | None:
    """The fast scan of a group (:mod:`semdb.index.fastscan`), or None: the codec's words are not
    4 bits, or the group is smaller than :data:`FAST_SCAN_MIN_ITEMS` (where the exact scan is as fast).
    Inverted lists are probed from :data:`LISTS_MIN_ITEMS` codes on, when every code has a list."""
    if len(ids) < FAST_SCAN_MIN_ITEMS:
        return None
    layout = four_bit_layout(codec)
    if layout is None:
        return None
    use_lists = lists is not None and coarse is not None and len(ids) >= LISTS_MIN_ITEMS
    return FastScan.build(layout, ids, codes, norms, lists if use_lists else None, coarse if use_lists else None)


def _digest(row: CodecRow) -> bytes:
    return hashlib.sha256(row.state).digest()


def _read_group(repository: Repository, row: CodecRow, count: int, location: str) -> StoredGroup:
    """Stream the codes of codec ``row`` (``count`` of them) from the store into numpy."""
    code_size = row.bits_per_image // 8
    ids = np.empty(count, np.int64)
    codes = np.empty((count, code_size), np.uint8)
    lists = np.empty(count, np.int64)
    filled = 0
    try:
        for chunk_ids, chunk_codes, chunk_lists in repository.coded_chunks(row.id, code_size):
            if filled + len(chunk_ids) > count:
                raise ValueError("more codes than counted")
            ids[filled : filled + len(chunk_ids)] = chunk_ids
            codes[filled : filled + len(chunk_ids)] = chunk_codes
            lists[filled : filled + len(chunk_ids)] = chunk_lists
            filled += len(chunk_ids)
    except ValueError:
        raise DatabaseDamagedError(
            f"{location} is damaged: a stored code does not have the length of codec {row.id}"
        ) from None
    if filled != count:
        raise DatabaseDamagedError(f"{location} changed while it was read: {filled} codes, {count} counted")
    coarse = lists_from_bytes(repository.codec_lists(row.id), row.dim)
    complete = coarse is not None and count > 0 and lists.min() >= 0 and lists.max() < len(coarse)
    # int32: list numbers are below MAX_LISTS, and the array stays resident with the group.
    return StoredGroup(row, ids, codes, lists.astype(np.int32) if complete else None, coarse if complete else None)


def _norms(codec: Codec, codes: np.ndarray) -> np.ndarray | None:
    """``1/‖x̂‖`` of ``codes`` as :meth:`Codec.cosine_index` computes them (None: unit vectors)."""
    if codec.scores_unit_vectors:
        return None
    chunks = [
        inverse_norms(codec.scored_vectors(codes[i : i + DECODE_CHUNK])) for i in range(0, len(codes), DECODE_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.empty(0, np.float32)


def _reconcile(codec: Codec, stored: StoredGroup, earlier: CodedGroup | None) -> CodedGroup:
    """The group of ``stored``'s exact rows, reusing from ``earlier`` whatever is provably the same."""
    ids, codes = stored.ids, stored.codes
    usable = (
        earlier is not None
        and earlier.codec_digest == _digest(stored.row)
        and earlier.index.ntotal == len(earlier.ids)
        and (earlier.fast is None or earlier.fast.ntotal == len(earlier.ids))
    )
    if not usable or earlier is None:
        all_norms = _norms(codec, codes)
        cosine = CosineIndex.build(codec.check_codes(codes), codec.search_index, all_norms)
        fast = fast_scan(codec, ids, codes, all_norms, stored.lists, stored.coarse)
        return CodedGroup(stored.row.id, cosine, ids, fast, stored.lists, _digest(stored.row))
    old_codes, old_norms = group_arrays(earlier.index)
    _, new_rows, old_rows = np.intersect1d(ids, earlier.ids, assume_unique=True, return_indices=True)
    same = np.all(codes[new_rows] == old_codes[old_rows], axis=1) if len(new_rows) else np.zeros(0, bool)
    if earlier.lists is not None and stored.lists is not None and len(new_rows):
        same &= earlier.lists[old_rows] == stored.lists[new_rows]
    kept_new, kept_old = new_rows[same], old_rows[same]
    fresh = np.ones(len(ids), bool)
    fresh[kept_new] = False
    norms: np.ndarray | None = None
    if old_norms is not None or not codec.scores_unit_vectors:
        norms = np.empty(len(ids), np.float32)
        if old_norms is not None:
            norms[kept_new] = old_norms[kept_old]
        computed = _norms(codec, codes[fresh])
        norms[fresh] = computed if computed is not None else 1.0
    cosine = CosineIndex.build(codec.check_codes(codes), codec.search_index, norms)
    gone = np.ones(len(earlier.ids), bool)
    gone[kept_old] = False
    changed = int(fresh.sum()) + int(gone.sum())
    fast = earlier.fast
    wants_lists = stored.lists is not None and len(ids) >= LISTS_MIN_ITEMS
    if fast is not None and changed <= CATCH_UP_FRACTION * len(ids) and (fast.coarse is not None) == wants_lists:
        fast.remove(earlier.ids[gone])
        fast.add(ids[fresh], codes[fresh], norms[fresh] if norms is not None else None, _rows(stored.lists, fresh))
    else:
        fast = fast_scan(codec, ids, codes, norms, stored.lists, stored.coarse)
    return CodedGroup(stored.row.id, cosine, ids, fast, stored.lists, _digest(stored.row))


def _rows(lists: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    return lists[mask] if lists is not None else None


def current_index(
    store: Store,
    previous: SearchIndex | None,
    cache_file: Path | None,
    load_codec: Callable[[CodecRow], Codec],
) -> SearchIndex:
    """The index of the store's current state: ``previous`` if still current, else the cache, else
    caught up from an earlier index (``previous``, else an earlier cache), else built (module docstring).

    Everything is read in one snapshot, so the index matches one committed state, never half a
    batch. Each group of codes is searched through the codec that made it (``load_codec``). A
    new index is written to ``cache_file`` when the folder allows (the cache is an optimisation:
    a read-only folder must not break search).
    """
    with store.reading() as repository:
        tag = repository.state_tag()
        if previous is not None and previous.tag == tag:
            return previous
        dim = repository.int_setting("dim", 0) or 0
        counts = repository.coded_counts()
        stored = {codec_id: repository.codec(codec_id) for codec_id in counts}
        codec_rows = {codec_id: row for codec_id, row in stored.items() if row is not None}
        if len(codec_rows) != len(counts):
            raise DatabaseDamagedError(f"{store.location} is damaged: codes refer to a codec that is not stored")
        staged_ids, staged = repository.staged_images(dim) if dim else (np.empty(0, np.int64), np.empty((0, 0)))
        expected = {codec_id: (count, codec_rows[codec_id].dim) for codec_id, count in counts.items()}
        groups = load_cache(cache_file, tag, expected) if cache_file is not None else None
        read: dict[int, StoredGroup] = {}
        if groups is None:
            for codec_id, row in codec_rows.items():
                read[codec_id] = _read_group(repository, row, counts[codec_id], store.location)
    if groups is not None:
        for group in groups:
            codec = load_codec(codec_rows[group.codec_id])
            codes, norms = group_arrays(group.index)
            coarse = None
            if group.lists is not None:
                with store.reading() as repository:
                    coarse = lists_from_bytes(repository.codec_lists(group.codec_id), codec.dim)
            if coarse is None or (group.lists is not None and len(group.lists) and group.lists.max() >= len(coarse)):
                group.lists = None
            group.fast = fast_scan(codec, group.ids, codes, norms, group.lists, coarse)
        return SearchIndex(tag, groups, flat_index(staged), staged_ids)
    earlier = _earlier_groups(previous, tag, cache_file, expected)
    groups = [_reconcile(load_codec(group.row), group, earlier.get(codec_id)) for codec_id, group in read.items()]
    index = SearchIndex(tag, groups, flat_index(staged), staged_ids)
    if cache_file is not None and store.path is not None:
        with contextlib.suppress(OSError):
            save_cache(index, cache_file, mode=store.path.stat().st_mode & 0o666)
    return index


def _earlier_groups(
    previous: SearchIndex | None, tag: str, cache_file: Path | None, expected: dict[int, tuple[int, int]]
) -> dict[int, CodedGroup]:
    """Groups of an earlier state of this database to reconcile with: in memory, else from the cache."""
    database_id = tag.split(":", 1)[0]
    if previous is not None and database_id and previous.tag.split(":", 1)[0] == database_id:
        return {group.codec_id: group for group in previous.coded}
    if cache_file is None:
        return {}
    cached = load_earlier_cache(cache_file, tag, expected)
    return {group.codec_id: group for group in cached or []}
