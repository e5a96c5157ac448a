"""The text tower alone: what a text query needs, loaded without the image tower or open_clip.

A cold ``semdb search "text"`` used to spend most of its time importing open_clip (which imports
torchvision and ``torch._dynamo``) and building the whole CLIP model, of which a text query uses
half. For the bundled ``tiny-fashion`` model the text tower *is* all-MiniLM-L6-v2 with mean pooling
and no projection (``assets/tiny_fashion.json``), so :class:`MiniLMTextEncoder` runs that BERT
in numpy, tokenising as open_clip's ``HFTokenizer`` does; a test checks that its embeddings equal
the full model's. Other models load in full (:func:`load_text_encoder`).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from semdb.encoder import BUNDLED_MODEL
from semdb.errors import ModelUnavailableError


class TextEncoder(Protocol):
    """What a text query needs from a model."""

    spec: str
    dim: int

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` strings → ``(n, dim)`` float32, each row L2-normalised."""
        ...


def _clean(text: str) -> str:
    """open_clip's ``whitespace`` cleaning of a query (ftfy, HTML entities, runs of whitespace)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split())


class MiniLMTextEncoder:
    """The text tower of ``tiny-fashion``: all-MiniLM-L6-v2 (a 6-layer BERT), mean-pooled, in numpy.

    The weights are read with ``safetensors.numpy`` and the WordPiece tokenizer with ``tokenizers``
    (the same ``tokenizer.json`` transformers' fast tokenizer reads), so neither torch nor
    transformers is imported: a cold text query pays for neither. Each text runs at its own
    length, which gives what the padded, attention-masked batch of the full model gives.
    """

    def __init__(self, spec: str = BUNDLED_MODEL) -> None:
        from safetensors.numpy import load_file
        from threadpoolctl import ThreadpoolController
        from tokenizers import Tokenizer

        from semdb.bundled import CONFIG_FILE, text_model_dir

        folder = text_model_dir()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ModelUnavailableError(f"{folder} does not hold the BERT model all-MiniLM-L6-v2 is")
        self.spec = spec
        self.dim = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        context_length = int(json.loads(CONFIG_FILE.read_text(encoding="utf-8"))["text_cfg"]["context_length"])
        # Copied out of the file's buffer: numpy only hands aligned arrays to BLAS (the unaligned
        # views safetensors gives made each product 50x slower); dense weights stored transposed.
        self.weights = {
            name: np.ascontiguousarray(value.T if name.endswith("dense.weight") or ".self." in name else value)
            for name, value in load_file(str(folder / "model.safetensors")).items()
            if name != "embeddings.position_ids"
        }
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(context_length)
        self._blas = ThreadpoolController()

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (x - mean) / np.sqrt(variance + self.eps)
        return normed * self.weights[name + ".weight"] + self.weights[name + ".bias"]

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.weights[name + ".weight"] + self.weights[name + ".bias"]

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens`` ``(L,)`` int → the mean of the last hidden states, ``(dim,)`` float32."""
        w = self.weights
        length = len(tokens)
        x = (
            w["embeddings.word_embeddings.weight"][tokens]
            + w["embeddings.position_embeddings.weight"][:length]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        head = self.dim // self.heads
        for number in range(self.layers):
            prefix = f"encoder.layer.{number}."
            q, k, v = (
                self._dense(x, prefix + f"attention.self.{part}").reshape(length, self.heads, head).transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(head)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context = (scores / scores.sum(axis=-1, keepdims=True)) @ v
            attended = self._dense(
                context.transpose(1, 0, 2).reshape(length, self.dim), prefix + "attention.output.dense"
            )
            x = self._layer_norm(attended + x, prefix + "attention.output.LayerNorm")
            inner = self._dense(x, prefix + "intermediate.dense").astype(np.float64)
            inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))  # BERT's exact GELU
            x = self._layer_norm(
                self._dense(inner.astype(np.float32), prefix + "output.dense") + x, prefix + "output.LayerNorm"
            )
        return x.mean(axis=0)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` strings → ``(n, dim)`` float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch([_clean(text) for text in texts])
        # One BLAS thread: a query's products are tiny, and on a busy 2-core machine OpenBLAS's
        # threads spun against each other (36 products of 8 x 384 by 384 x 1536: 420 ms, 25 ms on one).
        with self._blas.limit(limits=1, user_api="blas"):
            pooled = np.stack([self._embed(np.asarray(encoding.ids, dtype=np.int64)) for encoding in encodings])
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    """``erf`` elementwise (float64), by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7, below
    float32's resolution of the GELU it feeds); numpy has no erf, and ``math.erf`` one element at a
    time was half of a query's encoding time."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def has_text_tower(spec: str) -> bool:
    """Whether the model ``spec`` names has a text tower that loads alone (else it loads whole)."""
    return spec == BUNDLED_MODEL


def load_text_encoder(spec: str, device: str | None = None) -> TextEncoder:
    """A model that encodes texts: the text tower alone for ``tiny-fashion`` (numpy, on the CPU
    whatever ``device``: a query is a few tokens), else the whole model on ``device``."""
    if has_text_tower(spec):
        return MiniLMTextEncoder(spec)
    from semdb.encoder import load_encoder

    return load_encoder(spec, device=device)
