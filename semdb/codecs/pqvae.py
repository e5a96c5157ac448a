"""PQVAE-shared: the seed paper's learned codec (``pqvae``).

An MLP encoder lifts a ``(d,)`` embedding to a latent of ``M`` sub-vectors of ``latent_dim`` values;
every sub-vector is replaced by its nearest entry of ONE codebook of ``2**b`` entries shared by all
sub-vectors (straight-through gradient), and an MLP decoder maps the quantised latent back to the
embedding space. A code is the ``M = bits_per_image / b`` codebook indices of ``b`` bits each
(``codebook_bits``: 2 up to 64 bits per image, else 8; see :func:`default_codebook_bits`),
packed into exactly ``bits_per_image / 8`` bytes.

Loss, as in the paper: ``10·(1 − cos(x̂, x)) + ‖sg(z) − q‖² + 0.25·‖z − sg(q)‖²``, plus one measured
addition (``docs/codecs.md``): a similarity-preservation term ``‖x̂ Xᵀ − x Xᵀ‖²`` over the batch, which
asks the reconstruction to score every other item of the batch as the original does — the quantity
retrieval ranks by — rather than only to point the same way.

Anchor similarity distillation (``anchors``): ``K`` = 512 unit-norm k-means centroids of the
training set (FAISS, seeded; fixed during training, not stored) stand in for the queries a database
will see, and ``KL(softmax(A·x/τ) ‖ softmax(A·x̂/τ))`` at τ = 0.1 asks x̂ to rank them as x does.
It needs no queries, so ``semdb ingest`` trains with it too. Measured on CuPL at 3000 steps
(``benchmarks/pqvae_ablation.py``, vs ``anchors=0``): zero-shot +.034 / +.008–.015 / +.002 and
mAP@100 +.026 / +.012–.013 / +.008 at 32 / 64 (two seeds) / 128 bits, 10-recall@10 −.04 to +.00;
an MSE on the raw anchor scores (weight 100 or 1000), or the KL at weight 3–10, hurt all three.

Departures from the paper, each for training speed or codebook health on 2 CPU cores: residual MLPs
sized to the input (hidden width ``max(d, 2·latent)`` capped at 256) instead of 12 M-parameter
transposed convolutions; Adam at 2e-3 with cosine decay for a fixed number of steps instead of
1e-5 for 100 epochs; the codebook initialised by k-means on the first encoder outputs; codewords
left unused for ``restart_every`` steps restarted on random encoder outputs.

**The principal encoder** (``encoder="principal"``, registered as codec ``pqvae-pca``,
:class:`PrincipalPQVAECodec`): a linear encoder onto the leading principal axes of the training
set, scaled per sub-vector, its inverse as the decoder and the shared codebook by k-means — closed
form, seconds to train. It generalises to classes the codec never saw far better than the MLP (on
CuPL, trained on 800 classes and tested on 198 others, it beats pq, opq and rq at every rate), and,
query-weighted and fine-tuned, meets the project's rate–accuracy goals there (``docs/codecs.md``
§00). Its decoder is linear, so its codes are searched in FAISS directly (:meth:`PQVAECodec.search_index`).
The MLP stays the default: on embeddings that live in few dimensions (the bundled model's), one
shared codebook over many near-empty sub-vectors does poorly.

Training is seeded and single-threaded: the same data and seed give the same codec. State is
safetensors, with the hyper-parameters as JSON in its metadata.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from typing import Any, ClassVar, Self

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn import functional as F

from semdb.codecs.base import (
    MAX_BITS,
    MAX_DIM,
    Codec,
    as_embeddings,
    check_bits,
    check_state_bits,
    check_state_int,
    check_state_size,
    damaged,
)
from semdb.codecs.faiss_codecs import byte_aligned_pq, index_holding, transformed_index
from semdb.errors import InvalidArgumentError

ENCODERS = ("mlp", "principal")
PRINCIPAL_CODEBOOK_BITS = 4  # the principal encoder's default: 16-word codebook (as pcapq's)
CODEBOOK_BITS = 8  # default bits per sub-vector: one byte each, so any multiple of 8 bits fits
PACKABLE_CODEBOOK_BITS = (1, 2, 4, 8)  # divisors of 8: indices pack into whole bytes
# Bounds on a stored state (beyond those of semdb.codecs.base): its safetensors JSON header, and the
# latent values per embedding (M x latent_dim; 16 384 bits of 1-bit words x 16 = 262 144).
MAX_HEADER_BYTES = 2**20
MAX_LATENT = 2**18


@dataclass(frozen=True)
class PQVAEConfig:
    """Hyper-parameters of a PQVAE codec (stored with its weights)."""

    dim: int
    bits_per_image: int
    latent_dim: int = 16
    codebook_bits: int = 0  # the shared codebook has 2**codebook_bits entries; 0: see default_codebook_bits
    hidden: int = 0  # 0: chosen from dim and the latent size, see :func:`default_hidden`
    steps: int = 0  # 0: chosen from the training set size, see :func:`default_steps`
    batch_size: int = 512
    learning_rate: float = 2e-3
    cosine_weight: float = 10.0
    commitment_weight: float = 0.25
    similarity_weight: float = 10.0
    restart_every: int = 200
    # Anchor similarity distillation (0 anchors: off; see :func:`_anchor_loss`): ``anchors``
    # k-means centroids of the training set; KL between the softmax(τ) similarity profiles of x and
    # x̂ over them, and/or MSE between the raw similarities.
    anchors: int = 512
    anchor_temperature: float = 0.1
    anchor_kl_weight: float = 1.0
    anchor_mse_weight: float = 0.0
    # "mlp": learned residual MLPs. "principal": a fixed linear encoder onto the principal axes of the
    # training set (mean direction first, one scale per sub-vector), its inverse as the decoder, and
    # the shared codebook by k-means; no gradient steps unless ``steps`` is set (:func:`_principal_init`).
    encoder: str = "mlp"
    # Trained in a query-weighted space (semdb.codecs.query_weighted): the weight of the same cosine +
    # similarity reconstruction loss measured back in the space the items are searched in (``x̂' W⁻¹``
    # against ``x``), which keeps the directions in which items differ for item→item search. No
    # effect when trained unweighted (the loss is already measured there). docs/codecs.md §11f.
    plain_weight: float = 0.0
    # 1: a second linear decoder, for item queries, trained by the ``plain_weight`` term in the
    # searched space while the first decoder keeps the weighted loss alone (principal encoder only;
    # encoder and codebook learn from both). docs/codecs.md §11g.
    item_decoder: int = 0
    # 1: after training, the second decoder's map is refitted by least squares (ridge 1e-3 of the
    # mean diagonal) from the training items' quantised latents (plus its shift) onto their
    # normalised embeddings in the searched space: the best linear decoder for those codes.
    item_refit: int = 0

    @property
    def subvectors(self) -> int:
        """``M``: sub-vectors (= code bytes) per embedding."""
        return self.bits_per_image // self.codebook_bits

    @property
    def codebook_size(self) -> int:
        """Entries of the shared codebook."""
        return int(2**self.codebook_bits)

    @property
    def hidden_width(self) -> int:
        """The MLP width actually used."""
        return self.hidden or default_hidden(self.dim, self.subvectors * self.latent_dim)


def default_steps(n_train: int, batch_size: int) -> int:
    """Minibatch steps for ``n_train`` vectors: about 30 epochs, at least 200 steps (small sets
    still need that many to fit) and at most 3000 (≈ 13 epochs of 120k, about 2 minutes on 2 busy
    cores; on CuPL at 64 bits 3000 steps instead of 1000 lift zero-shot .723 → .796)."""
    return int(min(3000, max(200, 30 * n_train // batch_size)))


def default_codebook_bits(bits_per_image: int) -> int:
    """Bits per sub-vector: 2 (a 4-word shared codebook) up to 64 bits per image, else 8.

    Small shared codebooks with many sub-vectors are the paper's setting (n_e = 4 by default).
    Measured on CuPL (3000 steps; ``docs/codecs.md``), zero-shot / mAP@100 with 2-, 4- and 8-bit words:
    32 bits .633 / .461, .618 / .437, .542 / .385; 64 bits .832 / .613, .803 / .574, .804 / .569;
    128 bits .920 / .733, .913 / .718, .926 / .748 — so 8-bit words from 128 bits on.
    """
    return 2 if bits_per_image <= 64 else CODEBOOK_BITS


def principal_subvector_dims(bits_per_image: int) -> int:
    """Axes per sub-vector of the principal encoder (16-word codebook): 8 up to 32 bits per image
    (half a bit per axis), 6 up to 64, then 5 — more bits buy finer words on a few more axes.

    Chosen on a validation split of the CuPL *training* classes (codecs fitted on 600 of the 800,
    judged on the other 200; never the held-out 198), zero-shot / mAP@100 with 4–8 axes: at 32 bits
    8 axes .717 / .640 (7: .705 / .678); at 64 bits 6 axes .919 / .847 (8: .905 / .827); at 128
    bits 5 axes .971 / .936 (8: .962 / .921).
    """
    return 8 if bits_per_image <= 32 else 6 if bits_per_image <= 64 else 5


def default_hidden(dim: int, latent: int) -> int:
    """MLP width for ``dim``-d embeddings and a latent of ``latent`` values: wide enough for both,
    capped at 256 so that 120k embeddings train in minutes on a busy 2-core machine (width 768
    took 0.67 s a step there)."""
    return int(min(256, max(64, dim, 2 * latent)))


class ResidualMLP(nn.Module):
    """``(n, d_in)`` → ``(n, d_out)``: a linear stem, one pre-norm residual GELU block, a linear head."""

    def __init__(self, d_in: int, width: int, d_out: int) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, d_in)`` → ``(n, d_out)``."""
        h = self.stem(x)
        out: torch.Tensor = self.head(h + self.block(h))
        return out


