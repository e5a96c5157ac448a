"""The index cache file ``<database>.index``: written atomically, trusted only when everything matches.

The file is an uncompressed ``.npz`` archive. It is read only if it is this database's (same
database id), its sha256 checksum matches, and every array has a shape the store allows; it is
used as it is only if its tag equals the store's (database id, generation and random change token
— see :meth:`~semdb.store.repository.Repository.record_change`), and otherwise only caught up from
the change log from a state the log vouches for (:mod:`semdb.index.build`). Anything else —
missing, truncated, altered, another database's, built before a restore — makes the caller rebuild
it. It is read without numpy's pickle support and without trusting the array headers for
allocation sizes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from semdb.cosine import CosineIndex, CosinePart
from semdb.index.lists import MAX_LISTS
from semdb.index.search_index import CodedGroup, SearchIndex

# 3: inverted list numbers and the codec state's digest per group; 4: the change-log seq it covers (issue 10)
FORMAT = 5
# A cache larger than this many bytes per expected row (plus a fixed allowance for codebooks and
# transforms) is not even opened: nothing in a cache file may make semdb allocate without bound.
MAX_BYTES_PER_ROW = 256
FIXED_ALLOWANCE_BYTES = 256 * 1024 * 1024


def cache_path(database_path: Path) -> Path:
    """Where the index cache of a database file lives."""
    return database_path.with_name(database_path.name + ".index")


def _checksum(arrays: dict[str, np.ndarray]) -> np.ndarray:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def save_cache(index: SearchIndex, path: Path, mode: int = 0o644) -> None:
    """Write the coded groups of ``index`` to ``path`` atomically (temp file + rename).

    ``mode``: the file's permissions; callers pass the database file's, so that whoever may read
    the database may read its cache (a temp file would otherwise stay owner-only, 0600).
    """
    if not index.coded:
        path.unlink(missing_ok=True)
        return
    arrays: dict[str, np.ndarray] = {
        "format": np.array([FORMAT], dtype=np.int64),
        "tag": np.frombuffer(index.tag.encode(), dtype=np.uint8),
        "codec_ids": np.array([group.codec_id for group in index.coded], dtype=np.int64),
        "changes_seq": np.array([index.changes_seq], dtype=np.int64),
    }
    for number, group in enumerate(index.coded):
        prefix = f"g{number}_"
        if group.index is None:
            # A fast scan without its exact scan: the codes and 1/‖x̂‖ by row, what a reopen builds
            # the fast scan from (an exact scan built just to be written would cost a full build's tenth).
            ids, codes, norms, lists = group.rows(held_norms_only=True)
            arrays[prefix + "codes"] = codes
            # An empty array stands for None: unit-norm reconstructions, or norms the fast scan computes.
            arrays[prefix + "inverse_norms"] = (norms if norms is not None else np.empty(0)).astype(np.float32)
        else:
            ids, lists = group.ids, group.lists
            parts = group.index.parts
            arrays[prefix + "part_sizes"] = np.array([len(part.rows) for part in parts], dtype=np.int64)
            arrays[prefix + "part_rows"] = np.concatenate([part.rows for part in parts]).astype(np.int64)
            arrays[prefix + "inverse_norms"] = np.concatenate(
                [part.inverse_norms if part.inverse_norms is not None else np.empty(0, np.float32) for part in parts]
            ).astype(np.float32)
            for part_number, part in enumerate(parts):
                arrays[f"{prefix}index_{part_number}"] = faiss.serialize_index(part.index)
        # An empty array stands for None: no inverted lists.
        arrays[prefix + "ids"] = ids.astype(np.int64)
        arrays[prefix + "lists"] = (lists if lists is not None else np.empty(0)).astype(np.int32)
        arrays[prefix + "codec_digest"] = np.frombuffer(group.codec_digest, dtype=np.uint8)
    arrays["checksum"] = _checksum(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_npz(path: Path, max_bytes: int) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed npz at ``path``, each checked against its header; None if anything is off."""
    if path.stat().st_size > max_bytes:
        return None
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > max_bytes:
                return None
            data = archive.read(info)  # checks the member's CRC
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                return None
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if fortran or dtype.hasobject or count * dtype.itemsize != len(data) - stream.tell():
                return None
            name = info.filename.removesuffix(".npy")
            arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)
    return arrays


@dataclass
class CachedIndex:
    """What a cache file holds: the state ``tag`` and change-log seq ``changes_seq`` it was built
    from (-1: unknown), and its coded groups (fast scans not built: they are not stored)."""

    tag: str
    changes_seq: int
    groups: list[CodedGroup]


