"""Benchmark: the fast path's recall on real embeddings (issue 10) — CuPL sentences, MiniLM, text queries.

``scale.py`` measures the fast scan on synthetic clustered data, where inverted lists and clusters
line up; this measures it on the real embeddings the codec benchmarks use (``codecs_cupl.py``: the
CuPL ImageNet descriptions embedded by all-MiniLM-L6-v2, 384-d). Every sentence (~150k) is coded by
a codec trained as ingest would, on the training classes' sentences; the queries are the prompts of
every class ("a photo of a …"), text against items as in semdb. Inverted lists are trained on the
same sentences (:func:`semdb.index.lists.list_count` of them, the number ingest would choose).
One thread, one query at a time, side by side over the same codes:

* ``exact``         — :class:`semdb.cosine.CosineIndex`, the truth of ``recall (exact)``;
* ``fast R=..``     — the fast scan over one list (what semdb uses below ``LISTS_MIN_ITEMS``), R re-ranked;
* ``ivf L/p R=..`` — inverted lists, p probed, the default re-rank depth (what semdb uses above it;
  forced here to measure them).

``recall (float)`` is against the float brute force. Codecs: ``--codecs`` (``default`` is what
``semdb ingest`` trains: :func:`semdb.codecs.choice.train_for_database` with the generic query sample).
``--image-queries N``: N random sentences are the queries instead (search by image), scored as the
database scores image queries — through the codec's item path where it has one
(:meth:`~semdb.codecs.base.Codec.image_cosine_index` is then the exact truth).

    python benchmarks/scale_real.py                         # pcapq 64 and 128, default 64; ~5 min
    python benchmarks/scale_real.py --codecs pcapq:128
    python benchmarks/scale_real.py --codecs default:64 --image-queries 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, print_table
from codecs_cupl import generic_sample, load_cupl, split
from scale import COLUMNS, K, exact_baseline, measured, timed

from semdb.codecs import Codec, train_codec
from semdb.codecs.choice import train_for_database
from semdb.cosine import CosineIndex
from semdb.index.fastscan import (
    ITEM_RERANK_FACTOR,
    FastScan,
    FourBitLayout,
    default_rerank,
    four_bit_layout,
    item_layout,
)
from semdb.index.lists import assign_lists, list_count, train_lists
from semdb.index.search_index import cosine_arrays


def trained(name: str, bits: int, train: np.ndarray, sample: np.ndarray | None) -> Codec:
    """Codec ``name`` at ``bits`` trained on ``train`` (``default``: ingest's choice, query-weighted by ``sample``)."""
    if name == "default":
        assert sample is not None
        return train_for_database(train, codec=None, bits=bits, fidelity=None, queries=lambda _: sample).codec
    return train_codec(name, train, bits, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="pcapq:64,pcapq:128,default:64", help="name:bits, comma-separated")
    parser.add_argument("--reranks", default="64,128,256")
    parser.add_argument("--nprobes", default="4,8,16,32")
    parser.add_argument("--image-queries", type=int, default=0, help="this many random sentences as image queries")
    args = parser.parse_args()
    print(machine())
    names, sentences, labels, prompts = load_cupl()
    train_classes, held_out = split(labels, len(names), 0)
    train = sentences[np.isin(labels, train_classes)]
    items = np.ascontiguousarray(sentences, dtype=np.float32)
    queries = np.ascontiguousarray(prompts, dtype=np.float32)
    n = len(items)
    if args.image_queries:
        queries = items[np.random.default_rng(0).choice(n, args.image_queries, replace=False)]
    wanted = [(part.split(":")[0], int(part.split(":")[1])) for part in args.codecs.split(",")]
    sample = generic_sample(names, held_out) if any(name == "default" for name, _ in wanted) else None
    lists = list_count(len(train))
    coarse = train_lists(train, seed=0, lists=lists)
    assert coarse is not None
    item_lists = assign_lists(coarse, items)
    float_truth = np.argsort(-(queries @ items.T), axis=1)[:, :K]
    kind = "random sentences as image queries" if args.image_queries else "class prompts as queries"
    print(f"{n:,} CuPL sentences, {len(queries)} {kind}; {lists} lists trained on {len(train):,}")
    for name, bits in wanted:
        started = time.process_time()
        codec = trained(name, bits, train, sample)
        train_cpu = time.process_time() - started
        layout = four_bit_layout(codec)
        if layout is None:
            print(f"{codec.describe()}: no 4-bit layout, no fast scan")
            continue
        rows = searches(codec, layout, items, queries, float_truth, (item_lists, coarse), args)
        print_table(
            f"{codec.describe()} (trained in {train_cpu:.1f} s CPU): {n:,} real embeddings, one thread (ms)",
            COLUMNS,
            rows,
        )


def searches(
    codec: Codec,
    layout: FourBitLayout,
    items: np.ndarray,
    queries: np.ndarray,
    float_truth: np.ndarray,
    lists: tuple[np.ndarray | None, np.ndarray],
    args: argparse.Namespace,
) -> list[list[object]]:
    """The table rows of one codec: the exact scan, the fast scan over one list, inverted lists."""
    from threadpoolctl import threadpool_limits

    n = len(items)
    ids = np.arange(n, dtype=np.int64)
    item_lists, coarse = lists
    codes = codec.encode(items)
    rows: list[list[object]] = []
    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        image_queries = bool(args.image_queries)
        if image_queries:
            # The fast scan is built with the text path's norms (its bands); the truth is the image path's.
            norms = cosine_arrays(codec.cosine_index(codes))[1]
            started = time.perf_counter()
            for_images: CosineIndex = codec.image_cosine_index(codes)
            exact_build = time.perf_counter() - started
            exact_ids, walls, cpus = timed(lambda q: for_images.search(q, K)[1], queries)
        else:
            norms, exact_build, (exact_ids, walls, cpus) = exact_baseline(codec, codes, queries)
        if norms is not None:
            spread = np.quantile(1 / norms[norms > 0], [0.01, 0.5, 0.99])
            low, middle, high = spread.tolist()
            print(f"{codec.describe()}: ‖x̂‖ 1st / 50th / 99th percentile {low:.3f} / {middle:.3f} / {high:.3f}")
        truths = (exact_ids, float_truth)
        rows.append(measured("exact", exact_ids, walls, cpus, truths, float("nan"), exact_build))
        t = time.perf_counter()
        flat = FastScan.build(layout, ids, codes, norms, items=item_layout(codec))  # as semdb.index.build does
        flat_build = time.perf_counter() - t
        for rerank in map(int, args.reranks.split(",")):
            got, walls, cpus = timed(
                lambda q, r=rerank: flat.search(q, K, rerank=r, image_queries=image_queries)[1], queries
            )
            rows.append(measured(f"fast R={rerank}", got, walls, cpus, truths, flat.nbytes() / n, flat_build))
        t = time.perf_counter()
        ivf = FastScan.build(layout, ids, codes, norms, item_lists, coarse, items=item_layout(codec))
        ivf_build = time.perf_counter() - t
        for nprobe in map(int, args.nprobes.split(",")):
            got, walls, cpus = timed(
                lambda q, p=nprobe: ivf.search(q, K, nprobe=p, image_queries=image_queries)[1], queries
            )
            depth = default_rerank(n) * (ITEM_RERANK_FACTOR if image_queries and ivf.item_layout is not None else 1)
            label = f"ivf {len(coarse)}/{nprobe} R={depth}"
            rows.append(measured(label, got, walls, cpus, truths, ivf.nbytes() / n, ivf_build))
    return rows


if __name__ == "__main__":
    main()