class ShiftedLinear(nn.Module):
    """``(n, m)`` → ``(n, d)``: ``W (z + β)``, the principal encoder's decoder. Its offset acts in
    the latent space, so a search can fold it into the codebook (:meth:`PQVAECodec.search_index`)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.shift = nn.Parameter(torch.zeros(d_in))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(n, m)`` → ``(n, d)``."""
        out: torch.Tensor = self.linear(z + self.shift)
        return out


class PQVAE(nn.Module):
    """Encoder, one shared codebook ``(2**8, latent_dim)``, decoder."""

    def __init__(self, config: PQVAEConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.subvectors * config.latent_dim
        self.encoder: nn.Module
        self.decoder: nn.Module
        self.item_decoder: ShiftedLinear | None = None
        if config.encoder == "principal":
            self.encoder, self.decoder = nn.Linear(config.dim, latent), ShiftedLinear(latent, config.dim)
            if config.item_decoder:
                self.item_decoder = ShiftedLinear(latent, config.dim)
        else:
            self.encoder = ResidualMLP(config.dim, config.hidden_width, latent)
            self.decoder = ResidualMLP(latent, config.hidden_width, config.dim)
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, config.latent_dim) * 0.1)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` → sub-vectors ``(n, M, latent_dim)``."""
        return self.encoder(x).view(len(x), self.config.subvectors, self.config.latent_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Sub-vectors ``(n, M, e)`` → indices ``(n, M)`` int64 of the nearest codewords (L2)."""
        flat = z.reshape(-1, z.shape[-1])
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)
        return distances.argmin(1).view(z.shape[:-1])

    def reconstruct(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(n, M)`` → unit-norm embeddings ``(n, d)``."""
        quantised = self.codebook[indices].reshape(len(indices), -1)
        return F.normalize(self.decoder(quantised), dim=-1)


class PQVAECodec(Codec):
    """The learned PQVAE-shared codec: ``bits_per_image / 8`` codebook indices of one byte each."""

    name = "pqvae"
    trains_in_weighted_space = True

    def __init__(self, model: PQVAE) -> None:
        super().__init__(model.config.dim, model.config.bits_per_image)
        self.model = model.eval()

    @classmethod
    def train(
        cls,
        embeddings: np.ndarray,
        bits_per_image: int,
        seed: int = 0,
        *,
        unweight: np.ndarray | None = None,
        **hyper_parameters: float,
    ) -> Self:
        """Train on ``embeddings`` ``(n, d)`` float32 (L2-normalised); ``hyper_parameters`` override
        :class:`PQVAEConfig` fields (e.g. ``steps=500``). ``unweight`` ``(d, d)``: with the
        embeddings query-weighted (``x W``), ``W⁻¹``, which maps them back to the searched space
        (``plain_weight``); given by :class:`~semdb.codecs.query_weighted.QueryWeightedCodec`."""
        # torch refuses read-only numpy memory (e.g. codes read from the database): copy it then.
        x = torch.from_numpy(np.require(as_embeddings(embeddings), requirements="W"))
        check_bits(bits_per_image)
        try:
            config = PQVAEConfig(dim=x.shape[1], bits_per_image=bits_per_image, **hyper_parameters)  # type: ignore[arg-type]
        except TypeError as error:
            raise InvalidArgumentError(f"unknown pqvae hyper-parameter: {error}") from None
        if config.encoder not in ENCODERS:
            raise InvalidArgumentError(f"pqvae encoder must be one of {ENCODERS}, got {config.encoder!r}")
        principal = config.encoder == "principal"
        if principal and "codebook_bits" not in hyper_parameters:
            # 16-word codebooks, or 256-word ones where d is too small for bits / 4 sub-vectors.
            fits = bits_per_image // PRINCIPAL_CODEBOOK_BITS <= config.dim
            config = replace(config, codebook_bits=PRINCIPAL_CODEBOOK_BITS if fits else CODEBOOK_BITS)
        if principal and "latent_dim" not in hyper_parameters:
            per_subvector = config.dim // (bits_per_image // config.codebook_bits)
            config = replace(config, latent_dim=max(1, min(principal_subvector_dims(bits_per_image), per_subvector)))
        if not config.codebook_bits:
            config = replace(config, codebook_bits=default_codebook_bits(bits_per_image))
        if config.codebook_bits not in PACKABLE_CODEBOOK_BITS:
            raise InvalidArgumentError(
                f"pqvae codebook_bits must be one of {PACKABLE_CODEBOOK_BITS} (indices pack into whole bytes), "
                f"got {config.codebook_bits}"
            )
        if principal and config.subvectors * config.latent_dim > config.dim:
            raise InvalidArgumentError(
                f"pqvae with the principal encoder keeps {config.subvectors} x {config.latent_dim} axes, more than the "
                f"{config.dim} of the embeddings: choose fewer --bits"
            )
        if not config.steps and not principal:
            config = replace(config, steps=default_steps(len(x), min(config.batch_size, len(x))))
        threads = torch.get_num_threads()
        # One thread: on a shared 2-core machine torch's thread pool spins against other work (10x
        # slower here under load), and a fixed thread count keeps training bit-reproducible.
        torch.set_num_threads(1)
        try:
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model = PQVAE(config)
            if principal:
                _principal_init(model, x)
            plain = torch.from_numpy(np.ascontiguousarray(unweight, np.float32)) if unweight is not None else None
            _fit(model, x, generator, plain if config.plain_weight else None)
        finally:
            torch.set_num_threads(threads)
        return cls(model)

    @torch.inference_mode()
    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` float32 → ``(n, bits/8)`` uint8 codebook indices."""
        x = torch.from_numpy(np.require(as_embeddings(embeddings, self.dim), requirements="W"))
        codes = [self.model.nearest(self.model.latent(batch)) for batch in x.split(4096)]
        if not codes:
            return np.empty((0, self.code_size), dtype=np.uint8)
        return pack_indices(torch.cat(codes).numpy(), self.model.config.codebook_bits)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, bits/8)`` uint8 → ``(n, d)`` float32 unit-norm reconstructions."""
        indices = torch.from_numpy(unpack_indices(self.check_codes(codes), self.model.config.codebook_bits))
        parts = [self.model.reconstruct(batch) for batch in indices.split(4096)]
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return torch.cat(parts).numpy()

    def to_bytes(self) -> bytes:
        """safetensors weights with the :class:`PQVAEConfig` as JSON metadata."""
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        return bytes(save_safetensors(tensors, metadata={"pqvae": json.dumps(asdict(self.model.config))}))

    @classmethod
    def from_bytes(cls, state: bytes) -> Self:
        """Inverse of :meth:`to_bytes`; raises :class:`~semdb.codecs.base.CodecStateError` on damaged
        or foreign bytes. The config and the tensor table are checked against each other before
        any weight is allocated, so a state cannot claim more memory than its own size."""
        state = check_state_size(cls.name, state)
        table, metadata, data_bytes = _safetensors_header(cls.name, state)
        config = _stored_config(cls.name, metadata)
        with torch.device("meta"):  # the shapes of the weights, allocating none
            model = PQVAE(config)
        _check_tensor_table(cls.name, table, model.state_dict(), data_bytes)
        try:
            tensors = load_safetensors(state)
        except SafetensorError as error:
            raise damaged(cls.name, f"weights are unreadable: {error}") from None
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise damaged(cls.name, f"state has non-finite values in weight {key}")
        model.load_state_dict(tensors, assign=True)
        return cls(model)

    def search_index(self, codes: np.ndarray) -> faiss.Index:
        """An inner-product index over ``codes`` ``(n, bits/8)``: a copy of :attr:`scanner` holding
        them, or, for the MLP decoder, the decoded vectors in a flat index (:meth:`Codec.search_index`)."""
        if self.scanner is None:
            return super().search_index(codes)
        return index_holding(self.scanner, self.check_codes(codes))

    @cached_property
    def scanner(self) -> faiss.Index | None:
        """For the principal encoder, an empty index that scores the codes themselves; built once.

        Its decoder's output ``y = W (ẑ + β)`` scores ``<q, y> = <Wᵀ q, ẑ + β>``, so the index is
        FAISS's ``IndexPreTransform(Wᵀ, IndexPQ)`` whose sub-quantiser ``j`` holds the shared
        codebook shifted by ``β_j`` — ``bits/8`` bytes per item in memory instead of a float copy,
        scanned a byte at a time (:func:`~semdb.codecs.faiss_codecs.byte_aligned_pq`). None for the
        MLP decoder.
        """
        decoder = self.model.decoder
        return self._scanner_of(decoder) if isinstance(decoder, ShiftedLinear) else None

    @cached_property
    def item_scanner(self) -> faiss.Index | None:
        """:attr:`scanner` for the second decoder (``item_decoder``: item queries), or None without one."""
        item = self.model.item_decoder
        return None if item is None else self._scanner_of(item)

    def _scanner_of(self, decoder: ShiftedLinear) -> faiss.Index:
        weight, centroids = linear_decoder_arrays(self.model, decoder)
        scanner: faiss.Index = transformed_index(
            weight.T, byte_aligned_pq(centroids, self.model.config.codebook_bits, first_index_high=True)
        )
        return scanner

    def item_search_index(self, codes: np.ndarray) -> faiss.Index | None:
        """An inner-product index over ``codes`` ``(n, bits/8)`` scoring :meth:`item_vectors` (the
        second decoder's output) from the codes themselves, or None without a second decoder."""
        scanner = self.item_scanner
        return None if scanner is None else index_holding(scanner, self.check_codes(codes))

    def scored_vectors(self, codes: np.ndarray) -> np.ndarray:
        """What :meth:`search_index` scores: with the linear decoder its output before normalisation
        (the direction of :meth:`decode`), else :meth:`decode`."""
        if self.scanner is None:
            return self.decode(codes)
        return self._decode_linear(self.check_codes(codes))

    @property
    def scores_unit_vectors(self) -> bool:
        """True unless the codes are scanned through the linear decoder (:attr:`scanner`)."""
        return self.scanner is None

    @torch.inference_mode()
    def item_vectors(self, codes: np.ndarray) -> np.ndarray | None:
        """``(n, bits/8)`` → ``(n, d)``: the second decoder's output (for item queries, in the
        searched space), or None without one (``item_decoder``)."""
        item = self.model.item_decoder
        if item is None:
            return None
        indices = torch.from_numpy(unpack_indices(self.check_codes(codes), self.model.config.codebook_bits))
        vectors: np.ndarray = item(self.model.codebook[indices].reshape(len(indices), -1)).numpy()
        return vectors

    @torch.inference_mode()
    def _decode_linear(self, codes: np.ndarray) -> np.ndarray:
        """``(n, bits/8)`` uint8 → ``(n, d)`` float32: the decoder's output, not normalised."""
        indices = torch.from_numpy(unpack_indices(codes, self.model.config.codebook_bits))
        quantised = self.model.codebook[indices].reshape(len(indices), -1)
        decoded: np.ndarray = self.model.decoder(quantised).numpy()
        return decoded

    def describe(self) -> str:
        """E.g. ``pqvae 64 bits (8 x 256-word shared codebook)``."""
        config = self.model.config
        layout = f"{config.subvectors} x {config.codebook_size}-word shared codebook"
        return f"{self.name} {self.bits_per_image} bits ({layout})"


