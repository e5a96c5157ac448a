"""Fidelity on the user's own images: what a trained codec keeps of the float embeddings it replaced.

When a database trains its codec, some of the staged embeddings are held out of training
(:func:`holdout_rows`); the codec then codes every staged embedding, and the codes are searched as
the database searches them (:meth:`Codec.cosine_index`) against the floats they came from:

* ``text_to_image``: for each query of the generic sample (:mod:`semdb.vocabulary`), the share of
  its float top-10 among the staged images that the codes also put in its top 10;
* ``image_to_image``: the same for each held-out image as the query (10-recall@10);
* ``mean_cosine``: mean cosine between a held-out embedding and its reconstruction.

Recall is :func:`semdb.evaluation.recall_at_k`, the one recall helper of the code base. The figures
are stored in the codec's report (``codecs.report``) and shown by ``semdb stats``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from semdb.codecs.base import Codec, as_embeddings
from semdb.evaluation import RECALL_K, recall_at_k

HOLDOUT = 1000  # held-out embeddings measured, at most
MIN_HOLDOUT = 20  # fewer than this: too few to measure anything
HOLDOUT_SHARE = 5  # at most 1 / HOLDOUT_SHARE of the staged embeddings are held out


@dataclass(frozen=True)
class Fidelity:
    """What the codes keep (see the module docstring); shares in 0..1."""

    bits_per_image: int
    text_to_image: float | None  # None without sample queries
    image_to_image: float
    mean_cosine: float
    held_out: int  # held-out images measured (image queries)
    searched: int  # images searched (all the staged ones)
    queries: int  # text queries

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def holdout_rows(n: int, seed: int = 0) -> np.ndarray:
    """Sorted ``(h,)`` int64 rows of ``n`` staged embeddings to hold out of training: ``min(1000,
    n / 5)`` of them at random (seeded), none when that is under :data:`MIN_HOLDOUT`."""
    count = min(HOLDOUT, n // HOLDOUT_SHARE)
    if count < MIN_HOLDOUT:
        return np.empty(0, np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False)).astype(np.int64)


def measure(codec: Codec, embeddings: np.ndarray, held_out: np.ndarray, queries: np.ndarray | None) -> Fidelity:
    """Measure ``codec`` on ``embeddings`` ``(n, d)`` float32 (L2-normalised), ``held_out`` ``(h,)``
    rows of it the codec was not trained on (the image queries), ``queries`` ``(c, d)`` text
    queries or None."""
    x = as_embeddings(embeddings, codec.dim)
    rows = np.asarray(held_out, dtype=np.int64)
    if not len(rows):
        raise ValueError("fidelity needs held-out embeddings")
    k = min(RECALL_K, len(x))
    codes = codec.encode(x)
    coded = codec.cosine_index(codes)
    exact = faiss.IndexFlatIP(x.shape[1])  # the floats are unit vectors: inner product is cosine
    exact.add(x)

    def agreement(probes: np.ndarray) -> float:
        _, truth = exact.search(probes, k)
        _, found = coded.search(probes, k)
        return recall_at_k(truth, found)

    originals = x[rows]
    decoded = codec.decode(codes[rows])
    cosines = (decoded * originals).sum(1) / np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)
    text = None if queries is None or not len(queries) else agreement(as_embeddings(queries, codec.dim))
    return Fidelity(
        bits_per_image=codec.bits_per_image,
        text_to_image=text,
        image_to_image=agreement(originals),
        mean_cosine=float(cosines.mean()),
        held_out=len(rows),
        searched=len(x),
        queries=0 if queries is None else len(queries),
    )


def describe(fidelity: dict[str, Any]) -> str:
    """One sentence for ``semdb stats`` from a stored :meth:`Fidelity.to_dict`."""
    text = fidelity.get("text_to_image")
    kept = f"{text:.2f} of the text→image top-10 and " if text is not None else ""
    return (
        f"at {fidelity['bits_per_image']} bits your codes keep {kept}{fidelity['image_to_image']:.2f} of the "
        f"image→image top-10 (mean cosine {fidelity['mean_cosine']:.2f}), measured on {fidelity['searched']:,} of "
        f"your images ({fidelity['held_out']:,} of them held out of training)"
    )


def report_lines(report: dict[str, Any] | None) -> list[str]:
    """What ``semdb stats`` and ``semdb ingest`` print of a codec's report: why it was chosen, and
    its fidelity (on the user's images, or on its calibration set for a codec from a file)."""
    if not report:
        return []
    lines = [f"codec: {report.get('why', 'no reason recorded')} ({report.get('chosen_by', '?')})"]
    if report.get("fidelity"):
        lines.append(describe(report["fidelity"]))
    elif report.get("calibration_fidelity"):
        lines.append(describe(report["calibration_fidelity"]).replace("your images", "its calibration images"))
    else:
        lines.append("fidelity: not measured (too few images staged when the codec was trained)")
    return lines
