"""Encoders: images and texts → L2-normalised float32 embeddings, through open_clip.

A model is named by a *spec*:

* ``ARCH:TAG`` — an open_clip architecture and a pretrained tag, e.g. ``ViT-B-32:laion2b_s34b_b79k``
  (weights are downloaded by open_clip on first use);
* ``ARCH:PATH`` — an open_clip architecture and a local checkpoint file (``.safetensors``, ``.pt``,
  ``.bin``); ``ARCH`` may also be the path of an open_clip model-config ``.json`` file;
* ``tiny-fashion`` — semdb's bundled offline model (see :mod:`semdb.bundled`).
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from semdb.errors import InvalidArgumentError, ModelUnavailableError
from semdb.images import pad_to_aspect_ratio

if TYPE_CHECKING:  # torch is imported lazily: commands that never load a model start fast
    import torch

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
BUNDLED_MODEL = "tiny-fashion"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# The input side assumed for a model that does not report one (CLIP's usual 224 px).
_DEFAULT_INPUT_SIDE = 224


class Encoder(Protocol):
    """What the database needs from a model."""

    spec: str
    dim: int

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``n`` PIL images → ``(n, dim)`` float32, each row L2-normalised."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` strings → ``(n, dim)`` float32, each row L2-normalised."""
        ...


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InvalidArgumentError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return resolved


def _normalise(features: torch.Tensor) -> np.ndarray:
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


class OpenClipEncoder:
    """An open_clip model in eval mode, encoding in batches on one device."""

    def __init__(
        self,
        spec: str,
        model: Any,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        batch_size: int = 64,
    ) -> None:
        self.spec = spec
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        size = getattr(getattr(model, "visual", None), "image_size", None)
        # The side of the square the image tower sees (ingest decodes JPEGs no larger than needed).
        self.image_size: int | None = int(min(size)) if isinstance(size, tuple | list) else size
        self.dim = int(self.encode_texts(["a photo"]).shape[1])

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``n`` PIL images of any size and mode → ``(n, dim)`` float32, L2-normalised.

        Strips beyond :data:`~semdb.images.MAX_ASPECT_RATIO` are padded to it first: open_clip's
        resizes give a 1000:1 strip a side of 0 pixels (fit modes) or of 224,000 (crop modes).
        """
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        side = self.image_size or _DEFAULT_INPUT_SIDE
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                pixels = torch.stack([self.preprocess(pad_to_aspect_ratio(image, side)) for image in batch])
                chunks.append(_normalise(self.model.encode_image(pixels.to(self.device))))
        return np.concatenate(chunks)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` strings → ``(n, dim)`` float32, L2-normalised."""
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
                chunks.append(_normalise(self.model.encode_text(tokens.to(self.device))))
        return np.concatenate(chunks) if chunks else np.zeros((0, getattr(self, "dim", 0)), np.float32)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``arch`` plus either a pretrained ``tag`` or a local ``checkpoint``."""

    arch: str
    tag: str | None = None
    checkpoint: Path | None = None
    config_file: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse ``ARCH:TAG`` / ``ARCH:PATH`` (``ARCH`` may be a config ``.json`` path)."""
        spec = spec.strip()
        if not spec:
            raise InvalidArgumentError("empty model spec; use ARCH:TAG, ARCH:PATH or tiny-fashion")
        arch, _, rest = spec.partition(":")
        config_file = Path(arch) if arch.endswith(".json") else None
        if config_file is not None and not config_file.is_file():
            raise ModelUnavailableError(f"model config file {arch} does not exist")
        if config_file is not None:
            arch = config_file.stem
        if not rest:
            return cls(arch=arch, config_file=config_file)
        looks_like_path = rest.endswith(_CHECKPOINT_SUFFIXES) or "/" in rest or Path(rest).exists()
        if looks_like_path:
            return cls(arch=arch, checkpoint=Path(rest), config_file=config_file)
        return cls(arch=arch, tag=rest, config_file=config_file)


