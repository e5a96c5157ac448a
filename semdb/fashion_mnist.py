"""Fashion-MNIST reader: the IDX ``.gz`` files of Debian's ``dataset-fashion-mnist`` package → numpy.

Fashion-MNIST (Zalando, MIT licence) holds 60,000 training and 10,000 test greyscale 28×28 images of
clothing in ten classes, white items on a black background. semdb trains its bundled offline model on
the training split and measures it (and the codecs) on the test split.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

from semdb.errors import DatasetMissingError, InvalidArgumentError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SEMDB_FASHION_MNIST_DIR"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The ten class names, indexed by label, as the data set's authors wrote them."""

CLASS_SLUGS: tuple[str, ...] = tuple(name.lower().replace("/", "-").replace(" ", "-") for name in CLASS_NAMES)
"""File-system-safe class names, indexed by label (``t-shirt-top``, ..., ``ankle-boot``)."""

CLASS_PROMPTS: tuple[str, ...] = (
    "a photo of a t-shirt",
    "a photo of a pair of trousers",
    "a photo of a pullover",
    "a photo of a dress",
    "a photo of a coat",
    "a photo of a sandal",
    "a photo of a shirt",
    "a photo of a sneaker",
    "a photo of a bag",
    "a photo of an ankle boot",
)
"""One plain-English text query per class, indexed by label: the zero-shot prompts and the class
queries behind the bundled model's measured figures (``docs/bundled-model.md``)."""

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def data_dir() -> Path:
    """The folder holding the IDX files: ``$SEMDB_FASHION_MNIST_DIR`` if set, else Debian's location."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else DEFAULT_DIR


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """One gzip'd IDX file → its uint8 array, shape as its header says."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise DatasetMissingError(f"{path} is not a Fashion-MNIST IDX file (bad magic number)")
    shape = tuple(int(size) for size in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(shape)):
        raise DatasetMissingError(f"{path} is truncated: reinstall with `apt-get install dataset-fashion-mnist`")
    return body.reshape(shape)


def load(split: Literal["train", "test"], folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one split → ``images (n, 28, 28) uint8``, ``labels (n,) int64`` in ``0..9``.

    ``folder`` defaults to :func:`data_dir`. Raises :class:`DatasetMissingError` (with the install
    command) when the files are not there.
    """
    if split not in _FILES:
        raise InvalidArgumentError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = data_dir() if folder is None else folder
    image_file, label_file = (folder / name for name in _FILES[split])
    missing = [path for path in (image_file, label_file) if not path.is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found ({missing[0]} is missing): run `apt-get install dataset-fashion-mnist` "
            f"or set {ENV_VAR} to the folder holding its .gz files"
        )
    images = _read_idx(image_file, _IMAGE_MAGIC, 3)
    labels = _read_idx(label_file, _LABEL_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetMissingError(f"{image_file} and {label_file} disagree on the number of items")
    return images, labels


def balanced_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """``labels (n,)`` → ``(m,) int64`` indices, the first ``count // 10`` (± 1) of each class, sorted.

    The first items of each class, not a random draw, so the same call always picks the same images.
    """
    if count < 1:
        raise InvalidArgumentError(f"count must be at least 1, got {count}")
    per_class, extra = divmod(count, len(CLASS_NAMES))
    chosen = [
        np.flatnonzero(labels == label)[: per_class + (1 if label < extra else 0)] for label in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
