"""Which codec a database trains, at which rate, and why — decided from the staged embeddings.

The default (``docs/codecs.md`` §11): ``pqvae-pca`` query-weighted by the generic query sample
(:mod:`semdb.vocabulary`) at :data:`DEFAULT_BITS` bits, the best rate–accuracy of the codecs
measured on broad embeddings. It falls back to ``pq`` where it does not fit:

* a tiny collection (fewer than :data:`MIN_LEARNED` staged embeddings): too few to fit principal
  axes and a fine-tuned codebook, and ``pq`` handles any number;
* embeddings of low intrinsic dimension — judged from their spectrum, not from the model's name:
  when :data:`LOW_DIMENSION_SHARE` of their variance lies in fewer than :data:`LOW_DIMENSION_AXES`
  principal axes, the shared codebook of ``pqvae-pca`` is decided by many near-empty sub-vectors
  (the bundled model's embeddings: 99% of the variance in 9 axes; ``pq`` keeps 100% of float mAP
  there at 64 bits, ``pqvae-pca`` 76%).

``seed_candidates=N`` (``--hyper``) trains the query-weighted default from N training seeds and
keeps the one whose fidelity on the held-out embeddings is highest (text→image; from
:data:`ITEM_TERMS_FROM_BITS`, text→image plus image→image); the default trains one
(``docs/codecs.md`` §11p: the choice gained too little to pay for the trainings).

``--codec`` / ``--bits`` choose explicitly (an explicit codec trains as before, not
query-weighted); ``--bits auto --fidelity F`` trains the chosen codec at rising rates on the staged
embeddings and keeps the smallest whose text→image fidelity (:mod:`semdb.fidelity`) reaches ``F``.
Everything decided goes into the report stored with the codec (``codecs.report``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from semdb.codecs import Codec, train_codec
from semdb.codecs.base import as_embeddings, check_bits
from semdb.errors import InvalidArgumentError, ModelUnavailableError
from semdb.fidelity import AGREEMENT_LABELS, HOLDOUT_SHARE, MIN_HOLDOUT, Fidelity, holdout_rows, measure

DEFAULT_BITS = 64
LEARNED_CODEC = "pqvae-pca"  # query-weighted
FALLBACK_CODEC = "pq"
MIN_LEARNED = 1000
LOW_DIMENSION_SHARE = 0.99
LOW_DIMENSION_AXES = 32
# Rates tried by ``--bits auto``, smallest first (bisected: ~3 trainings).
AUTO_RATES = (32, 48, 64, 96, 128, 192, 256)
DEFAULT_FIDELITY = 0.95
# From this rate on, the default's fine-tuning also keeps the items' own neighbours (item→item
# search; docs/codecs.md §11f, §11g, §11j): pqvae's reconstruction loss measured back in the searched
# space (``plain_weight``) trains a second decoder that image queries are scored through
# (``item_decoder``: the item path, which the index scans and re-ranks with, semdb.index.fastscan),
# while the first keeps the query-weighted loss for text queries; a little of the data's own spectrum
# is mixed into the weights (``data_weight``). Chosen on a validation split of the CuPL training
# classes: the weight that kept text→image mAP at the level of the single-decoder default while
# lifting item→item recall most. Below this rate zero-shot is what falls short, and the fine-tuning
# stays query-weighted only. A rate split (``residual_bits``) and a least-squares refit of the second
# decoder (``item_refit``) were measured and are not the default.
ITEM_TERMS: dict[str, float] = {"plain_weight": 10.0, "item_decoder": 1, "data_weight": 0.1}
ITEM_TERMS_FROM_BITS = 64
# The default's accuracy depends on its training seed more than on any setting tried (docs/codecs.md
# §11n). Keeping the best of three seeds by held-out text→image fidelity (``seed_candidates=3``) was
# measured as ingest would choose, at 32 bits on six class splits, and gained too little mAP to pay
# for three trainings (§11p); at 64 bits, judged by both held-out figures, it lowered mean item→item
# recall on the test splits (§11q). So the default trains one seed.
SEED_CANDIDATES = 1

# Text queries embedded to measure fidelity when the codec is not query-weighted: a sample of the
# vocabulary is enough for a mean over queries, and embedding all of it is the slow part of training.
FIDELITY_QUERIES = 1000

# (at most this many texts, None: all) → the generic query sample (c, d) embedded by the database's
# text tower (semdb.vocabulary.query_sample); called at most once per training.
QuerySample = Callable[[int | None], np.ndarray]


@dataclass
class TrainedCodec:
    """A trained codec and its report: why it was chosen, and its fidelity (JSON-ready)."""

    codec: Codec
    report: dict[str, Any] = field(default_factory=dict)


def axes_holding(embeddings: np.ndarray, share: float = LOW_DIMENSION_SHARE) -> int:
    """How many principal axes of ``embeddings`` ``(n, d)`` hold ``share`` of their variance about the mean."""
    x = as_embeddings(embeddings).astype(np.float64)
    centred = x - x.mean(axis=0)
    values = np.clip(np.linalg.eigvalsh(centred.T @ centred)[::-1], 0, None)
    total = float(values.sum())
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(values) / total, share) + 1)


def default_codec(embeddings: np.ndarray, bits: int) -> tuple[str, bool, str]:
    """``(codec name, query-weighted?, why)`` for ``embeddings`` ``(n, d)`` at ``bits`` bits."""
    n, d = embeddings.shape
    if n < MIN_LEARNED:
        return FALLBACK_CODEC, False, f"only {n} images to train on (pqvae-pca needs {MIN_LEARNED}): pq"
    axes = axes_holding(embeddings)
    if axes < LOW_DIMENSION_AXES:
        return (
            FALLBACK_CODEC,
            False,
            f"{LOW_DIMENSION_SHARE:.0%} of the embeddings' variance lies in {axes} of {d} axes (low intrinsic "
            f"dimension, under {LOW_DIMENSION_AXES}): pq, which keeps few dimensions finely",
        )
    return (
        LEARNED_CODEC,
        True,
        f"{LOW_DIMENSION_SHARE:.0%} of the variance in {axes} of {d} axes: pqvae-pca query-weighted by the "
        f"generic query sample, the best measured rate-accuracy on broad embeddings",
    )


def train_for_database(
    embeddings: np.ndarray,
    *,
    codec: str | None,
    bits: int | None,
    fidelity: float | None,
    queries: QuerySample,
    seed: int = 0,
    holdout_seed: int | None = None,
    **hyper_parameters: Any,
) -> TrainedCodec:
    """Train the codec of a database on its staged ``embeddings`` ``(n, d)`` float32.

    ``codec``/``bits``: the user's choice, or None for the default (module docstring); ``fidelity``:
    with ``bits`` None, the text→image fidelity the rate must reach (``--bits auto``). A held-out
    sample (:func:`~semdb.fidelity.holdout_rows`) is left out of training and measured; the codec
    is trained on the rest, from ``seed``. ``holdout_seed``: draws the held-out sample (default:
    ``seed``); the seed candidates share it, so that training ``seed + i`` alone with
    ``holdout_seed=seed`` reproduces candidate ``i``. ``hyper_parameters``: passed on to the codec
    (e.g. ``steps=20``).
    """
    start = time.process_time(), time.perf_counter()
    x = as_embeddings(embeddings)
    if fidelity is not None and not 0 < fidelity <= 1:
        raise InvalidArgumentError(f"--fidelity must be in (0, 1], got {fidelity}")
    if fidelity is not None and bits is not None:
        raise InvalidArgumentError("--fidelity chooses the rate: give it with --bits auto, not --bits N")
    held_out = holdout_rows(len(x), seed if holdout_seed is None else holdout_seed)
    train = np.delete(x, held_out, axis=0) if len(held_out) else x
    sample: list[np.ndarray] = []
    rate = bits if bits is not None else DEFAULT_BITS
    if codec is None:
        name, weighted, why = default_codec(train, rate)
        chosen_by = "default"
    else:
        name, weighted, why = codec, False, "chosen with --codec (trained as given, not query-weighted)"
        chosen_by = "--codec"

    def query_sample() -> np.ndarray:
        if not sample:
            try:
                sample.append(as_embeddings(queries(None if weighted else FIDELITY_QUERIES), x.shape[1]))
            except ModelUnavailableError:
                if weighted:
                    raise
                # Only the fidelity figures wanted the text tower (embeddings imported with
                # add_embeddings, say, from a model this machine cannot load): measure without it.
                sample.append(np.zeros((0, x.shape[1]), np.float32))
        return sample[0]

    seeds_tried: list[dict[str, Any]] = []

    def with_fidelity(trained: Codec) -> tuple[Codec, Fidelity | None]:
        return trained, measure(trained, x, held_out, query_sample()) if len(held_out) else None

    def fit(rate: int) -> tuple[Codec, Fidelity | None]:
        """The codec trained at ``rate``, and its fidelity on the held-out rows (None without any)."""
        weights = query_sample() if weighted else None
        learned = weighted and name == LEARNED_CODEC
        item_terms = ITEM_TERMS if learned and rate >= ITEM_TERMS_FROM_BITS else {}
        settings = {**item_terms, **hyper_parameters}
        residual_bits = int(settings.pop("residual_bits", 0))
        residual_dims = int(settings.pop("residual_dims", 0))
        refit = bool(settings.pop("refit", 0))
        items_only = bool(settings.pop("item_residual", 0))
        candidates = int(settings.pop("seed_candidates", SEED_CANDIDATES))
        if candidates > 1 and not (learned and fidelity is None):
            raise InvalidArgumentError(
                "seed_candidates chooses among seeds of the query-weighted default at a fixed rate: "
                "drop it, or train the default with --bits N"
            )
        if (residual_bits or refit) and learned:
            if candidates > 1:
                raise InvalidArgumentError("seed_candidates is not supported with residual_bits or refit: drop one")
            from semdb.codecs.rate_split import RateSplitCodec

            primary = train_codec(name, train, check_bits(rate - residual_bits), seed=seed, queries=weights, **settings)
            return with_fidelity(
                RateSplitCodec.train(
                    train, rate, seed, primary=primary, residual_dims=residual_dims, refit=refit, items_only=items_only
                )
            )
        if candidates <= 1 or not len(held_out):
            return with_fidelity(train_codec(name, train, check_bits(rate), seed=seed, queries=weights, **settings))
        results = []
        for candidate in range(seed, seed + candidates):
            trained, figures = with_fidelity(
                train_codec(name, train, check_bits(rate), seed=candidate, queries=weights, **settings)
            )
            assert figures is not None  # held_out is not empty
            seeds_tried.append({"seed": candidate, **{key: getattr(figures, key) for key in AGREEMENT_LABELS}})
            results.append((_seed_score(figures, rate), trained, figures))
        _, trained, figures = max(results, key=lambda result: result[0])  # max keeps the first of equals
        return trained, figures

    tried: list[dict[str, Any]] = []
    if fidelity is None:
        trained, measured_fidelity = fit(rate)
    else:
        if not len(held_out):
            raise InvalidArgumentError(
                f"--bits auto needs at least {MIN_HOLDOUT * HOLDOUT_SHARE} images staged to measure fidelity on; "
                "give --bits N"
            )
        trained, measured_fidelity = _smallest_rate(fit, fidelity, x.shape[1], tried)
        met = measured_fidelity is not None and _score(measured_fidelity) >= fidelity
        why += (
            f"; rate: the smallest of {', '.join(map(str, AUTO_RATES))} whose text→image fidelity ≥ {fidelity}"
            if met
            else f"; rate: the largest tried, since none reached the fidelity target {fidelity}"
        )
    report: dict[str, Any] = {
        "codec": name,
        "bits_per_image": trained.bits_per_image,
        "query_weighted": weighted,
        "chosen_by": chosen_by if fidelity is None else f"{chosen_by}, --bits auto --fidelity {fidelity}",
        "why": why,
        "trained_on": len(train),
        "query_sample": len(sample[0]) if sample else 0,
        "fidelity": measured_fidelity.to_dict() if measured_fidelity else None,
        "train_cpu_seconds": round(time.process_time() - start[0], 2),
        "train_wall_seconds": round(time.perf_counter() - start[1], 2),
    }
    if tried:
        report["rates_tried"] = tried
    if seeds_tried:
        by = " + ".join(AGREEMENT_LABELS[key] for key in _seed_judged_by(trained.bits_per_image))
        report["why"] += f"; the best of {len(seeds_tried)} training seeds by {by} fidelity on the held-out images"
        report["seeds_tried"] = seeds_tried
    return TrainedCodec(trained, report)


def _smallest_rate(
    fit: Callable[[int], tuple[Codec, Fidelity | None]],
    target: float,
    dim: int,
    tried: list[dict[str, Any]],
) -> tuple[Codec, Fidelity | None]:
    """Bisect :data:`AUTO_RATES` (those a ``dim``-d embedding allows) for the smallest rate whose
    text→image fidelity (image→image without queries) reaches ``target``; the largest if none does.
    ``fit(rate)``: the codec trained at ``rate`` and its measured fidelity. Assumes fidelity grows
    with the rate, as measured (``docs/codecs.md`` §11)."""
    rates = [rate for rate in AUTO_RATES if rate <= 4 * dim] or [AUTO_RATES[0]]  # pqvae-pca: 4 bits per axis at most
    results: dict[int, tuple[Codec, Fidelity | None]] = {}

    def score(index: int) -> float:
        rate = rates[index]
        if rate not in results:
            results[rate] = fit(rate)
            measured = results[rate][1]
            tried.append({"bits_per_image": rate, **(measured.to_dict() if measured else {})})
        measured = results[rate][1]
        return 0.0 if measured is None else _score(measured)

    low, high = 0, len(rates) - 1
    if score(high) < target:
        return results[rates[high]]
    while low < high:
        middle = (low + high) // 2
        if score(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return results[rates[low]]


def _seed_judged_by(rate: int) -> tuple[str, ...]:
    """The held-out agreements ``seed_candidates`` sums to judge a training seed at ``rate``:
    text→image, and image→image too where image queries have a decoder of their own (from
    :data:`ITEM_TERMS_FROM_BITS`, docs/codecs.md §11q)."""
    return tuple(AGREEMENT_LABELS) if rate >= ITEM_TERMS_FROM_BITS else ("text_to_image",)


def _seed_score(measured: Fidelity, rate: int) -> float:
    """The sum of :func:`_seed_judged_by`'s agreements (a query-weighted codec always has text→image)."""
    return sum(getattr(measured, key) or 0.0 for key in _seed_judged_by(rate))


def _score(measured: Fidelity) -> float:
    """The figure ``--fidelity`` targets: text→image agreement, image→image without sample queries."""
    return measured.text_to_image if measured.text_to_image is not None else measured.image_to_image
