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

from semdb.codecs.base import MAX_DIM, Codec, CodecStateError, as_embeddings, check_bits, check_state_size, damaged
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


def load_codec(name: str, state: bytes, bits_per_image: int | None = None) -> Codec:
    """Restore a codec of type ``name`` from the bytes of :meth:`Codec.to_bytes` (query-weighted or
    not); ``bits_per_image``: the rate the caller has on record, which the codec must have.

    Both come from a database, which may be damaged or crafted: whatever is wrong, this raises
    :class:`CodecStateError` with a one-line message. Each ``from_bytes`` checks its format's fields
    and sizes before allocating what they describe; any other error escaping it (a bug, or a case
    those checks miss) is converted here as a last resort. The restored codec must then code one
    vector into a code of its size and back.
    """
    try:
        cls = codec_class(name)
    except InvalidArgumentError as error:
        raise CodecStateError(f"stored codec state is damaged: {error}") from None
    state = check_state_size(name, state)
    from semdb.codecs.query_weighted import MAGIC, QueryWeightedCodec

    try:
        if state.startswith(MAGIC):
            weighted = QueryWeightedCodec.from_bytes(state)
            if weighted.base_name != name:
                raise damaged(name, f"state is a query-weighted {weighted.base_name}, not {name}")
            codec: Codec = weighted
        else:
            codec = cls.from_bytes(state)
        _check_restored(name, codec)
        if bits_per_image is not None and codec.bits_per_image != bits_per_image:
            raise damaged(name, f"state codes {codec.bits_per_image} bits per image, not {bits_per_image} as on record")
    except CodecStateError:
        raise
    except Exception as error:  # the last resort described above
        detail = str(error).splitlines()[0] if str(error) else ""
        raise damaged(name, f"state could not be restored ({type(error).__name__}: {detail[:200]})") from None
    return codec


def registry_name(codec: Codec) -> str:
    """The name ``codec`` is stored and restored under: a query-weighted codec's is its base codec's
    (:func:`load_codec` recognises the weighted state)."""
    return str(getattr(codec, "base_name", codec.name))


def _check_restored(name: str, codec: Codec) -> None:
    """Fail unless ``codec`` codes a ``(1, dim)`` vector into ``(1, code_size)`` uint8 and back."""
    if not 1 <= codec.dim <= MAX_DIM or codec.code_size * 8 != codec.bits_per_image:
        raise damaged(name, f"restored codec has dim={codec.dim}, {codec.bits_per_image} bits")
    probe = np.zeros((1, codec.dim), dtype=np.float32)
    probe[0, 0] = 1.0
    codes = codec.encode(probe)
    if codes.shape != (1, codec.code_size) or codes.dtype != np.uint8:
        raise damaged(name, f"restored codec makes codes of shape {codes.shape}, not (1, {codec.code_size})")
    decoded = codec.decode(codes)
    if decoded.shape != (1, codec.dim):
        raise damaged(name, f"restored codec decodes to shape {decoded.shape}, not (1, {codec.dim})")


__all__ = [
    "Codec",
    "CodecStateError",
    "codec_class",
    "list_codecs",
    "load_codec",
    "register_codec",
    "registry_name",
    "train_codec",
]