def load_cache(path: Path, tag: str, expected: dict[int, tuple[int, int]]) -> CachedIndex | None:
    """The cache of any state of the same database (same database id), intact and well-formed, or
    None (missing, unreadable, foreign, altered, mis-shaped: not an error, the caller rebuilds).
    :func:`semdb.index.build.current_index` uses it as it is if its tag is the store's, else catches
    it up from the change log or reconciles it row by row with the store.

    ``expected``: codec id → ``(rows, dim)``: a bound on the rows (it bounds the file's size) and
    each stored codec's dimension.
    """
    database_id = tag.split(":", 1)[0]
    return _load(path, expected, lambda stored: bool(database_id) and stored.split(":", 1)[0] == database_id)


def _load(path: Path, expected: dict[int, tuple[int, int]], tag_ok: Callable[[str], bool]) -> CachedIndex | None:
    rows_expected = sum(rows for rows, _ in expected.values())
    try:
        arrays = _read_npz(path, rows_expected * MAX_BYTES_PER_ROW + FIXED_ALLOWANCE_BYTES)
    except Exception:  # a cache is disposable: any failure to read it means "rebuild"
        return None
    if arrays is None or "checksum" not in arrays:
        return None
    stored_checksum = arrays.pop("checksum")
    try:
        if not np.array_equal(stored_checksum, _checksum(arrays)):
            return None
        stored_tag = bytes(arrays["tag"]).decode()
        if arrays["format"].tolist() != [FORMAT] or not tag_ok(stored_tag):
            return None
        codec_ids = [int(codec_id) for codec_id in arrays["codec_ids"]]
        if len(set(codec_ids)) != len(codec_ids) or not set(codec_ids) <= set(expected):
            return None
        seq = arrays["changes_seq"].tolist()
        if len(seq) != 1 or seq[0] < -1:
            return None
        groups = [
            _group(arrays, number, codec_id, expected[codec_id][0], expected[codec_id][1])
            for number, codec_id in enumerate(codec_ids)
        ]
        return CachedIndex(stored_tag, int(seq[0]), groups)
    except (KeyError, ValueError, UnicodeDecodeError, RuntimeError):
        return None


def _group(arrays: dict[str, np.ndarray], number: int, codec_id: int, most_rows: int, dim: int) -> CodedGroup:
    """One coded group from the cache's arrays; ValueError when its shapes disagree with each other,
    with the codec's dimension ``dim``, or hold more than ``most_rows`` rows."""
    prefix = f"g{number}_"
    ids = arrays[prefix + "ids"].astype(np.int64)
    rows = len(ids)
    if rows > most_rows:
        raise ValueError("cache holds more rows than the store")
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError("cache ids are not sorted")
    inverse_norms = arrays[prefix + "inverse_norms"].astype(np.float32)
    if ids.shape != (rows,) or len(inverse_norms) not in (0, rows):
        raise ValueError("cache shape differs from the store")
    index: CosineIndex | None = None
    codes: np.ndarray | None = None
    if prefix + "codes" in arrays:
        codes = arrays[prefix + "codes"]
        if codes.ndim != 2 or len(codes) != rows or codes.dtype != np.uint8:
            raise ValueError("cache codes differ from the store")
    else:
        index = _exact_scan(arrays, prefix, rows, dim, inverse_norms)
    lists = arrays[prefix + "lists"]
    if len(lists) not in (0, rows) or (len(lists) and (lists.min() < 0 or lists.max() >= MAX_LISTS)):
        raise ValueError("cache lists differ from the store")
    lists = lists.astype(np.int16)
    digest = bytes(arrays[prefix + "codec_digest"])
    stored = None if codes is None else (codes, inverse_norms if len(inverse_norms) else None)
    return CodedGroup(
        codec_id, index, ids, row_lists=lists if len(lists) else None, codec_digest=digest, stored_arrays=stored
    )


def _exact_scan(
    arrays: dict[str, np.ndarray], prefix: str, rows: int, dim: int, inverse_norms: np.ndarray
) -> CosineIndex:
    """The exact scan a group was saved with; ValueError when its parts disagree with its rows."""
    sizes = arrays[prefix + "part_sizes"].astype(np.int64)
    part_rows = arrays[prefix + "part_rows"].astype(np.int64)
    if sizes.ndim != 1 or (sizes < 0).any() or int(sizes.sum()) != rows or part_rows.shape != (rows,):
        raise ValueError("cache shape differs from the store")
    if not np.array_equal(np.sort(part_rows), np.arange(rows)):
        raise ValueError("cache rows are not a permutation")
    starts = np.cumsum(sizes)[:-1]
    indexes = [faiss.deserialize_index(arrays[f"{prefix}index_{part}"]) for part in range(len(sizes))]
    if any(index.ntotal != size or index.d != dim for index, size in zip(indexes, sizes, strict=True)):
        raise ValueError("cache index shape differs from the store")
    inverse = np.split(inverse_norms, starts) if len(inverse_norms) else [None] * len(sizes)
    return CosineIndex([CosinePart(*part) for part in zip(indexes, np.split(part_rows, starts), inverse, strict=True)])