def _check_arch(arch: str) -> None:
    import open_clip

    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else "; `semdb models` lists them"
        raise ModelUnavailableError(
            f"unknown open_clip architecture {arch!r}{hint} (or use --model {BUNDLED_MODEL} offline)"
        )


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers on HTTPS (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weights_cached(pretrained_cfg: dict[str, Any]) -> bool:
    """Whether open_clip's pretrained weights for ``pretrained_cfg`` are already in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    repo = str(pretrained_cfg.get("hf_hub", "")).strip("/")
    if not repo:
        return False
    filenames = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in filenames)


@dataclass(frozen=True)
class ModelInfo:
    """A model ``--model`` accepts: its spec and where its weights are (``bundled``, ``downloaded``,
    or ``not downloaded``: fetched on first use)."""

    spec: str
    where: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return {"spec": self.spec, "where": self.where}


def list_models() -> list[ModelInfo]:
    """The bundled model, then every open_clip ``ARCH:TAG`` (``open_clip.list_pretrained()``)."""
    import open_clip

    models = [ModelInfo(BUNDLED_MODEL, "bundled (offline)")]
    for arch, tag in open_clip.list_pretrained():
        try:
            cached = _weights_cached(open_clip.pretrained.get_pretrained_cfg(arch, tag))
        except ValueError:  # an hf_hub entry naming a file inside the repository: not looked up here
            cached = False
        models.append(ModelInfo(f"{arch}:{tag}", "downloaded" if cached else "not downloaded"))
    return models


def load_encoder(spec: str, device: str | None = None, batch_size: int = 64) -> OpenClipEncoder:
    """Load the model named by ``spec`` (see the module docstring) as an :class:`OpenClipEncoder`."""
    if spec == BUNDLED_MODEL:
        from semdb import bundled

        model, preprocess, tokenizer = bundled.load_tiny_fashion()
        return OpenClipEncoder(spec, model, preprocess, tokenizer, resolve_device(device), batch_size)

    import open_clip

    parsed = ModelSpec.parse(spec)
    if parsed.config_file is not None:
        open_clip.add_model_config(parsed.config_file)
    _check_arch(parsed.arch)
    torch_device = resolve_device(device)

    if parsed.checkpoint is not None:
        if not parsed.checkpoint.is_file():
            raise ModelUnavailableError(
                f"checkpoint file {parsed.checkpoint} does not exist; give the path of a local .safetensors/.pt file"
            )
        pretrained: str | None = str(parsed.checkpoint)
    elif parsed.tag is not None:
        tags = open_clip.list_pretrained_tags_by_model(parsed.arch)
        if parsed.tag not in tags:
            choices = ", ".join(tags) if tags else "none (give a local checkpoint: ARCH:PATH)"
            raise ModelUnavailableError(
                f"unknown pretrained tag {parsed.tag!r} for {parsed.arch}; valid tags: {choices}"
            )
        pretrained = parsed.tag
        pretrained_cfg = open_clip.pretrained.get_pretrained_cfg(parsed.arch, parsed.tag)
        try:
            # Fetch (or find in the cache) the weights before building the model, so that an offline
            # machine fails in seconds with a useful message, not after a minute of hub retries.
            if not _weights_cached(pretrained_cfg) and not _hub_reachable():
                raise OSError("weights hub unreachable")
            open_clip.pretrained.download_pretrained(pretrained_cfg)
        except Exception as error:  # huggingface_hub, urllib and OS errors alike mean "not reachable"
            raise ModelUnavailableError(
                f"could not download the weights of {spec} (no network or hub unreachable); "
                f"use --model {BUNDLED_MODEL} offline, or --model {parsed.arch}:/path/to/checkpoint.safetensors"
            ) from error
    else:
        tags = open_clip.list_pretrained_tags_by_model(parsed.arch)
        raise ModelUnavailableError(
            f"model spec {spec!r} names no weights; use {parsed.arch}:TAG (tags: {', '.join(tags) or 'none'}), "
            f"{parsed.arch}:PATH for a local checkpoint, or {BUNDLED_MODEL} offline"
        )

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            parsed.arch, pretrained=pretrained, device=torch_device, weights_only=True
        )
    # Loaders raise many types (OSError, RuntimeError, safetensors' and huggingface_hub's own errors):
    # any failure here is the user's file or network, and gets one line instead of a traceback.
    except Exception as error:
        if parsed.checkpoint is not None:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelUnavailableError(
                f"could not load checkpoint {parsed.checkpoint} as {parsed.arch}: {first_line}"
            ) from error
        raise ModelUnavailableError(
            f"could not download the weights of {spec} (no network or hub unreachable); "
            f"use --model {BUNDLED_MODEL} offline, or --model {parsed.arch}:/path/to/checkpoint.safetensors"
        ) from error
    tokenizer = open_clip.get_tokenizer(parsed.arch)
    return OpenClipEncoder(spec, model, preprocess, tokenizer, torch_device, batch_size)
