"""Rate–accuracy evaluation of codecs on plain arrays: what the bits keep of the float embeddings.

For the float embeddings and for each codec × bit rate: zero-shot top-1 accuracy (each test item to
its nearest class query), text→image mAP@100 (class queries; relevant = same class),
image→image 10-recall@10 against the float neighbours, bits per image and bits per pixel at 224².
Codes are searched as the database searches them (:meth:`Codec.cosine_index`: queries in floats, items
ranked by cosine to their reconstructions) — except image→image for a codec with a separate path for
item queries (:meth:`Codec.item_cosine_index`, e.g. ``pqvae-pca`` with ``item_decoder``), which is
measured through that path; the database does not search it yet (``docs/codecs.md`` §11g).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from semdb.codecs import train_codec
from semdb.codecs.base import Codec, as_embeddings
from semdb.cosine import CosineIndex
from semdb.errors import InvalidArgumentError
from semdb.index import flat_index

MAP_DEPTH = 100
RECALL_K = 10
RECALL_QUERIES = 2000
PIXELS_224 = 224 * 224

Row = dict[str, Any]


def zero_shot_accuracy(items: np.ndarray, labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray) -> float:
    """Top-1 accuracy of ``items (n, d)`` classified to the label of their best ``queries (c, d)``."""
    index = faiss.IndexFlatIP(queries.shape[1])
    index.add(queries)
    _, best = index.search(items, 1)
    return float(np.mean(query_labels[best[:, 0]] == labels))


def mean_average_precision(
    index: faiss.Index | CosineIndex,
    labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    depth: int = MAP_DEPTH,
) -> float:
    """mAP@``depth`` of ``queries (c, d)`` over the items of ``index`` (row i has ``labels[i]``).

    AP@k = Σ_{j≤k} precision@j · rel_j / min(#relevant, k), relevant = same label.
    """
    _, found = index.search(queries, min(depth, index.ntotal))
    relevant = (labels[found] == query_labels[:, None]) & (found >= 0)  # (c, depth)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    totals = np.minimum(np.bincount(labels, minlength=int(query_labels.max()) + 1)[query_labels], depth)
    ap = (precision * relevant).sum(1) / np.maximum(totals, 1)
    return float(ap.mean())


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of each row of ``truth (q, k)`` found in the same row of ``found (q, k)``."""
    hits = [len(np.intersect1d(t, f)) for t, f in zip(truth, found, strict=True)]
    return float(np.sum(hits) / truth.size)


def evaluate_codecs(
    train: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    codecs: Sequence[str],
    bits: Sequence[int],
    seed: int = 0,
    on_row: Callable[[Row], None] | None = None,
    trained: Callable[[str, int], Codec] | None = None,
    train_queries: np.ndarray | None = None,
) -> list[Row]:
    """Train each codec × bit rate on ``train`` and measure it on ``test``.

    ``train (n, d)``, ``test (m, d)``, ``queries (c, d)`` float32, L2-normalised; ``test_labels
    (m,)`` and ``query_labels (c,)`` int class ids. Returns one row per setting, the float row
    first: ``codec``, ``bits``, ``zero_shot``, ``zero_shot_ratio``, ``map100``, ``map100_ratio``,
    ``recall10`` (10-recall@10 of the first 2,000 test items against their float neighbours),
    ``bits_per_image``, ``bpp_224`` and ``train_seconds``. ``on_row`` sees each row as it is done;
    ``trained(name, bits)``, if given, supplies the codecs instead of training them on ``train``
    (the transfer case). ``train_queries`` ``(c', d)``: sample queries of the training classes (never
    ``queries`` themselves); given, every codec is trained query-weighted by them
    (:mod:`semdb.codecs.query_weighted`).
    """
    test = as_embeddings(test)
    train = as_embeddings(train, test.shape[1])
    queries = as_embeddings(queries, test.shape[1])
    test_labels = np.asarray(test_labels, dtype=np.int64)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    if len(test_labels) != len(test) or len(query_labels) != len(queries):
        raise InvalidArgumentError("need one label per test embedding and one per query")
    if not len(test) or not len(queries):
        raise InvalidArgumentError("need at least one test embedding and one query")

    recall_queries = test[:RECALL_QUERIES]
    k = min(RECALL_K, len(test))
    exact = flat_index(test)
    assert exact is not None  # test is not empty (checked above)
    _, truth = exact.search(recall_queries, k)
    float_zs = zero_shot_accuracy(test, test_labels, queries, query_labels)
    float_map = mean_average_precision(exact, test_labels, queries, query_labels)
    rows: list[Row] = []

    def add(codec: str, bits_per_image: int | None, zs: float, ap: float, recall: float, seconds: float) -> None:
        row: Row = {
            "codec": codec,
            "bits": bits_per_image,
            "zero_shot": zs,
            "zero_shot_ratio": zs / float_zs if float_zs else None,
            "map100": ap,
            "map100_ratio": ap / float_map if float_map else None,
            "recall10": recall,
            "bits_per_image": bits_per_image if bits_per_image is not None else 32 * test.shape[1],
            "bpp_224": (bits_per_image if bits_per_image is not None else 32 * test.shape[1]) / PIXELS_224,
            "train_seconds": seconds,
        }
        rows.append(row)
        if on_row:
            on_row(row)

    add("float", None, float_zs, float_map, 1.0, 0.0)
    for name in codecs:
        for bits_per_image in bits:
            start = time.perf_counter()
            codec = (
                trained(name, bits_per_image)
                if trained
                else train_codec(name, train, bits_per_image, seed, queries=train_queries)
            )
            seconds = time.perf_counter() - start
            codes = codec.encode(test)
            index = codec.cosine_index(codes)
            # Item queries go through the codec's item path where it has one, as the database's do.
            items = codec.image_cosine_index(codes, index)
            _, found = items.search(recall_queries, k)
            add(
                name,
                codec.bits_per_image,
                zero_shot_accuracy(codec.decode(codes), test_labels, queries, query_labels),
                mean_average_precision(index, test_labels, queries, query_labels),
                recall_at_k(truth, found),
                seconds,
            )
    return rows