class PrincipalPQVAECodec(PQVAECodec):
    """``pqvae-pca``: PQVAE-shared with the closed-form principal encoder (``encoder="principal"``).

    The codebook is shared by 8-d sub-vectors of principal axes scaled to a common spread, 16 words,
    half a bit per kept axis; training is an eigendecomposition and one k-means, seconds on 120k
    embeddings. On CuPL (held-out classes) it beats pq, opq and rq at every rate; on the bundled
    model's Fashion-MNIST embeddings, which live in ~16 dimensions, its mAP falls well below pq's
    (``docs/codecs.md`` §00).
    """

    name = "pqvae-pca"
    # Query-weighted, 500 gradient steps from the closed form with a strong anchor term. Chosen on a
    # validation split of the CuPL training classes (600 fitted, 200 judged; docs/codecs.md §00c):
    # zero-shot / mAP@100 at 32 bits .756 / .755 closed form, .788 / .755 with 500 steps, .851 / .758
    # with anchor KL weight 100 (3: .821, 10: .843, 30: .849, 300: .850); at 64 bits .922 / .854 →
    # .953 / .927; at 128 bits .969 / .893 → .976 / .965. Unweighted, the closed form stays: there
    # the same steps gave .789 / .650, .928 / .853 and .968 / .918 against .717 / .640, .919 / .847
    # and .971 / .936.
    query_weighted_defaults: ClassVar[dict[str, Any]] = {"steps": 500, "anchor_kl_weight": 100.0}

    @classmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0, **hyper_parameters: Any) -> Self:
        """:meth:`PQVAECodec.train` with ``encoder="principal"`` unless overridden."""
        overrides: dict[str, Any] = {"encoder": "principal", **hyper_parameters}
        return super().train(embeddings, bits_per_image, seed, **overrides)


