"""Codecs on plain arrays: how much of the nearest-neighbour structure survives 8 to 32 bytes per vector.

Self-contained and seeded (synthetic clustered 384-d embeddings, no model needed)::

    python examples/02_codecs_on_arrays.py
"""

from __future__ import annotations

import faiss
import numpy as np

from semdb.codecs import train_codec


def clustered_embeddings(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, dim)`` float32 L2-normalised points around ``clusters`` random centres."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def recall_at_10(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of the true 10 nearest neighbours found among the returned 10."""
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)]))


def main() -> None:
    rng = np.random.default_rng(0)
    train = clustered_embeddings(20_000, 384, 50, rng)
    database = clustered_embeddings(10_000, 384, 50, rng)
    queries = clustered_embeddings(200, 384, 50, rng)

    exact = faiss.IndexFlatIP(384)
    exact.add(database)
    _, truth = exact.search(queries, 10)

    print(f"{'codec':6} {'bits':>5} {'bytes':>5} {'10-recall@10':>12}")
    for name in ["pq", "opq", "rq"]:
        for bits in [64, 128, 256]:
            codec = train_codec(name, train, bits_per_image=bits)
            codes = codec.encode(database)  # (n, bits / 8) uint8
            _, found = codec.search_index(codes).search(queries, 10)
            print(f"{name:6} {bits:5d} {codes.shape[1]:5d} {recall_at_10(truth, found):12.3f}")


if __name__ == "__main__":
    main()
