"""Building the search index from the store: caught up from the change log where it can be, built otherwise.

In the order :func:`current_index` tries them:

1. The open index, if the store's state tag is its own (SQLite: :meth:`Store.data_version` says no
   commit happened, and not even a transaction is begun — see :meth:`semdb.database.Database.index`).
2. The open index caught up from the change log (revision 0005): the log, written by triggers in the
   same transactions as the changes, names every image whose row changed since the seq the index
   covers; only those rows are read, kept rows keep their place and ``1/‖x̂‖``, and nothing of the
   other million is sorted or decoded. Allowed only when the log still holds the marker of the
   state the index was built from (trimmed logs and restored backups do not), and when fewer than
   :data:`CATCH_UP_FRACTION` of its rows changed.
3. The cache file, if its tag is the store's; else the cache file caught up from the log as in 2.
4. Everything streamed from the store in chunks straight into numpy
   (:meth:`~semdb.store.repository.Repository.coded_chunks`) and reconciled row by row with the
   earlier index in memory or in the cache: an image whose id and code are unchanged keeps its
   ``1/‖x̂‖``, every other row is (re)computed. The result holds exactly the store's
   ``(image id, code)`` pairs whatever the earlier index was.

So a stale cache can only save work, never change an answer. ``1/‖x̂‖`` comes from the codec's 4-bit
layout (a table sum) where it has one, else from decoding. The fast scan is appended to and masked
in place when few rows changed, rebuilt otherwise; the cache file is rewritten when the index was
built anew or has moved :data:`CACHE_REWRITE_MIN_CHANGES` logged changes past it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from semdb.codecs import Codec
from semdb.codecs.base import DECODE_CHUNK
from semdb.cosine import CosineIndex, inverse_norms
from semdb.errors import DatabaseDamagedError
from semdb.index.cache import load_cache, save_cache
from semdb.index.fastscan import MAX_IMAGE_ID, FastScan, four_bit_layout, item_layout
from semdb.index.lists import lists_from_bytes
from semdb.index.search_index import CodedGroup, SearchIndex, cosine_arrays, flat_index, rows_of
from semdb.store import CodecRow, Repository, Store

# Below this many codes a group keeps only the exact scan: it takes about as long as the fast scan's
# fixed costs there (docs/benchmarks.md, "Scale").
FAST_SCAN_MIN_ITEMS = 50_000
# From this many codes on, a group with inverted lists probes them rather than scanning every code:
# at 1 M they took 1.14 ms against 4.17 ms for the full fast scan, at 200k 1.94 ms against 1.58 ms
# (docs/benchmarks.md, "Scale"); the crossover between was not measured.
LISTS_MIN_ITEMS = 500_000
# A fast scan is caught up in place when at most this fraction of its rows changed; rebuilt beyond.
# Also the most changes (as a fraction of the index's rows) caught up from the change log.
CATCH_UP_FRACTION = 0.1
# The cache file is rewritten once the open index is this many logged changes ahead of it (or this
# fraction of its rows, if more); until then a later open loads it and catches up from the log.
CACHE_REWRITE_MIN_CHANGES = 20_000
CACHE_REWRITE_FRACTION = 0.02


@dataclass
class StoredGroup:
    """What the store holds for one codec: ``ids`` ``(n,)`` int64 sorted, ``codes`` ``(n, code_size)``
    uint8, ``lists`` ``(n,)`` int16 or None, ``coarse`` ``(lists, d)`` float32 or None, the codec row."""

    row: CodecRow
    ids: np.ndarray
    codes: np.ndarray
    lists: np.ndarray | None
    coarse: np.ndarray | None


def _catches_up_in_place(fast: FastScan | None, rows: int, changed: int, wants_lists: bool, added: np.ndarray) -> bool:
    """Whether ``fast`` is appended to and masked in place for a change of ``changed`` rows leaving
    ``rows``, ``added`` ``(a,)`` the image ids added: few rows changed, the group still takes a fast
    scan, of the same kind (lists or not), and the new ids fit its labels."""
    return (
        fast is not None
        and rows >= FAST_SCAN_MIN_ITEMS
        and changed <= CATCH_UP_FRACTION * rows
        and fast.has_lists == wants_lists
        and (not len(added) or int(added.max()) <= MAX_IMAGE_ID)
    )


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
    if len(ids) < FAST_SCAN_MIN_ITEMS or int(ids.max()) > MAX_IMAGE_ID:  # labels hold 31-bit ids
        return None
    layout = four_bit_layout(codec)
    if layout is None:
        return None
    use_lists = lists is not None and coarse is not None and len(ids) >= LISTS_MIN_ITEMS
    return FastScan.build(
        layout,
        ids,
        codes,
        norms,
        lists if use_lists else None,
        coarse if use_lists else None,
        scaled=not codec.scores_unit_vectors,
        items=item_layout(codec),
    )


def _item_index(codec: Codec) -> Callable[[np.ndarray], CosineIndex | None] | None:
    """What builds the exact scan of image queries from a group's codes (the codec's item path), or
    None where image queries search what text queries do."""
    return codec.item_cosine_index if codec.has_item_path else None


def _coded_group(
    codec: Codec,
    codec_id: int,
    digest: bytes,
    cosine: CosineIndex | None,
    ids: np.ndarray | None,
    fast: FastScan | None,
    lists: np.ndarray | None,
) -> CodedGroup:
    """A :class:`CodedGroup` of ``codec``, with what builds its exact scans later taken from the codec."""
    return CodedGroup(
        codec_id, cosine, ids, fast, lists, digest, codec.search_index, make_item_index=_item_index(codec)
    )


def _digest(row: CodecRow) -> bytes:
    return hashlib.sha256(row.state).digest()


def _read_group(repository: Repository, row: CodecRow, location: str) -> StoredGroup | None:
    """Stream the codes of codec ``row`` from the store into numpy (None: it coded no indexed image)."""
    code_size = row.bits_per_image // 8
    id_parts: list[np.ndarray] = []
    code_parts: list[np.ndarray] = []
    list_parts: list[np.ndarray] = []
    try:
        for chunk_ids, chunk_codes, chunk_lists in repository.coded_chunks(row.id, code_size):
            id_parts.append(chunk_ids)
            code_parts.append(chunk_codes)
            list_parts.append(chunk_lists)
    except ValueError:
        raise DatabaseDamagedError(
            f"{location} is damaged: a stored code or its list number is not what codec {row.id} makes"
        ) from None
    if not id_parts:
        return None
    ids, codes, lists = np.concatenate(id_parts), np.concatenate(code_parts), np.concatenate(list_parts)
    del id_parts, code_parts, list_parts
    coarse = lists_from_bytes(repository.codec_lists(row.id), row.dim)
    complete = coarse is not None and lists.min() >= 0 and lists.max() < len(coarse)
    # int16: list numbers are below MAX_LISTS (4,096), and the array stays resident with the group.
    return StoredGroup(row, ids, codes, lists.astype(np.int16) if complete else None, coarse if complete else None)


def _norms(codec: Codec, codes: np.ndarray) -> np.ndarray | None:
    """``1/‖x̂‖`` of ``codes`` as :meth:`Codec.cosine_index` computes them (None: unit vectors); from
    the codec's 4-bit layout where it has one (no decoding: the costly part of a full build)."""
    if codec.scores_unit_vectors:
        return None
    layout = four_bit_layout(codec)
    if layout is not None:
        return layout.inverse_norms(codes)
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
        and (earlier.index is None or earlier.index.ntotal == earlier.count)
    )
    if not usable or earlier is None:
        # 1/‖x̂‖ computed once, by whichever scan keeps it: a fast scan computes what it holds (none
        # for an orthonormal layout), the exact scan is given them.
        fast = fast_scan(codec, ids, codes, None, stored.lists, stored.coarse)
        return _group(
            codec, stored.row, ids, codes, None if fast is not None else _norms(codec, codes), fast, stored.lists
        )
    old_ids, old_codes, old_norms, old_lists = earlier.rows()
    _, new_rows, old_rows = np.intersect1d(ids, old_ids, assume_unique=True, return_indices=True)
    same = np.all(codes[new_rows] == old_codes[old_rows], axis=1) if len(new_rows) else np.zeros(0, bool)
    if old_lists is not None and stored.lists is not None and len(new_rows):
        same &= old_lists[old_rows] == stored.lists[new_rows]
    del old_codes, old_lists
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
    gone = np.ones(len(old_ids), bool)
    gone[kept_old] = False
    changed = int(fresh.sum()) + int(gone.sum())
    fast = earlier.fast
    wants_lists = stored.lists is not None and len(ids) >= LISTS_MIN_ITEMS
    if fast is not None and _catches_up_in_place(fast, len(ids), changed, wants_lists, ids[fresh]):
        fast.remove(old_ids[gone])
        fast.add(ids[fresh], codes[fresh], norms[fresh] if norms is not None else None, _rows(stored.lists, fresh))
    else:
        fast = fast_scan(codec, ids, codes, norms, stored.lists, stored.coarse)
    return _group(codec, stored.row, ids, codes, norms, fast, stored.lists)