def _safetensors_header(codec: str, state: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Split a safetensors ``state`` → ``(tensor table, metadata, bytes of tensor data)``, checking
    the header's length before reading it."""
    if len(state) < 8:
        raise damaged(codec, f"state is {len(state)} bytes, too short for a safetensors header")
    (size,) = struct.unpack_from("<Q", state)
    if size > min(MAX_HEADER_BYTES, len(state) - 8):
        raise damaged(codec, f"header says its JSON is {size} bytes, in a state of {len(state)}")
    try:
        header = json.loads(state[8 : 8 + size])
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested too deeply
        raise damaged(codec, f"header is not JSON: {error}") from None
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise damaged(codec, "header has no metadata")
    return header, metadata, len(state) - 8 - size


def _stored_config(codec: str, metadata: dict[str, Any]) -> PQVAEConfig:
    """The :class:`PQVAEConfig` in a state's ``metadata``, every field checked (type and bounds)."""
    try:
        values = json.loads(metadata["pqvae"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise damaged(codec, "header has no pqvae config") from None
    if not isinstance(values, dict):
        raise damaged(codec, "config is not a JSON object")
    kinds = {field.name: field.type for field in fields(PQVAEConfig)}
    unknown = sorted(set(values) - set(kinds))
    if unknown or not {"dim", "bits_per_image"} <= set(values):
        raise damaged(codec, f"config has fields {sorted(values)}, not those of a pqvae config")
    for name, value in values.items():
        if kinds[name] == "int":
            low, high = _INT_BOUNDS.get(name, (0, 2**31 - 1))
            check_state_int(codec, name, value, low, high)
        elif kinds[name] == "float" and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise damaged(codec, f"config says {name}={value!r}, not a finite number")
        elif kinds[name] == "str" and not isinstance(value, str):
            raise damaged(codec, f"config says {name}={value!r}, not a string")
    config = PQVAEConfig(**values)
    check_state_bits(codec, config.bits_per_image)
    if config.codebook_bits not in PACKABLE_CODEBOOK_BITS:
        raise damaged(codec, f"config says codebook_bits={config.codebook_bits}, not one of {PACKABLE_CODEBOOK_BITS}")
    if config.encoder not in ENCODERS:
        raise damaged(codec, f"config says encoder={config.encoder!r}, not one of {ENCODERS}")
    latent = config.subvectors * config.latent_dim
    if latent > MAX_LATENT or (config.encoder == "principal" and latent > config.dim):
        raise damaged(codec, f"config says {config.subvectors} x {config.latent_dim} latent values, dim={config.dim}")
    return config


# (low, high) of the stored integer config fields; others must lie in 0..2**31 - 1.
_INT_BOUNDS = {
    "dim": (1, MAX_DIM),
    "bits_per_image": (8, MAX_BITS),
    "latent_dim": (1, MAX_LATENT),
    "hidden": (0, MAX_DIM),
}


def _check_tensor_table(codec: str, table: dict[str, Any], expected: dict[str, torch.Tensor], data_bytes: int) -> None:
    """Check a safetensors tensor ``table`` lists exactly the float32 weights ``expected`` (the
    model's state dict, on the meta device) and that their data fill exactly ``data_bytes``."""
    if set(table) != set(expected):
        odd = sorted(set(table) ^ set(expected))
        raise damaged(codec, f"tensors {odd[:3]} are missing or unexpected for its config")
    spans = []
    for key, tensor in expected.items():
        entry, shape = table[key], list(tensor.shape)
        if not isinstance(entry, dict) or entry.get("dtype") != "F32" or entry.get("shape") != shape:
            raise damaged(codec, f"tensor {key} is not F32 of shape {shape}")
        span = entry.get("data_offsets")
        size = 4 * math.prod(shape)
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
            raise damaged(codec, f"tensor {key} has data offsets {span!r}")
        if span[1] - span[0] != size:
            raise damaged(codec, f"tensor {key} has {span[1] - span[0]} bytes of data, its shape needs {size}")
        spans.append(span)
    spans.sort()
    ends = [0] + [end for _, end in spans]
    if [start for start, _ in spans] != ends[:-1] or ends[-1] != data_bytes:
        raise damaged(codec, f"tensors do not tile its {data_bytes} bytes of data")


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Codebook indices ``(n, M)`` of ``bits`` ∈ {1, 2, 4, 8} bits each → ``(n, M · bits / 8)``
    uint8, first index in the most significant bits of its byte."""
    per_byte = 8 // bits
    grouped = indices.astype(np.uint8).reshape(len(indices), -1, per_byte)
    shifts = (np.arange(per_byte - 1, -1, -1) * bits).astype(np.uint8)
    packed: np.ndarray = np.bitwise_or.reduce(grouped << shifts, axis=2).astype(np.uint8)
    return packed


def unpack_indices(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``(n, B)`` uint8 → ``(n, B · 8 / bits)`` int64."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte - 1, -1, -1) * bits).astype(np.uint8)
    mask = np.uint8(2**bits - 1)
    return ((codes[:, :, None] >> shifts) & mask).reshape(len(codes), -1).astype(np.int64)


def _init_codebook(model: PQVAE, x: torch.Tensor, generator: torch.Generator) -> None:
    """k-means (FAISS, seeded) of the untrained encoder's sub-vectors → the initial codebook.

    With fewer sub-vectors than codewords, the codebook takes them all (cyclically) plus a little
    noise, so no codeword starts dead far from the data.
    """
    with torch.no_grad():
        sample = x[torch.randperm(len(x), generator=generator)[:20_000]]
        sub = model.latent(sample).reshape(-1, model.config.latent_dim).numpy()
        k = model.config.codebook_size
        if len(sub) > k:
            centroids = _kmeans(sub, k, generator)
        else:
            centroids = torch.from_numpy(sub[np.arange(k) % len(sub)])
            centroids = centroids + 0.01 * torch.randn(centroids.shape, generator=generator)
        model.codebook.copy_(centroids)


@torch.no_grad()
def _principal_init(model: PQVAE, x: torch.Tensor) -> None:
    """Set the linear encoder/decoder of a ``principal`` PQVAE from ``x`` ``(n, d)``.

    Encoder: ``z = (B x − μ) / s`` with ``B`` ``(m, d)`` the first ``m = M · latent_dim`` axes of
    :func:`semdb.codecs.pcapq.principal_basis`, ``μ`` their mean and ``s`` one scale per sub-vector
    (the RMS spread of its axes), so that one codebook fits every sub-vector while each keeps the
    shape of its axes' spread. Decoder: the exact inverse on the kept axes, ``x̂ = Bᵀ s (z + μ / s)``.
    Measured on CuPL (query-weighted, closed form): one scale per axis instead gave zero-shot
    +.010–.021 and mAP@100 −.006–.031 at 32–128 bits.
    """
    from semdb.codecs.pcapq import principal_basis

    config = model.config
    m = config.subvectors * config.latent_dim
    basis = torch.from_numpy(principal_basis(x.numpy(), m)).double()  # (m, d)
    projected = x.double() @ basis.T  # (n, m)
    mean = projected.mean(0)
    spread = projected.var(0).view(config.subvectors, config.latent_dim).mean(1).sqrt().clamp(min=1e-8)
    scale = spread.repeat_interleave(config.latent_dim)  # (m,)
    encoder, decoder = model.encoder, model.decoder
    assert isinstance(encoder, nn.Linear) and isinstance(decoder, ShiftedLinear)  # by config.encoder
    encoder.weight.copy_(basis / scale[:, None])
    encoder.bias.copy_(-mean / scale)
    decoder.linear.weight.copy_(basis.T * scale[None, :])
    decoder.shift.copy_(mean / scale)


def _anchor_points(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` unit-norm k-means centroids (FAISS, seeded) of at most 64 per centroid of ``x``
    ``(n, d)`` → ``(min(count, n), d)``: fixed stand-ins for the queries a database will see."""
    count = min(count, len(x))
    sample = x[torch.randperm(len(x), generator=generator)[: 64 * count]].numpy()
    if count == len(sample):
        return F.normalize(torch.from_numpy(sample), dim=-1)
    return F.normalize(_kmeans(sample, count, generator), dim=-1)


def _kmeans(points: np.ndarray, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids ``(k, e)`` of ``points`` ``(n, e)`` float32, ``n > k``: FAISS k-means, 20
    iterations, seeded from ``generator``, allowed to run with few points per centroid."""
    kmeans = faiss.Kmeans(points.shape[1], k, niter=20, seed=int(generator.initial_seed()) % 2**31)
    kmeans.cp.min_points_per_centroid = 1
    kmeans.train(points)
    return torch.from_numpy(kmeans.centroids)


def _anchor_loss(config: PQVAEConfig, anchors: torch.Tensor, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Similarity distillation against fixed ``anchors (K, d)``: ``KL(softmax(A·x/τ) ‖ softmax(A·x̂/τ))``
    (batch mean) weighted by ``anchor_kl_weight``, plus ``anchor_mse_weight · mean((A·x̂ − A·x)²)``."""
    s_recon, s_target = recon @ anchors.T, target @ anchors.T
    loss = recon.new_zeros(())
    if config.anchor_kl_weight:
        tau = config.anchor_temperature
        kl = F.kl_div(
            F.log_softmax(s_recon / tau, dim=-1),
            F.log_softmax(s_target / tau, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        loss = loss + config.anchor_kl_weight * kl
    if config.anchor_mse_weight:
        loss = loss + config.anchor_mse_weight * F.mse_loss(s_recon, s_target)
    return loss


def _reconstruction_loss(config: PQVAEConfig, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cosine_weight · (1 − cos(x̂, x))`` + ``similarity_weight · ‖x̂ Xᵀ − x Xᵀ‖²`` over a batch of
    unit-norm reconstructions ``recon`` and targets ``target`` ``(n, d)``."""
    loss = config.cosine_weight * (1 - (recon * target).sum(1)).mean()
    if config.similarity_weight:
        loss = loss + config.similarity_weight * F.mse_loss(recon @ target.T, target @ target.T)
    return loss


def linear_decoder_arrays(model: PQVAE, decoder: ShiftedLinear) -> tuple[np.ndarray, np.ndarray]:
    """``(W (d, m), centroids (M, K, e))`` float32 of ``model``'s linear ``decoder`` ``W (ẑ + β)``: the
    shared codebook shifted by each sub-vector's part of ``β``, so that ``<q, W (ẑ + β)>`` is the sum
    over sub-vectors of ``<(Wᵀ q)_j, centroid_j>`` (what a PQ over the codes scores)."""
    config = model.config
    weight = decoder.linear.weight.detach().numpy()
    shift = decoder.shift.detach().numpy().reshape(config.subvectors, 1, config.latent_dim)
    centroids = model.codebook.detach().numpy()[None] + shift
    return np.ascontiguousarray(weight, dtype=np.float32), np.ascontiguousarray(centroids, dtype=np.float32)


def _fit(model: PQVAE, x: torch.Tensor, generator: torch.Generator, plain: torch.Tensor | None = None) -> None:
    """Train ``model`` on ``x`` ``(n, d)`` for ``config.steps`` minibatch steps; ``plain`` ``(d, d)``:
    the map of ``x`` back to the searched space, where ``plain_weight`` measures the loss too."""
    config = model.config
    _init_codebook(model, x, generator)
    if not config.steps:  # the closed-form principal encoder: the codebook is all there is to fit
        model.eval()
        return
    anchors = _anchor_points(F.normalize(x, dim=-1), config.anchors, generator) if config.anchors else None
    item = model.item_decoder
    if item is not None:  # starts as the first decoder mapped back to the searched space
        decoder = model.decoder
        assert isinstance(decoder, ShiftedLinear)
        with torch.no_grad():
            weight = decoder.linear.weight if plain is None else plain.T @ decoder.linear.weight
            item.linear.weight.copy_(weight)
            item.shift.copy_(decoder.shift)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps))
    )
    batch_size = min(config.batch_size, len(x))
    usage = torch.zeros(config.codebook_size)
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    model.train()
    for step in range(config.steps):
        if cursor + batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batch = x[order[cursor : cursor + batch_size]]
        cursor += batch_size

        z = model.latent(batch)
        indices = model.nearest(z.detach())
        q = model.codebook[indices]
        straight_through = z + (q - z).detach()
        decoded = model.decoder(straight_through.reshape(len(batch), -1))
        recon, target = F.normalize(decoded, dim=-1), F.normalize(batch, dim=-1)
        loss = (
            _reconstruction_loss(config, recon, target)
            + F.mse_loss(q, z.detach())
            + config.commitment_weight * F.mse_loss(z, q.detach())
        )
        if plain is not None:
            flat = straight_through.reshape(len(batch), -1)
            searched = decoded @ plain if item is None else item(flat)
            plain_recon, plain_target = F.normalize(searched, dim=-1), F.normalize(batch @ plain, dim=-1)
            loss = loss + config.plain_weight * _reconstruction_loss(config, plain_recon, plain_target)
        if anchors is not None:
            loss = loss + _anchor_loss(config, anchors, recon, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()

        usage += torch.bincount(indices.flatten(), minlength=len(usage))
        if config.restart_every and (step + 1) % config.restart_every == 0 and step + 1 < config.steps:
            _restart_dead_codes(model, usage, z.detach(), generator)
            usage.zero_()
    model.eval()
    if item is not None and config.item_refit:
        _refit_item_decoder(model, x, plain)


@torch.no_grad()
def _refit_item_decoder(model: PQVAE, x: torch.Tensor, plain: torch.Tensor | None) -> None:
    """Set the second decoder's weight ``W₂`` to the ridge least-squares map of the training items'
    quantised latents ``ẑ + β₂`` ``(n, m)`` onto their unit embeddings in the searched space ``(n, d)``."""
    item = model.item_decoder
    assert item is not None
    m = item.linear.weight.shape[1]
    gram = torch.zeros((m, m), dtype=torch.float64)
    cross = torch.zeros((m, x.shape[1]), dtype=torch.float64)
    for batch in x.split(8192):
        codes = model.codebook[model.nearest(model.latent(batch))].reshape(len(batch), -1)
        a = (codes + item.shift).double()
        target = F.normalize(batch if plain is None else batch @ plain, dim=-1).double()
        gram += a.T @ a
        cross += a.T @ target
    ridge = 1e-3 * float(torch.diagonal(gram).mean()) if m else 0.0
    solved = torch.linalg.solve(gram + ridge * torch.eye(m, dtype=torch.float64), cross)  # (m, d)
    item.linear.weight.copy_(solved.T.to(item.linear.weight.dtype))


def _restart_dead_codes(model: PQVAE, usage: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> None:
    """Move codewords that no sub-vector chose (``usage (K,)``) onto random current sub-vectors
    ``z (n, M, e)``: a dead codeword wastes a share of the bits."""
    dead = (usage == 0).nonzero().flatten()
    if not len(dead):
        return
    flat = z.reshape(-1, z.shape[-1])
    picks = torch.randint(0, len(flat), (len(dead),), generator=generator)
    with torch.no_grad():
        model.codebook[dead] = flat[picks]
