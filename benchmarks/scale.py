"""Benchmark: search at a million codes and beyond (issue 10) — fast scan + exact re-rank vs the exact scan.

Synthetic 512-d clustered embeddings (``search_latency.synthetic``: ``--clusters`` unit centres,
decaying noise spectrum), generated in chunks from per-chunk seeds so that only the codes are kept
and the floats can be regenerated for the float brute force. One codec (``--codec``, default
``pcapq`` at ``--bits`` 128: 32 words of 4 bits) is trained on ``--train`` points; one thread
(``faiss.omp_set_num_threads(1)`` and threadpoolctl), one query at a time, wall and CPU
(``time.thread_time``) per query. Side by side, in one run, over the same codes:

* ``exact``      — semdb's proven-exact cosine scan (:class:`semdb.cosine.CosineIndex`; today's search,
  the baseline and the truth ``recall@10 (exact)`` is measured against);
* ``fast R=..``  — :class:`semdb.index.fastscan.FastScan` over one list: FAISS fast scan of every code,
  the best R re-ranked exactly;
* ``ivf L/p R``  — the same with L inverted lists (spherical k-means on the training sample, each
  code's list assigned from its float embedding), p lists probed;
* ``faiss ivf``  — FAISS ``IndexIVFPQFastScan`` used directly (its own training and encoding of the
  floats, ``by_residual=False``), no re-rank, for reference.

``recall@10 (float)`` is against the float brute force over the regenerated embeddings. Also:
resident bytes per item, build times, and the catch-up: adding 1,000 codes to / removing 1,000
from the open fast index, then the first search.

    python benchmarks/scale.py                 # 1M, ~6 min on 2 shared cores
    python benchmarks/scale.py --n 200000      # quicker
    python benchmarks/scale.py --n 10000000 --train 200000 --lists 4096 --skip-flat   # 10M
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, percentile_ms, print_table
from search_latency import spectrum, synthetic

from semdb.codecs import Codec, train_codec
from semdb.evaluation import recall_at_k
from semdb.index.fastscan import FastScan, four_bit_layout
from semdb.index.lists import assign_lists, train_lists
from semdb.index.search_index import cosine_arrays

DIM = 512
K = 10
CHUNK = 100_000
# The columns of a row of measured().
COLUMNS = [
    "search",
    "p50 wall",
    "p99 wall",
    "p50 CPU",
    "p99 CPU",
    "recall (exact)",
    "recall (float)",
    "bytes/item",
    "build s",
]


def chunks(n: int, centres: np.ndarray, scales: np.ndarray, noise: float, seed: int):  # type: ignore[no-untyped-def]
    """Yield ``(start, (m, d) float32)`` blocks of the collection, the same on every call."""
    for number, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, 7, number])
        yield start, synthetic(min(CHUNK, n - start), centres, noise, scales, rng, chunk=CHUNK)


def measured(
    label: str,
    got: np.ndarray,
    walls: list[float],
    cpus: list[float],
    truths: tuple[np.ndarray, np.ndarray],
    nbytes: float,
    build_s: float,
) -> list[object]:
    """One table row: ``label``, p50/p99 wall and CPU ms, 10-recall@10 of ``got`` ``(q, k)`` against
    the exact answer and the float answer (``truths``), bytes per item, build seconds."""
    exact_ids, float_truth = truths
    return [
        label,
        percentile_ms(walls, 50),
        percentile_ms(walls, 99),
        percentile_ms(cpus, 50),
        percentile_ms(cpus, 99),
        recall_at_k(exact_ids, got),
        recall_at_k(float_truth, got),
        nbytes,
        build_s,
    ]


def timed(search, queries: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Run ``search(q (1, d)) -> ids (1, k)`` one query at a time → (ids (q, k), wall s, CPU s)."""
    walls, cpus, found = [], [], []
    for query in queries:
        wall, cpu = time.perf_counter(), time.thread_time()
        ids = search(query[None, :])
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
        found.append(np.asarray(ids)[0, :K])
    return np.stack(found), walls, cpus


