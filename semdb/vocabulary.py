"""The generic query sample: 998 short query-like texts shipped with semdb, no network needed.

Codecs spend their bits where queries look (:mod:`semdb.codecs.query_weighted`), and fidelity is
measured on text queries (:mod:`semdb.fidelity`); both need a sample of queries before any user has
asked one. ``assets/query_vocabulary.json`` holds, for each of the 998 ImageNet classes of the CuPL
descriptions (clip-benchmark 1.6.2, MIT licence — the licence text is in the asset), the prompt
``"a photo of a {class}."``: short texts shaped like queries, grouped by class so that a benchmark
can leave out the classes it judges on. (CuPL descriptions in the sample, or more templates, did
worse: ``scripts/build_query_vocabulary.py``.) Built by that script; embedded by the database's own
text tower when its codec is trained.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from pathlib import Path

import numpy as np

from semdb.encoder import Encoder
from semdb.errors import InvalidArgumentError

VOCABULARY_FILE = Path(__file__).resolve().parent / "assets" / "query_vocabulary.json"


@functools.cache
def _classes() -> dict[str, tuple[str, ...]]:
    """Class name → its texts, as stored in the asset."""
    data = json.loads(VOCABULARY_FILE.read_text(encoding="utf-8"))
    return {name: tuple(texts) for name, texts in data["classes"].items()}


def vocabulary_classes() -> list[str]:
    """The class names the vocabulary's texts are grouped by, sorted."""
    return sorted(_classes())


def vocabulary(exclude: Collection[str] = ()) -> list[str]:
    """The vocabulary's texts, class by class, leaving out the classes named in ``exclude``."""
    unknown = set(exclude) - set(_classes())
    if unknown:
        raise InvalidArgumentError(f"not classes of the query vocabulary: {', '.join(sorted(unknown)[:5])}")
    return [text for name, texts in sorted(_classes().items()) if name not in exclude for text in texts]


def query_sample(encoder: Encoder, limit: int | None = None, exclude: Collection[str] = ()) -> np.ndarray:
    """``(c, d)`` float32: :func:`vocabulary` embedded by ``encoder``'s text tower (L2-normalised);
    ``limit``: at most this many texts, evenly spaced through the vocabulary (so across its classes)."""
    texts = vocabulary(exclude)
    if limit is not None and limit < len(texts):
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, limit).round().astype(int)]
    embeddings: np.ndarray = np.ascontiguousarray(encoder.encode_texts(texts), dtype=np.float32)
    return embeddings
