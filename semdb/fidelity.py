"""Fidelity on the user's own images: what a trained codec keeps of the float embeddings it replaced.

When a database trains its codec, some of the staged embeddings are held out of training
(:func:`holdout_rows`); the codec then codes every staged embedding, and the codes are searched as
the database searches them (:meth:`Codec.cosine_index` for texts, :meth:`Codec.image_cosine_index`
for images) against the floats they came from:

* ``text_to_image``: for each query of the generic sample (:mod:`semdb.vocabulary`), the share of
  its float top-10 among the staged images that the codes also put in its top 10;
* ``image_to_image``: the same for each held-out image as the query (10-recall@10);
* ``mean_cosine``: mean cosine between a held-out embedding and its reconstruction.

Recall is :func:`semdb.evaluation.recall_at_k`, the one recall helper of the code base. The figures
are stored in the codec's report (``codecs.report``) and shown by ``semdb stats``.

The two agreements fall as the collection grows (more near neighbours to confuse), so each is also
measured among half the staged images, and ``stats`` extends the change per doubling to a collection
larger than what was staged (``docs/codecs.md`` §11i: how close that comes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from semdb.codecs.base import Codec, as_embeddings
from semdb.cosine import CosineIndex
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
    # Change of each agreement from half the searched images to all of them: per doubling (None: not measured).
    text_per_doubling: float | None = None
    image_per_doubling: float | None = None

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
    codes = codec.encode(x)
    text_queries = None if queries is None or not len(queries) else as_embeddings(queries, codec.dim)
    originals = x[rows]

    def agreements(searched: np.ndarray) -> tuple[float | None, float]:
        """``(text→image, image→image)`` agreement when the images searched are rows ``searched``."""
        k = min(RECALL_K, len(searched))
        coded = codec.cosine_index(codes[searched])
        # Image queries search the codec's item path where it has one, as the database's do.
        coded_for_images = codec.image_cosine_index(codes[searched], coded)
        exact = faiss.IndexFlatIP(x.shape[1])  # the floats are unit vectors: inner product is cosine
        exact.add(x[searched])

        def agreement(probes: np.ndarray, index: CosineIndex) -> float:
            return recall_at_k(exact.search(probes, k)[1], index.search(probes, k)[1])

        text = None if text_queries is None else agreement(text_queries, coded)
        return text, agreement(originals, coded_for_images)

    text, image = agreements(np.arange(len(x)))
    text_slope = image_slope = None
    others = np.setdiff1d(np.arange(len(x)), rows)
    if len(others) >= len(x) // 2 - len(rows) > 0:
        # The held-out images and enough of the others to make half: the same probes, half the haystack.
        kept = np.random.default_rng(0).choice(others, len(x) // 2 - len(rows), replace=False)
        half_text, half_image = agreements(np.sort(np.concatenate([rows, kept])))
        image_slope = image - half_image
        text_slope = None if text is None or half_text is None else text - half_text
    decoded = codec.decode(codes[rows])
    cosines = (decoded * originals).sum(1) / np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)
    return Fidelity(
        bits_per_image=codec.bits_per_image,
        text_to_image=text,
        image_to_image=image,
        mean_cosine=float(cosines.mean()),
        held_out=len(rows),
        searched=len(x),
        queries=0 if queries is None else len(queries),
        text_per_doubling=text_slope,
        image_per_doubling=image_slope,
    )


def at_collection(fidelity: dict[str, Any], images: int) -> dict[str, float] | None:
    """The agreements of a stored :meth:`Fidelity.to_dict` extended to a collection of ``images``:
    each figure plus its change per doubling times ``log2(images / searched)``, within 0..1; None
    when the collection is no larger than what was measured or no change per doubling was."""
    searched = int(fidelity.get("searched") or 0)
    if fidelity.get("image_per_doubling") is None or searched <= 0 or images <= searched:
        return None
    doublings = float(np.log2(images / searched))
    out = {}
    for key in ("text_to_image", "image_to_image"):
        value, slope = fidelity.get(key), fidelity.get(key.split("_")[0] + "_per_doubling")
        if value is not None and slope is not None:
            out[key] = float(np.clip(value + slope * doublings, 0.0, 1.0))
    return out


def describe(fidelity: dict[str, Any], images: int | None = None) -> str:
    """One sentence for ``semdb stats`` from a stored :meth:`Fidelity.to_dict`; ``images``: how many
    the database holds now (a larger collection gets the extended figures of :func:`at_collection`)."""
    text = fidelity.get("text_to_image")
    kept = f"{text:.2f} of the text→image top-10 and " if text is not None else ""
    sentence = (
        f"at {fidelity['bits_per_image']} bits your codes keep {kept}{fidelity['image_to_image']:.2f} of the "
        f"image→image top-10 (mean cosine {fidelity['mean_cosine']:.2f}), measured on {fidelity['searched']:,} of "
        f"your images ({fidelity['held_out']:,} of them held out of training)"
    )
    extended = at_collection(fidelity, images) if images else None
    if extended:
        figures = " and ".join(
            f"{extended[key]:.2f} {label}"
            for key, label in (("text_to_image", "text→image"), ("image_to_image", "image→image"))
            if key in extended
        )
        sentence += f"; among all {images:,}, about {figures} (extended from half of them to all)"
    return sentence


def report_lines(report: dict[str, Any] | None, images: int | None = None) -> list[str]:
    """What ``semdb stats`` and ``semdb ingest`` print of a codec's report: why it was chosen, and
    its fidelity (on the user's images, or on its calibration set for a codec from a file);
    ``images``: how many the database holds now (see :func:`describe`)."""
    if not report:
        return []
    lines = [f"codec: {report.get('why', 'no reason recorded')} ({report.get('chosen_by', '?')})"]
    if report.get("fidelity"):
        lines.append(describe(report["fidelity"], images))
    elif report.get("calibration_fidelity"):
        lines.append(describe(report["calibration_fidelity"]).replace("your images", "its calibration images"))
    else:
        lines.append("fidelity: not measured (too few images staged when the codec was trained)")
    return lines