def exact_baseline(
    codec: Codec, codes: np.ndarray, queries: np.ndarray
) -> tuple[np.ndarray | None, float, tuple[np.ndarray, list[float], list[float]]]:
    """semdb's exact cosine scan over ``codes``, the baseline and truth of every fast row: ``(1/‖x̂‖
    (n,) or None, build seconds, timed(search) of the ``queries``)``."""
    started = time.perf_counter()
    cosine = codec.cosine_index(codes)
    build = time.perf_counter() - started
    return cosine_arrays(cosine)[1], build, timed(lambda q: cosine.search(q, K)[1], queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--codec", default="pcapq")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--query-noise", type=float, default=1.5)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--reranks", default="64,128,256,512")
    parser.add_argument("--nprobes", default="8,16,32,64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-flat", action="store_true", help="no fast scan over one list (slow at 10M)")
    parser.add_argument("--skip-faiss", action="store_true", help="no IndexIVFPQFastScan of the floats")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    print(machine())
    print(f"faiss {faiss.__version__}; n={args.n:,}; codec {args.codec} {args.bits} bits; {args.queries} queries")
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = spectrum(DIM, 0.5, rng)
    sample = synthetic(args.train, centres, args.noise, scales, rng)
    queries = synthetic(args.queries, centres, args.query_noise, scales, rng)
    started = time.perf_counter()
    codec = train_codec(args.codec, sample, args.bits, seed=args.seed)
    layout = four_bit_layout(codec)
    print(
        f"codec {codec.describe()} trained: {time.perf_counter() - started:.1f} s; 4-bit layout: {layout is not None}"
    )
    coarse = train_lists(sample, seed=args.seed, lists=args.lists)
    assert coarse is not None

    # One pass over the data: codes, lists, float truth, and FAISS's own IVF fast scan.
    faiss_ivf = faiss.IndexIVFPQFastScan(
        faiss.IndexFlatIP(DIM), DIM, args.lists, args.bits // 4, 4, faiss.METRIC_INNER_PRODUCT
    )
    faiss_ivf.by_residual = False
    started = time.perf_counter()
    if not args.skip_faiss:
        faiss_ivf.train(sample)
    faiss_train = time.perf_counter() - started
    codes = np.empty((args.n, codec.code_size), np.uint8)
    lists = np.empty(args.n, np.int64)
    best_scores = np.full((args.queries, K), -np.inf, np.float32)
    best_ids = np.zeros((args.queries, K), np.int64)
    encode_s = faiss_add_s = 0.0
    for start, block in chunks(args.n, centres, scales, args.noise, args.seed):
        t = time.perf_counter()
        codes[start : start + len(block)] = codec.encode(block)
        lists[start : start + len(block)] = assign_lists(coarse, block)
        encode_s += time.perf_counter() - t
        t = time.perf_counter()
        if not args.skip_faiss:
            faiss_ivf.add(block)
        faiss_add_s += time.perf_counter() - t
        scores = queries @ block.T
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate(
            [best_ids, np.arange(start, start + len(block))[None, :].repeat(len(queries), 0)], 1
        )
        top = np.argsort(-merged_scores, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(merged_scores, top, 1), np.take_along_axis(merged_ids, top, 1)
    float_truth = best_ids
    print(
        f"encoded {args.n:,} (+ list assignment) in {encode_s:.1f} s;"
        f" FAISS IVF trained {faiss_train:.1f} s, added {faiss_add_s:.1f} s"
    )

    ids = np.arange(args.n, dtype=np.int64)
    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        norms, exact_build, (exact_ids, walls, cpus) = exact_baseline(codec, codes, queries)
        rows: list[list[object]] = []
        cosine_bytes = args.n * (codec.code_size + 8 + 4 + 8)  # codes, part rows, 1/‖x̂‖, group ids
        rows.append(
            measured(
                "exact (today)", exact_ids, walls, cpus, (exact_ids, float_truth), cosine_bytes / args.n, exact_build
            )
        )
        exact_p50 = percentile_ms(cpus, 50)
        if layout is not None and not args.skip_flat:
            t = time.perf_counter()
            flat = FastScan.build(layout, ids, codes, norms)
            flat_build = time.perf_counter() - t
            for rerank in map(int, args.reranks.split(",")):
                got, walls, cpus = timed(lambda q, r=rerank: flat.search(q, K, rerank=r)[1], queries)
                rows.append(
                    measured(
                        f"fast R={rerank}",
                        got,
                        walls,
                        cpus,
                        (exact_ids, float_truth),
                        flat.nbytes() / args.n,
                        flat_build,
                    )
                )
            del flat
        if layout is not None:
            t = time.perf_counter()
            ivf = FastScan.build(layout, ids, codes, norms, lists, coarse)
            ivf_build = time.perf_counter() - t
            for nprobe in map(int, args.nprobes.split(",")):
                for rerank in (128, 256):
                    got, walls, cpus = timed(
                        lambda q, p=nprobe, r=rerank: ivf.search(q, K, nprobe=p, rerank=r)[1], queries
                    )
                    rows.append(
                        measured(
                            f"ivf {args.lists}/{nprobe} R={rerank}",
                            got,
                            walls,
                            cpus,
                            (exact_ids, float_truth),
                            ivf.nbytes() / args.n,
                            ivf_build,
                        )
                    )
        for nprobe in () if args.skip_faiss else (16, 32):
            faiss_ivf.nprobe = nprobe
            got, walls, cpus = timed(lambda q: faiss_ivf.search(q, K)[1], queries)
            packed = args.n * (codec.code_size + 8)
            rows.append(
                measured(
                    f"faiss ivf {args.lists}/{nprobe}",
                    got,
                    walls,
                    cpus,
                    (exact_ids, float_truth),
                    packed / args.n,
                    faiss_train + faiss_add_s,
                )
            )
        print_table(
            f"{args.n:,} items, {codec.describe()}, one thread, one query at a time (ms; recall = 10-recall@10)",
            COLUMNS,
            rows,
        )
        print(f"exact scan p50 CPU {exact_p50:.2f} ms")
        if layout is not None:
            # Catch-up on the open index: 1,000 new codes appended, 1,000 removed, then a search.
            extra = synthetic(1000, centres, args.noise, scales, np.random.default_rng(99))
            extra_codes = codec.encode(extra)
            extra_norms = cosine_arrays(codec.cosine_index(extra_codes))[1]
            extra_lists = assign_lists(coarse, extra)
            wall, cpu = time.perf_counter(), time.thread_time()
            ivf.add(np.arange(args.n, args.n + 1000, dtype=np.int64), extra_codes, extra_norms, extra_lists)
            ivf.search(queries[:1], K)
            add_wall, add_cpu = time.perf_counter() - wall, time.thread_time() - cpu
            wall, cpu = time.perf_counter(), time.thread_time()
            ivf.remove(np.arange(0, args.n, args.n // 1000, dtype=np.int64)[:1000])
            ivf.search(queries[:1], K)
            remove_wall, remove_cpu = time.perf_counter() - wall, time.thread_time() - cpu
            print(
                f"catch-up: +1,000 codes then first search {add_wall * 1e3:.0f} ms wall / {add_cpu * 1e3:.0f} ms CPU"
                " (inverse norms of the new codes excluded);"
                f" -1,000 then first search {remove_wall * 1e3:.0f} ms wall / {remove_cpu * 1e3:.0f} ms CPU"
            )


if __name__ == "__main__":
    main()
