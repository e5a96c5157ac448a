"""Shared fixtures: a fake deterministic encoder and generated image folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# PostgreSQL and Ray fixtures (real servers started by the project).
pytest_plugins = ["servers"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 30, 160),
}


class FakeEncoder:
    """A deterministic stand-in for a CLIP model, so unit tests need no weights.

    An image maps to its mean colour (plus a little of its texture), a text naming a colour maps to
    that colour, both through one fixed random projection into ``dim`` dimensions: "red" finds the
    red images, as a real model would.
    """

    spec = "fake-encoder"

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.projection = np.random.default_rng(0).standard_normal((6, dim)).astype(np.float32)
        self.images_encoded = 0

    def _embed(self, features: np.ndarray) -> np.ndarray:
        vectors = features.astype(np.float32) @ self.projection
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``n`` images → ``(n, dim)`` float32, L2-normalised."""
        self.images_encoded += len(images)
        features = []
        for image in images:
            pixels = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
            mean = pixels.mean(axis=(0, 1)) - 0.5
            texture = pixels.std(axis=(0, 1)) * 0.5
            features.append(np.concatenate([mean, texture]))
        return self._embed(np.array(features))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` texts → ``(n, dim)`` float32; a colour word maps to that colour."""
        features = []
        for text in texts:
            colour = next((rgb for name, rgb in COLOURS.items() if name in text.lower()), (128, 128, 128))
            features.append(np.concatenate([np.array(colour, np.float32) / 255.0 - 0.5, np.zeros(3, np.float32)]))
        return self._embed(np.array(features))


def broad_embeddings(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(items (n, d), queries (200, d))`` float32 unit vectors around 40 centres spread over all
    ``d`` axes (embeddings of high intrinsic dimension, the learned codec's case)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d))
    x = centres[rng.integers(0, 40, n)] + 0.8 * rng.standard_normal((n, d))
    q = centres[rng.integers(0, 40, 200)] + 0.5 * rng.standard_normal((200, d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(x), unit(q)


def write_colour_images(folder: Path, per_colour: int = 6, size: int = 24, seed: int = 0) -> dict[str, str]:
    """Write ``per_colour`` noisy PNGs of each colour under ``folder``; returns path → colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels: dict[str, str] = {}
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            noise = rng.integers(-25, 26, size=(size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
            path = folder / f"{name}_{i}.png"
            Image.fromarray(pixels).save(path)
            labels[str(path.resolve())] = name
    return labels


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def colour_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "images"
    return folder, write_colour_images(folder)


TINY_CONFIG = Path(__file__).parent / "data" / "semdb-tiny-test.json"


@pytest.fixture(scope="session")
def tiny_model_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A spec ``CONFIG.json:CHECKPOINT.safetensors`` for a tiny random open_clip model saved to disk."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CONFIG.stem)
    checkpoint = tmp_path_factory.mktemp("tiny-model") / "tiny.safetensors"
    save_file(model.state_dict(), checkpoint)
    return f"{TINY_CONFIG}:{checkpoint}"
