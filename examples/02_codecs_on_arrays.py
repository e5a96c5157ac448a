"""Codecs on plain arrays: how much neighbourhood structure survives 4 to 16 bytes per vector.

Self-contained and seeded (synthetic clustered 384-d embeddings, no model needed)::

    python examples/02_codecs_on_arrays.py
"""

from __future__ import annotations

import faiss
import numpy as np

from semdb.codecs import train_codec


def clustered_embeddings(n: int, centres: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(n, d)`` float32 L2-normalised points around ``centres`` ``(c, d)``, and their ``(n,)`` cluster labels."""
    labels = rng.integers(0, len(centres), n)
    points = centres[labels] + 0.08 * rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True), labels


def recall_at_10(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of the true 10 nearest neighbours found among the returned 10."""
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)]))


def main() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 384)).astype(np.float32) / np.sqrt(384)
    train, _ = clustered_embeddings(5_000, centres, rng)
    database, database_labels = clustered_embeddings(10_000, centres, rng)
    queries, query_labels = clustered_embeddings(200, centres, rng)

    exact = faiss.IndexFlatIP(384)
    exact.add(database)
    _, truth = exact.search(queries, 10)
    float_precision = np.mean(database_labels[truth] == query_labels[:, None])
    print(f"float32: {384 * 4} bytes, same-cluster precision@10 {float_precision:.3f}")

    print(f"{'codec':6} {'bits':>5} {'bytes':>5} {'10-recall@10':>12} {'same-cluster p@10':>17}")
    for name in ["pq", "opq", "rq"]:
        for bits in [32, 64, 128]:
            codec = train_codec(name, train, bits_per_image=bits)
            codes = codec.encode(database)  # (n, bits / 8) uint8
            _, found = codec.search_index(codes).search(queries, 10)
            precision = np.mean(database_labels[found] == query_labels[:, None])
            print(f"{name:6} {bits:5d} {codes.shape[1]:5d} {recall_at_10(truth, found):12.3f} {precision:17.3f}")


if __name__ == "__main__":
    main()
