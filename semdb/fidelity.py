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

The two agreements fall as the collection grows (more near neighbours to confuse). ``stats``
estimates them for a collection ``m`` times what was staged from how deep the staged codes agree:
the top ``k`` among ``m·n`` images, thinned to one in ``m``, is the top ``k/m`` among ``n`` drawn
from the same images, with ``1/m`` as many near neighbours to confuse it with — so the agreement of
the top 10 among ``m·n`` is about that of the top ``10/m`` among the ``n`` staged. ``measure``
stores the agreement at each depth 1..10 (:data:`DEPTHS`); :func:`at_collection` reads it at
``10/m`` (``docs/codecs.md`` §11k: how close that comes).
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
DEPTHS = RECALL_K  # agreement stored at each depth 1..DEPTHS
# Held-out codes this many times further from their embeddings than trained ones: stats warns
# (docs/codecs.md §11k: the one case measured over it is the one its estimate missed by .04).
OVERFIT_RATIO = 1.5
# The top-10 agreements a Fidelity holds, as reports name them.
AGREEMENT_LABELS = {"text_to_image": "text→image", "image_to_image": "image→image"}


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
    # Agreement at depths 1..10 among all the searched images (see the module docstring): for text
    # queries; for image queries without the probe itself; and the share of probes whose own code is
    # among the top j. None in reports made before them.
    text_by_depth: list[float] | None = None
    image_by_depth: list[float] | None = None
    self_by_depth: list[float] | None = None
    # Mean cosine of as many images the codec was trained on (None in reports made before it).
    trained_mean_cosine: float | None = None
    # Reports made before the depth curves: the change of each agreement from half the searched
    # images to all of them, per doubling (still read by :func:`at_collection`; no longer measured).
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
    k = min(RECALL_K, len(x))
    coded = codec.cosine_index(codes)
    # Image queries search the codec's item path where it has one, as the database's do.
    coded_for_images = codec.image_cosine_index(codes, coded)
    exact = faiss.IndexFlatIP(x.shape[1])  # the floats are unit vectors: inner product is cosine
    exact.add(x)
    text = text_by_depth = None
    if text_queries is not None:
        truth, found = exact.search(text_queries, k)[1], coded.search(text_queries, k)[1]
        text = recall_at_k(truth, found)
        text_by_depth = [recall_at_k(truth[:, :j], found[:, :j]) for j in range(1, k + 1)]
    # One deeper than k: each probe is among the searched images, and is set apart by its row (an
    # identical embedding elsewhere may come first).
    depth = min(k + 1, len(x))
    truth, found = exact.search(originals, depth)[1], coded_for_images.search(originals, depth)[1]
    image = recall_at_k(truth[:, :k], found[:, :k])
    truth_others, found_others = _without(truth, rows), _without(found, rows)
    image_by_depth = [recall_at_k(truth_others[:, :j], found_others[:, :j]) for j in range(1, depth)]
    self_by_depth = [float(np.mean(np.any(found[:, :j] == rows[:, None], axis=1))) for j in range(1, k + 1)]
    # The same number of the images it was trained on (all the others), to compare the fit with.
    others = np.setdiff1d(np.arange(len(x)), rows)
    trained = np.random.default_rng(0).choice(others, min(len(rows), len(others)), replace=False)
    return Fidelity(
        bits_per_image=codec.bits_per_image,
        text_to_image=text,
        image_to_image=image,
        mean_cosine=_mean_cosine(codec, codes[rows], originals),
        trained_mean_cosine=_mean_cosine(codec, codes[trained], x[trained]) if len(trained) else None,
        held_out=len(rows),
        searched=len(x),
        queries=0 if queries is None else len(queries),
        text_by_depth=text_by_depth,
        image_by_depth=image_by_depth,
        self_by_depth=self_by_depth,
    )


def _mean_cosine(codec: Codec, codes: np.ndarray, originals: np.ndarray) -> float:
    """Mean cosine between ``originals`` ``(n, d)`` and the decoding of their ``codes``."""
    decoded = codec.decode(codes)
    return float(((decoded * originals).sum(1) / np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)).mean())


