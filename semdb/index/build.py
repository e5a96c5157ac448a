"""Building the search index from the store, through the cache when it can be trusted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from semdb.codecs import Codec
from semdb.cosine import CosineIndex
from semdb.errors import DatabaseDamagedError
from semdb.index.cache import load_cache, save_cache
from semdb.index.fastscan import FastScan, four_bit_layout
from semdb.index.search_index import CodedGroup, SearchIndex, flat_index
from semdb.store import CodecRow, Store

# Below this many codes a group keeps only the exact scan: it takes about as long as the fast scan's
# fixed costs there (docs/benchmarks.md, "Scale").
FAST_SCAN_MIN_ITEMS = 50_000


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


def fast_scan(codec: Codec, ids: np.ndarray, cosine: CosineIndex, codes: np.ndarray | None = None) -> FastScan | None:
    """The fast scan of a group (:mod:`semdb.index.fastscan`), or None: the codec's words are not
    4 bits, or the group is smaller than :data:`FAST_SCAN_MIN_ITEMS` (where the exact scan is as fast)."""
    if len(ids) < FAST_SCAN_MIN_ITEMS:
        return None
    layout = four_bit_layout(codec)
    if layout is None:
        return None
    stored, norms = group_arrays(cosine)
    return FastScan.build(layout, ids, codes if codes is not None else stored, norms)


def current_index(
    store: Store,
    previous: SearchIndex | None,
    cache_file: Path | None,
    load_codec: Callable[[CodecRow], Codec],
) -> SearchIndex:
    """The index of the store's current state: ``previous`` if still current, else the cache, else rebuilt.

    Everything is read in one snapshot, so the index matches one committed state, never half a
    batch. Each group of codes is searched through the codec that made it (``load_codec``). A
    rebuilt index is written to ``cache_file`` when the folder allows (the cache is an optimisation:
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
        raw: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if groups is None:
            for codec_id, row in codec_rows.items():
                try:
                    raw[codec_id] = repository.coded_images(codec_id, row.bits_per_image // 8)
                except ValueError:
                    raise DatabaseDamagedError(
                        f"{store.location} is damaged: a stored code does not have the length of codec {codec_id}"
                    ) from None
    if groups is not None:
        for group in groups:
            group.fast = fast_scan(load_codec(codec_rows[group.codec_id]), group.ids, group.index)
        return SearchIndex(tag, groups, flat_index(staged), staged_ids)
    groups = []
    for codec_id, (ids, codes) in raw.items():
        codec = load_codec(codec_rows[codec_id])
        cosine = codec.cosine_index(codes)
        groups.append(CodedGroup(codec_id, cosine, ids, fast_scan(codec, ids, cosine, codes)))
    index = SearchIndex(tag, groups, flat_index(staged), staged_ids)
    if cache_file is not None and store.path is not None:
        with contextlib.suppress(OSError):
            save_cache(index, cache_file, mode=store.path.stat().st_mode & 0o666)
    return index
