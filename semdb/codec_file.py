"""Codec files: a trained codec with its model spec, rate and fidelity, to ship or reuse.

The seed paper's way — train once on a broad calibration set, reuse zero-shot — and the way a new
database codes from its first batch with nothing staged (``semdb ingest --codec-file FILE``). A
file is safetensors (no pickle): one ``uint8`` tensor ``state``, the bytes of
:meth:`Codec.to_bytes` (restored by :func:`semdb.codecs.load_codec`, which checks every field), and
string metadata ``format``, ``codec`` (registry name), ``bits_per_image``, ``dim``, ``model`` (the
spec of the model whose embeddings it codes) and ``report`` (JSON: how it was chosen and its
fidelity on the collection it was trained on). ``semdb codec export FILE --db DB`` writes one;
``scripts/train_bundled_codec.py`` trains the one shipped for the bundled model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from semdb.codecs import Codec, CodecStateError, load_codec, registry_name
from semdb.codecs.base import MAX_STATE_BYTES
from semdb.codecs.choice import TrainedCodec
from semdb.errors import InvalidArgumentError, ModelMismatchError

FORMAT = "semdb-codec-v1"
BUNDLED_CODEC_FILE = Path(__file__).resolve().parent / "assets" / "tiny_fashion_codec.safetensors"


def parse_report(text: str | None) -> dict[str, Any] | None:
    """A stored report (JSON text) → dict; None for none, or for text that is not a JSON object."""
    if not text:
        return None
    try:
        report = json.loads(text)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def write_codec_file(path: str | os.PathLike[str], codec: Codec, *, model: str, report: dict[str, Any]) -> None:
    """Write ``codec`` for ``model`` with its ``report`` to ``path`` (atomically: a temporary file, then renamed)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise InvalidArgumentError(f"folder {target.parent} does not exist; create it first")
    metadata = {
        "format": FORMAT,
        "codec": registry_name(codec),
        "bits_per_image": str(codec.bits_per_image),
        "dim": str(codec.dim),
        "model": model,
        "report": json.dumps(report),
    }
    if target.is_dir():
        raise InvalidArgumentError(f"{target} is a folder; give a file name, e.g. {target / 'codec.safetensors'}")
    if not os.access(target.parent, os.W_OK):
        raise InvalidArgumentError(f"cannot write codec file {target}: the folder {target.parent} is not writable")
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        state = np.frombuffer(codec.to_bytes(), dtype=np.uint8).copy()
        save_file({"state": state}, str(temporary), metadata=metadata)
        os.chmod(temporary, 0o644)  # a file to hand on: readable like any other (safetensors writes it 0600)
        temporary.replace(target)
    except (OSError, SafetensorError) as error:  # a full disk, a folder gone read-only meanwhile
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidArgumentError(f"cannot write codec file {target}: {reason}") from None


def codec_file_model(path: str | os.PathLike[str]) -> str:
    """The spec of the model whose embeddings the codec file ``path`` codes (its header; one-line
    errors as :func:`read_codec_file`)."""
    metadata, _ = _read(os.fspath(path))
    model = metadata.get("model")
    if not model:
        raise CodecStateError(f"{os.fspath(path)} is damaged: it names no model")
    return model


def read_codec_file(path: str | os.PathLike[str], *, model: str, dim: int) -> TrainedCodec:
    """The codec in ``path``, refused with a one-line error unless it is a semdb codec file made for
    ``model`` (``dim``-d embeddings). Its report marks the fidelity as measured on its calibration
    set, not on the collection it will code."""
    name = os.fspath(path)
    metadata, state = _read(name)
    if metadata.get("model") != model:
        raise ModelMismatchError(
            f"codec file {name} was made for model {metadata.get('model')!r}, not {model!r}: use a codec made for "
            f"{model} or drop --codec-file"
        )
    if state.dtype != np.uint8 or state.ndim != 1:
        raise CodecStateError(f"{name} is damaged: its state is {state.dtype} of shape {state.shape}")
    codec = load_codec(
        str(metadata.get("codec")), state.tobytes(), bits_per_image=_int(name, metadata, "bits_per_image")
    )
    if codec.dim != dim or codec.dim != _int(name, metadata, "dim"):
        raise ModelMismatchError(f"codec file {name} codes {codec.dim}-d embeddings; model {model} gives {dim}-d ones")
    report = parse_report(metadata.get("report")) or {}
    installed = {
        **report,
        "chosen_by": f"--codec-file {Path(name).name}",
        "fidelity": None,
        "calibration_fidelity": report.get("fidelity"),
        "trained_on_calibration": report.get("trained_on"),
    }
    return TrainedCodec(codec, installed)


def _read(name: str) -> tuple[dict[str, str], np.ndarray]:
    """The header and state tensor of codec file ``name``, or a one-line error saying why not."""
    if os.path.isdir(name):
        raise InvalidArgumentError(f"{name} is a folder; give the codec file (written by `semdb codec export FILE`)")
    try:
        size = os.path.getsize(name)
    except OSError as error:
        raise InvalidArgumentError(f"cannot read codec file {name}: {error.strerror or error}") from None
    if size > MAX_STATE_BYTES + 2**20:
        raise CodecStateError(f"{name} is {size} bytes, too large for a semdb codec file")
    try:
        with safe_open(name, framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or list(handle.keys()) != ["state"]:
                raise CodecStateError(f"{name} is not a semdb codec file (no {FORMAT} header)")
            state = handle.get_tensor("state")
    except SafetensorError as error:
        raise CodecStateError(f"{name} is not a semdb codec file: {str(error).splitlines()[0][:200]}") from None
    except OSError as error:
        raise InvalidArgumentError(f"cannot read codec file {name}: {error.strerror or error}") from None
    return metadata, state


def _int(name: str, metadata: dict[str, str], key: str) -> int:
    """Metadata field ``key`` as an integer, or a one-line damaged-file error."""
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        raise CodecStateError(f"{name} is damaged: its {key} is {metadata.get(key)!r}") from None