def fits_training_better(fidelity: dict[str, Any]) -> float | None:
    """How many times further (1 − cosine) the held-out images' codes are from their embeddings
    than the trained images' are, where that is over :data:`OVERFIT_RATIO` (a codec that learned
    its training images rather than their kind: images added later keep less than measured);
    else None."""
    held_out, trained = fidelity.get("mean_cosine"), fidelity.get("trained_mean_cosine")
    if held_out is None or trained is None or trained >= 1:
        return None
    ratio = (1 - held_out) / (1 - trained)
    return ratio if ratio > OVERFIT_RATIO else None


def _without(neighbours: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(q, d - 1)`` of ``neighbours`` ``(q, d)`` less each query's own row ``rows`` ``(q,)`` (the last
    column dropped where it was not among them)."""
    width = neighbours.shape[1] - 1
    others = neighbours != rows[:, None]
    others[others.sum(1) > width, -1] = False
    return neighbours[others].reshape(len(neighbours), width)


def _at_depth(curve: list[float], depth: float) -> float:
    """``curve[j - 1]`` (the agreement at depth j) at a fractional ``depth``: linear between depths,
    and below depth 1 carried on in log depth from depths 1 and 2 (an extrapolation)."""
    values = np.asarray(curve, dtype=np.float64)
    if depth >= 1 or len(values) < 2:
        return float(np.interp(depth, np.arange(1, len(values) + 1), values))
    return float(values[0] + (values[1] - values[0]) * np.log2(depth))


def at_collection(fidelity: dict[str, Any], images: int) -> dict[str, float] | None:
    """The agreements of a stored :meth:`Fidelity.to_dict` estimated for a collection of ``images``,
    ``m`` times the ``searched`` (the module docstring): each figure moved by how much its depth
    curve falls from depth 10 to ``10/m``, within 0..1. None when the collection is no larger than
    what was measured or the report has no curve (nor, from before the curves, a change per doubling)."""
    searched = int(fidelity.get("searched") or 0)
    if searched <= 0 or images <= searched:
        return None
    scale = images / searched
    out: dict[str, float] = {}
    if fidelity.get("image_by_depth") and fidelity.get("self_by_depth"):
        k = len(fidelity["image_by_depth"])

        def image_top(depth: float) -> float:
            # The top k of an image query: itself and k - 1 others.
            others = _at_depth(fidelity["image_by_depth"], (k - 1) * depth / k)
            return (_at_depth(fidelity["self_by_depth"], depth) + (k - 1) * others) / k

        out["image_to_image"] = fidelity["image_to_image"] + image_top(k / scale) - image_top(k)
        text_curve = fidelity.get("text_by_depth")
        if text_curve and fidelity.get("text_to_image") is not None:
            depth = len(text_curve)
            out["text_to_image"] = fidelity["text_to_image"] + _at_depth(text_curve, depth / scale) - text_curve[-1]
    elif fidelity.get("image_per_doubling") is not None:
        doublings = float(np.log2(scale))
        for key in ("text_to_image", "image_to_image"):
            value, slope = fidelity.get(key), fidelity.get(key.split("_")[0] + "_per_doubling")
            if value is not None and slope is not None:
                out[key] = value + slope * doublings
    else:
        return None
    return {key: float(np.clip(value, 0.0, 1.0)) for key, value in out.items()}


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
    if extended and images:
        figures = " and ".join(
            f"{extended[key]:.2f} {label}" for key, label in AGREEMENT_LABELS.items() if key in extended
        )
        how = "estimated from how deep the staged top-10 agree"
        if fidelity.get("image_by_depth") and images > DEPTHS * int(fidelity["searched"]):
            how += f", extrapolated beyond {DEPTHS}× the images measured"
        elif not fidelity.get("image_by_depth"):
            how = "extended from half of them to all"  # a report from before the depth curves
        sentence += f"; among all {images:,}, about {figures} ({how})"
        ratio = fits_training_better(fidelity)
        if ratio is not None:
            sentence += (
                f"; codes of images the codec was not trained on are {ratio:.1f}× further from their"
                " embeddings than codes of images it was, so images added since may keep less than this"
            )
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