def _group(
    codec: Codec,
    row: CodecRow,
    ids: np.ndarray,
    codes: np.ndarray,
    norms: np.ndarray | None,
    fast: FastScan | None,
    lists: np.ndarray | None,
) -> CodedGroup:
    """A group of ``codes`` ``(n, code_size)`` of image ``ids`` ``(n,)``: the exact scan built only
    when there is no fast scan (which holds what builds it later, :meth:`CodedGroup.exact_index`)."""
    cosine = None if fast is not None else CosineIndex.build(codec.check_codes(codes), codec.search_index, norms)
    return _coded_group(codec, row.id, _digest(row), cosine, ids, fast, lists)


def _rows(lists: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    return lists[mask] if lists is not None else None


def _apply_changes(
    codec: Codec,
    group: CodedGroup,
    affected: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    coarse: Callable[[], np.ndarray | None],
) -> CodedGroup:
    """``group`` with the images ``affected`` (sorted ids) removed and ``rows`` ``(ids (a,), codes
    (a, code_size), lists (a,) -1 for none)`` — those of them coded by this codec now — put back.

    Nothing of a million rows is sorted or decoded: kept rows keep their place and ``1/‖x̂‖``, the
    added ones are decoded and inserted at their place by id (both sides are sorted). The fast scan
    is caught up in place when few rows changed and its kind (lists or not) still fits; otherwise
    the exact scan is changed the same way and the fast scan rebuilt from it."""
    add_ids, add_codes, add_lists = rows
    add_codes = codec.check_codes(add_codes)
    add_norms = _norms(codec, add_codes)
    if group.fast is None and group.index is not None and not group.index.parts:  # a new group
        lists = add_lists.astype(np.int16) if len(add_lists) and (add_lists >= 0).all() else None
        fast = fast_scan(codec, add_ids, add_codes, add_norms, lists, coarse() if lists is not None else None)
        cosine = None if fast is not None else CosineIndex.build(add_codes, codec.search_index, add_norms)
        return _coded_group(codec, group.codec_id, group.codec_digest, cosine, add_ids, fast, lists)
    ids_before = group.ids
    gone = rows_of(ids_before, affected)
    keep = np.ones(len(ids_before), bool)
    keep[gone] = False
    kept_ids = ids_before[keep]
    at = np.searchsorted(kept_ids, add_ids)
    lists_ok = group.has_lists and bool((add_lists >= 0).all())
    fast = group.fast
    rows_after = len(kept_ids) + len(add_ids)
    wants_lists = lists_ok and rows_after >= LISTS_MIN_ITEMS
    if fast is not None and _catches_up_in_place(fast, rows_after, len(gone) + len(add_ids), wants_lists, add_ids):
        # Lists by row are held only where the fast scan does not hold them (it scans without lists).
        row_lists = None
        if group.row_lists is not None and lists_ok:
            row_lists = np.insert(group.row_lists[keep], at, add_lists.astype(np.int16))
        fast.remove(ids_before[gone])
        fast.add(add_ids, add_codes, add_norms, add_lists if lists_ok else None)
        # The exact scan, if one was built for an exact search, is dropped: rebuilt from the fast
        # scan when next asked for, rather than changed on every catch-up.
        return _coded_group(codec, group.codec_id, group.codec_digest, None, None, fast, row_lists)
    lists = None
    before_lists = group.lists if lists_ok else None
    if before_lists is not None:
        lists = np.insert(before_lists[keep], at, add_lists.astype(np.int16))
    ids = np.insert(kept_ids, at, add_ids)
    # Row of each kept item afterwards: its rank among the kept, plus the added ones inserted before it.
    old_to_new = np.full(len(ids_before), -1, np.int64)
    ranks = np.arange(len(kept_ids))
    old_to_new[keep] = ranks + np.searchsorted(at, ranks, side="right")
    added_rows = at + np.arange(len(add_ids))
    cosine = group.exact_index().changed(old_to_new, added_rows, add_codes, add_norms)
    codes, norms = cosine_arrays(cosine)
    fast = fast_scan(codec, ids, codes, norms, lists, coarse() if lists is not None else None)
    kept = None if fast is not None else cosine
    return _coded_group(codec, group.codec_id, group.codec_digest, kept, ids, fast, lists)


def _caught_up(
    repository: Repository, earlier: SearchIndex, load_codec: Callable[[CodecRow], Codec]
) -> list[CodedGroup] | None:
    """``earlier``'s groups brought to the snapshot of ``repository`` from the change log alone (the
    rows of the images changed since ``earlier.changes_seq``), or None where the log cannot vouch
    for it: ``earlier`` was built from a state the log no longer holds (trimmed, or a restored
    backup never had it), or more changed than :data:`CATCH_UP_FRACTION` of its rows, or a
    codec's state differs from the one its group was built with."""
    token = earlier.tag.rsplit(":", 1)[-1]
    if earlier.changes_seq < 0 or not token or not repository.state_logged(token):
        return None
    rows_before = sum(group.count for group in earlier.coded)
    changes = repository.changes_after(earlier.changes_seq, at_most=max(1_000, int(CATCH_UP_FRACTION * rows_before)))
    if changes is None:
        return None
    image_ids, content_ids = changes
    affected = np.union1d(image_ids, repository.images_of_contents(content_ids.tolist()))
    coded = repository.coded_rows(affected.tolist())
    by_codec: dict[int, list[tuple[int, int, bytes, int]]] = {}
    for item in coded:
        by_codec.setdefault(item[1], []).append(item)
    groups = {group.codec_id: group for group in earlier.coded}
    result: list[CodedGroup] = []
    for codec_id in sorted(set(groups) | set(by_codec)):
        row = _stored_codec(repository, codec_id)
        group = groups.get(codec_id)
        if group is None:
            # No indexed image had a code of this codec at the earlier state, so each one now was logged.
            group = CodedGroup(codec_id, CosineIndex([]), np.empty(0, np.int64), None, None, _digest(row))
        elif group.codec_digest != _digest(row):
            return None
        rows = _codec_rows(by_codec.get(codec_id, []), row)
        group = _apply_changes(load_codec(row), group, affected, rows, partial(_coarse, repository, row))
        if group.count:
            result.append(group)
    return result


def _coarse(repository: Repository, row: CodecRow) -> np.ndarray | None:
    """The coarse centroids stored with codec ``row`` (None: none)."""
    return lists_from_bytes(repository.codec_lists(row.id), row.dim)


def _codec_rows(rows: list[tuple[int, int, bytes, int]], codec: CodecRow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image id, codec id, code, list)`` rows (by id) → ``(ids (a,), codes (a, code_size), lists (a,))``."""
    code_size = codec.bits_per_image // 8
    if any(len(code) != code_size for _, _, code, _ in rows):
        raise DatabaseDamagedError(
            f"the database is damaged: a stored code does not have the length of codec {codec.id}"
        )
    ids = np.array([image_id for image_id, _, _, _ in rows], dtype=np.int64)
    codes = np.frombuffer(b"".join(code for _, _, code, _ in rows), dtype=np.uint8).reshape(len(rows), code_size)
    lists = np.array([list_no for _, _, _, list_no in rows], dtype=np.int64)
    return ids, codes, lists


def _same_database(tag: str, other: str) -> bool:
    database_id = tag.split(":", 1)[0]
    return bool(database_id) and other.split(":", 1)[0] == database_id


def _with_fast_scans(repository: Repository, groups: list[CodedGroup], load_codec: Callable[[CodecRow], Codec]) -> bool:
    """Build the fast scans of cached groups (the cache holds an exact scan or the codes by row, not
    the fast scan); False when a group's codes do not fit its codec (an altered cache: not used)."""
    for group in groups:
        codec = load_codec(_stored_codec(repository, group.codec_id))
        codes, norms = group.arrays()
        if codes.shape[1:] != (codec.code_size,) and len(codes):
            return False
        coarse = None
        lists = group.row_lists
        if lists is not None:
            coarse = lists_from_bytes(repository.codec_lists(group.codec_id), codec.dim)
        if coarse is None or (lists is not None and len(lists) and lists.max() >= len(coarse)):
            group.row_lists = lists = None
        group.fast = fast_scan(codec, group.ids, codes, norms, lists, coarse)
        group.make_index = codec.search_index
        group.make_item_index = _item_index(codec)
        if group.fast is None and group.index is None:  # saved with a fast scan that no longer applies
            # (norms None here may be ones that fast scan computed from the codes: computed again)
            group.index = CosineIndex.build(
                codes, codec.search_index, norms if norms is not None else _norms(codec, codes)
            )
        group.stored_arrays = None
        group.drop_exact_index()
        group.hold_in_fast()
    return True


def _stored_codec(repository: Repository, codec_id: int, location: str = "the database") -> CodecRow:
    """The stored codec ``codec_id``; a codec that codes refer to but is not stored is damage."""
    row = repository.codec(codec_id)
    if row is None:
        raise DatabaseDamagedError(f"{location} is damaged: codes refer to a codec that is not stored")
    return row


def current_index(
    store: Store,
    previous: SearchIndex | None,
    cache_file: Path | None,
    load_codec: Callable[[CodecRow], Codec],
) -> SearchIndex:
    """The index of the store's current state (module docstring): ``previous`` if still current;
    else ``previous`` caught up from the change log; else the cache of this state; else an earlier
    cache caught up from the log; else everything read from the store, reconciled with whatever
    earlier index there is.

    Everything is read in one snapshot, so the index matches one committed state, never half a
    batch. Each group of codes is searched through the codec that made it (``load_codec``). The
    cache file is rewritten when the index was built or is far ahead of the file (a folder that
    cannot be written is no error: the cache is an optimisation).
    """
    with store.reading() as repository:
        tag = repository.state_tag()
        if previous is not None and previous.tag == tag:
            return previous
        seq = repository.last_change()
        dim = repository.int_setting("dim", 0) or 0
        staged_ids, staged = repository.staged_images(dim) if dim else (np.empty(0, np.int64), np.empty((0, 0)))
        if previous is not None and _same_database(tag, previous.tag):
            caught = _caught_up(repository, previous, load_codec)
            if caught is not None:
                index = SearchIndex(tag, caught, flat_index(staged), staged_ids, seq, previous.cache_seq)
                return _saved(index, store, cache_file)
        # A cache of this database, of this state or an earlier one: sized by the largest image id
        # (not a count of the codes, which reads them all), its codecs among those stored.
        dims = repository.codec_dims()
        bound = repository.largest_image_id()
        loose = {codec_id: (bound, dim) for codec_id, dim in dims.items()}
        earlier = load_cache(cache_file, tag, loose) if cache_file is not None and previous is None else None
        if earlier is not None and not _with_fast_scans(repository, earlier.groups, load_codec):
            earlier = None
        if earlier is not None:
            if earlier.tag == tag:
                return SearchIndex(tag, earlier.groups, flat_index(staged), staged_ids, seq, earlier.changes_seq)
            earlier_index = SearchIndex(earlier.tag, earlier.groups, None, np.empty(0, np.int64), earlier.changes_seq)
            caught = _caught_up(repository, earlier_index, load_codec)
            if caught is not None:
                index = SearchIndex(tag, caught, flat_index(staged), staged_ids, seq, earlier.changes_seq)
                return _saved(index, store, cache_file)
        read: dict[int, StoredGroup] = {}
        for codec_id in repository.codecs_of_codes():
            stored = _read_group(repository, _stored_codec(repository, codec_id, store.location), store.location)
            if stored is not None:
                read[codec_id] = stored
    reference = previous.coded if previous is not None and _same_database(tag, previous.tag) else []
    if earlier is not None:
        reference = earlier.groups
    by_codec = {group.codec_id: group for group in reference}
    groups = [_reconcile(load_codec(group.row), group, by_codec.get(codec_id)) for codec_id, group in read.items()]
    return _saved(SearchIndex(tag, groups, flat_index(staged), staged_ids, seq), store, cache_file, force=True)


def _saved(index: SearchIndex, store: Store, cache_file: Path | None, *, force: bool = False) -> SearchIndex:
    """``index``, written to ``cache_file`` if it was built anew (``force``) or is more than
    :data:`CACHE_REWRITE_FRACTION` of its rows (in logged changes) ahead of the file: a later open
    loads the file and catches up from the change log, so a small change need not rewrite it all."""
    behind = index.changes_seq - index.cache_seq if index.cache_seq >= 0 else None
    allowed = max(CACHE_REWRITE_MIN_CHANGES, CACHE_REWRITE_FRACTION * index.size)
    if not force and behind is not None and behind <= allowed:
        return index
    if cache_file is None:
        return index
    with contextlib.suppress(OSError):
        if store.path is not None:
            mode = store.path.stat().st_mode & 0o666  # whoever may read the database may read its cache
        else:
            # A server database's cache lives on this client, owner-only (semdb.store.client_cache).
            mode = 0o600
            cache_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_cache(index, cache_file, mode=mode)
        index.cache_seq = index.changes_seq
    return index
