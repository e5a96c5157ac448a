"""Benchmark: where the exact re-rank reads its candidates' codes (issue 10's memory goal).

:class:`semdb.index.fastscan.FastScan` keeps a by-row copy of the codes (``M/2`` bytes per item) for
the exact re-rank, beside FAISS's own copy in fast-scan's blocked layout. Dropping the copy would
meet more of the ``code + 10 bytes`` memory goal, but FAISS's IVF fast scan returns ids only
(``store_pairs`` is not supported), so each candidate's code must be found in its list's blocks:
here by ``(list, offset)`` held per row and one numpy gather per probed list. Side by side in one
run, on the candidates of real searches (random codes, ``--lists`` lists, nprobe 32, R = 128):

* ``by-row copy``   — what semdb does: ``codes[rows]``, then the words;
* ``from blocks``   — the words read out of FAISS's blocked lists (checked equal to the copy's).

    python benchmarks/rerank_source.py            # 1M codes; ~1 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, percentile_ms, print_table

from semdb.index.fastscan import DEFAULT_NPROBE, DEFAULT_RERANK, FastScan, FourBitLayout, _block_lists

BLOCK = 32  # codes per fast-scan block (FAISS's bbs)


def nibble_map(scan: FastScan) -> tuple[np.ndarray, np.ndarray]:
    """Where word ``m`` of the ``j``-th code of a block lies: ``(byte (32, M), shift (32, M))``,
    found by packing one-word codes with FAISS's own packer."""
    words = scan.layout.words
    packer: Any = scan.index.get_CodePacker()
    byte = np.zeros((BLOCK, words), np.int64)
    shift = np.zeros((BLOCK, words), np.uint8)
    for j in range(BLOCK):
        for m in range(words):
            code = np.zeros(words // 2, np.uint8)
            code[m // 2] = 1 << (4 * (m % 2))
            block = np.zeros((1, packer.block_size), np.uint8)
            packer.pack_1(code, j, block)
            (where,) = np.flatnonzero(block[0])
            byte[j, m], shift[j, m] = where, 4 if block[0, where] == 0x10 else 0
    return byte, shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=32, help="4-bit words per code (32: 128 bits)")
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    print(machine())
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    dim = 8 * args.words
    layout = FourBitLayout(None, rng.standard_normal((args.words, 16, dim // args.words)).astype(np.float32), False)
    codes = rng.integers(0, 256, (args.n, args.words // 2), dtype=np.uint8)
    coarse = rng.standard_normal((args.lists, dim)).astype(np.float32)
    lists = rng.integers(0, args.lists, args.n)
    ids = np.arange(args.n, dtype=np.int64)
    scan = FastScan.build(layout, ids, codes, None, lists, coarse)
    blocks: Any = _block_lists(scan.index)
    block_bytes = int(blocks.block_size)
    # (list, offset) of every row, and a view of each list's blocked codes: what "from blocks" holds.
    offsets = np.empty(args.n, np.int64)
    views = []
    for list_no in range(args.lists):
        size = int(blocks.list_size(list_no))
        offsets[faiss.rev_swig_ptr(blocks.get_ids(list_no), size)] = np.arange(size)
        views.append(faiss.rev_swig_ptr(blocks.get_codes(list_no), -(-size // BLOCK) * block_bytes))
    byte, shift = nibble_map(scan)

    def from_blocks(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), args.words), np.uint8)
        order = np.argsort(lists[rows], kind="stable")
        by_list = lists[rows][order]
        cuts = np.flatnonzero(np.diff(by_list)) + 1
        for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)], strict=True):
            taken = order[start:end]
            offset = offsets[rows[taken]]
            at = (offset // BLOCK * block_bytes)[:, None] + byte[offset % BLOCK]
            out[taken] = (views[int(by_list[start])][at] >> shift[offset % BLOCK]) & 0x0F
        return out

    def by_row(rows: np.ndarray) -> np.ndarray:
        return layout.words_of(codes[rows])

    queries = rng.standard_normal((args.queries, dim)).astype(np.float32)
    candidates = []
    for query in queries:
        # The candidates a search would re-rank: R ids from the nprobe lists nearest the query.
        probed = np.argsort(-(coarse @ query))[:DEFAULT_NPROBE]
        pool = np.flatnonzero(np.isin(lists, probed))
        candidates.append(rng.choice(pool, DEFAULT_RERANK, replace=False))
    assert all(np.array_equal(from_blocks(rows), by_row(rows)) for rows in candidates[:20])
    rows_out = []
    for label, gather in (("by-row copy", by_row), ("from blocks", from_blocks)):
        cpus = []
        for rows in candidates:
            started = time.thread_time()
            gather(rows)
            cpus.append(time.thread_time() - started)
        # The copy, or an int32 offset per row (the group holds every row's list number anyway).
        extra = args.words // 2 if label == "by-row copy" else 4
        rows_out.append([label, percentile_ms(cpus, 50), percentile_ms(cpus, 99), extra])
    print_table(
        f"{args.n:,} codes of {args.words // 2} B, {args.lists} lists: reading R = {DEFAULT_RERANK} candidates' words",
        ["source", "p50 CPU ms", "p99 CPU ms", "bytes/item beside FAISS's"],
        rows_out,
    )


if __name__ == "__main__":
    main()
