"""Codecs: embeddings ⇄ codes of a few bytes, by name.

``train_codec("pq", x, bits_per_image=64)`` trains one (``queries=`` a sample of query embeddings
makes it query-weighted, :mod:`semdb.codecs.query_weighted`); ``load_codec(name, state)`` restores
one from :meth:`Codec.to_bytes`. Codecs are imported lazily so that listing them costs nothing.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np

from semdb.codecs.base import Codec, as_embeddings, check_bits
from semdb.errors import InvalidArgumentError

# name -> "module:ClassName"; extend with register_codec().
_CODECS: dict[str, str] = {
    "pcapq": "semdb.codecs.pcapq:PCAPQCodec",
    "pq": "semdb.codecs.faiss_codecs:PQCodec",
    "opq": "semdb.codecs.faiss_codecs:OPQCodec",
    "rq": "semdb.codecs.faiss_codecs:RQCodec",
    "pqvae": "semdb.codecs.pqvae:PQVAECodec",
    "pqvae-pca": "semdb.codecs.pqvae:PrincipalPQVAECodec",
}

DEFAULT_CODEC = "pq"


def list_codecs() -> list[str]:
    """Names of the registered codecs, sorted."""
    return sorted(_CODECS)


def register_codec(name: str, target: str) -> None:
    """Register a codec class under ``name``; ``target`` is ``"module:ClassName"``."""
    _CODECS[name] = target


def codec_class(name: str) -> type[Codec]:
    """The codec class registered under ``name``; the error lists the valid names."""
    try:
        target = _CODECS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown codec {name!r}; choose one of: {', '.join(list_codecs())}") from None
    module_name, class_name = target.split(":")
    cls: type[Codec] = getattr(importlib.import_module(module_name), class_name)
    return cls


def train_codec(
    name: str,
    embeddings: np.ndarray,
    bits_per_image: int,
    seed: int = 0,
    queries: np.ndarray | None = None,
    **hyper_parameters: Any,
) -> Codec:
    """Train codec ``name`` on ``embeddings`` ``(n, d)`` float32 at ``bits_per_image`` bits.

    ``queries``: optional ``(c, d)`` sample of query embeddings (c ≥ 2); the codec is then trained
    in their weighted space (:class:`~semdb.codecs.query_weighted.QueryWeightedCodec`).
    ``hyper_parameters``: passed to codecs that take them (the pqvae family, e.g. ``steps=500``).
    """
    check_bits(bits_per_image)
    cls = codec_class(name)
    x = as_embeddings(embeddings)
    if len(x) == 0:
        raise InvalidArgumentError("cannot train a codec on zero embeddings")
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.train).parameters.values())
    if hyper_parameters and not takes_keywords:
        raise InvalidArgumentError(
            f"codec {name} takes no hyper-parameters (got {', '.join(sorted(hyper_parameters))})"
        )
    if queries is None:
        return cls.train(x, bits_per_image, seed=seed, **hyper_parameters)
    from semdb.codecs.query_weighted import QueryWeightedCodec

    return QueryWeightedCodec.train(x, bits_per_image, seed=seed, base_name=name, queries=queries, **hyper_parameters)


def load_codec(name: str, state: bytes) -> Codec:
    """Restore a codec of type ``name`` from the bytes of :meth:`Codec.to_bytes` (query-weighted or not)."""
    cls = codec_class(name)
    from semdb.codecs.query_weighted import MAGIC, QueryWeightedCodec

    if not state.startswith(MAGIC):
        return cls.from_bytes(state)
    codec = QueryWeightedCodec.from_bytes(state)
    if codec.base_name != name:
        raise InvalidArgumentError(f"the stored codec is a query-weighted {codec.base_name}, not {name}")
    return codec


__all__ = [
    "DEFAULT_CODEC",
    "Codec",
    "codec_class",
    "list_codecs",
    "load_codec",
    "register_codec",
    "train_codec",
]
