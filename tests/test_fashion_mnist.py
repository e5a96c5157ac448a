"""The Fashion-MNIST reader: shapes, labels, and a clear error when the data set is missing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from semdb import fashion_mnist
from semdb.errors import DatasetMissingError

needs_data = pytest.mark.skipif(
    not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_test_split_shapes_and_balanced_labels() -> None:
    images, labels = fashion_mnist.load("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    # White items on black: the border is mostly background, the centre mostly not.
    assert images[:, 0, :].mean() < 20 < images[:, 10:18, 10:18].mean()


@needs_data
def test_train_split_shapes() -> None:
    images, labels = fashion_mnist.load("train")
    assert images.shape == (60_000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10


def test_missing_folder_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("test")


def _write_idx(path: Path, header: tuple[int, ...], body: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(f">{len(header)}I", *header) + body)


def test_reads_a_small_idx_pair_and_rejects_a_truncated_one(tmp_path: Path) -> None:
    pixels = np.arange(2 * 28 * 28, dtype=np.uint8).tobytes()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", (0x803, 2, 28, 28), pixels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (0x801, 2), bytes([3, 9]))
    images, labels = fashion_mnist.load("test", tmp_path)
    assert images.shape == (2, 28, 28)
    assert labels.tolist() == [3, 9]
    assert images[1, 0, 0] == (28 * 28) % 256

    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", (0x803, 2, 28, 28), pixels[:-1])
    with pytest.raises(DatasetMissingError, match="truncated"):
        fashion_mnist.load("test", tmp_path)


def test_balanced_indices_are_deterministic_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 50)[::-1].copy()
    chosen = fashion_mnist.balanced_indices(labels, 25)
    assert len(chosen) == 25
    assert np.all(np.diff(chosen) > 0)
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert np.array_equal(chosen, fashion_mnist.balanced_indices(labels, 25))


def test_class_slugs_are_file_names() -> None:
    assert fashion_mnist.CLASS_SLUGS[0] == "t-shirt-top"
    assert fashion_mnist.CLASS_SLUGS[9] == "ankle-boot"
    assert all("/" not in slug and " " not in slug for slug in fashion_mnist.CLASS_SLUGS)
