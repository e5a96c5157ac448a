"""Train semdb's bundled offline model ``tiny-fashion`` on Fashion-MNIST and report its figures.

LiT-style ("locked text"): the all-MiniLM-L6-v2 text tower stays frozen, so its caption embeddings
are computed once and cached; only the small open_clip ModifiedResNet image tower (and the logit
scale) learns, contrastively, to land each training image next to captions of its class. Captions
come from the class names through varied templates and synonyms; the wordings in
``HELD_OUT_QUERIES`` are never trained on and are used only to test generalisation.

Usage (about 7 minutes on a shared 2-core CPU, with the default single torch thread)::

    nice -n 5 python3 scripts/train_tiny_fashion.py            # writes semdb/assets/tiny_fashion.safetensors
    python3 scripts/train_tiny_fashion.py --eval-only          # re-measure the shipped checkpoint

Seeded (``--seed``), with deterministic torch algorithms.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semdb import bundled, fashion_mnist

# Noun phrases per class (with their article) used in training captions.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("a t-shirt", "a tee shirt", "a top", "a short-sleeved top", "a tank top", "a crew-neck t-shirt"),
    ("a pair of trousers", "trousers", "pants", "a pair of slacks", "leggings", "a pair of pants"),
    ("a pullover", "a sweater", "a jumper", "a sweatshirt", "a long-sleeved pullover"),
    ("a dress", "a gown", "a sundress", "an evening dress", "a long dress"),
    ("a coat", "an overcoat", "a parka", "a raincoat", "a long coat with sleeves"),
    ("a sandal", "sandals", "an open-toed shoe", "a strappy sandal", "a summer sandal"),
    ("a shirt", "a button-up shirt", "a collared shirt", "a dress shirt", "a long-sleeved shirt"),
    ("a sneaker", "a trainer", "a running shoe", "a sports shoe", "an athletic shoe"),
    ("a bag", "a handbag", "a tote bag", "a shoulder bag", "a backpack"),
    ("an ankle boot", "a boot", "a short boot", "a chelsea boot", "a heeled boot"),
)
TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a product photo of {}",
    "a black and white photo of {}",
    "a low resolution photo of {}",
    "a grayscale image of {}",
    "a small picture of {}",
    "a catalogue image of {}",
    "{} on a black background",
    "a close-up photo of {}",
    "a pixelated photo of {}",
    "a thumbnail of {}",
    "this is {}",
    "a cropped photo of {}",
    "a good photo of {}",
    "a blurry photo of {}",
    "an item of clothing: {}",
    "fashion item: {}",
    "{} for sale",
    "an online shop photo of {}",
    "a centered photo of {}",
    "a white silhouette of {}",
)
# The one prompt per class for zero-shot classification and the per-class precision@10 queries.
CLASS_PROMPTS = fashion_mnist.CLASS_PROMPTS
# Wordings never seen in training: new synonyms, new templates, or both. (query, label)
HELD_OUT_QUERIES: tuple[tuple[str, int], ...] = (
    ("a plain white tee", 0),
    ("a polo shirt", 0),
    ("a pair of denim jeans", 1),
    ("khaki chinos", 1),
    ("a knitted sweater", 2),
    ("a wool cardigan", 2),
    ("a summer frock", 3),
    ("a cocktail dress", 3),
    ("a warm winter jacket", 4),
    ("a trench coat", 4),
    ("flip-flops", 5),
    ("beach sandals", 5),
    ("a silk blouse", 6),
    ("a flannel shirt", 6),
    ("a pair of jogging shoes", 7),
    ("tennis shoes", 7),
    ("a leather purse", 8),
    ("a rucksack", 8),
    ("hiking boots", 9),
    ("a suede bootie", 9),
)

EPOCHS = 5
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.05
SHIFT_PIXELS = 2


def training_captions() -> tuple[list[str], np.ndarray]:
    """Every template × synonym → ``captions`` (m strings), ``labels (m,) int64``."""
    captions, labels = [], []
    for label, synonyms in enumerate(SYNONYMS):
        for synonym in synonyms:
            for template in TEMPLATES:
                captions.append(template.format(synonym))
                labels.append(label)
    return captions, np.asarray(labels, dtype=np.int64)


def preprocess_all(images: np.ndarray, preprocess: torch.nn.Module) -> torch.Tensor:
    """``images (n, 28, 28) uint8`` → ``(n, 1, s, s) float32`` through the model's own preprocess.

    The shipped preprocess (PIL path) is used so training sees exactly what inference sees; one
    channel is kept because the three are copies of the grey level.
    """
    return torch.stack([preprocess(Image.fromarray(image))[:1] for image in images])


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: object, texts: Sequence[str]) -> torch.Tensor:
    """``n`` strings → ``(n, 384) float32`` L2-normalised, through the frozen text tower in eval mode."""
    model.text.eval()
    chunks = [model.encode_text(tokenizer(list(texts[start : start + 256]))) for start in range(0, len(texts), 256)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def encode_pixels(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels (n, 1, s, s)`` → ``(n, 384) float32`` L2-normalised image embeddings (eval mode)."""
    model.visual.eval()
    chunks = [
        model.encode_image(pixels[start : start + 512].expand(-1, 3, -1, -1)) for start in range(0, len(pixels), 512)
    ]
    return F.normalize(torch.cat(chunks), dim=-1)


def augment(batch: torch.Tensor, background: float, generator: torch.Generator) -> torch.Tensor:
    """``batch (b, 1, s, s)`` → same shape: random shifts of up to ``SHIFT_PIXELS`` and mirror flips.

    Mirror flips keep every class's meaning (a left shoe mirrored is a right shoe).
    """
    size = batch.shape[-1]
    padded = F.pad(batch, (SHIFT_PIXELS,) * 4, value=background)
    offsets = torch.randint(0, 2 * SHIFT_PIXELS + 1, (len(batch), 2), generator=generator)
    shifted = torch.stack(
        [padded[i, :, int(dy) : int(dy) + size, int(dx) : int(dx) + size] for i, (dy, dx) in enumerate(offsets)]
    )
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss over a batch, with every same-class pair counted as a positive.

    ``image_features, text_features (b, d)`` L2-normalised, ``labels (b,)``. With ten classes a batch
    holds many images of one class, so the usual one-positive target would push apart captions and
    images that agree; the target is spread evenly over the same-class pairs instead.
    """
    logits = logit_scale.exp() * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def train(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    caption_features: torch.Tensor,
    caption_labels: torch.Tensor,
    seed: int,
) -> None:
    """Train ``model.visual`` and ``model.logit_scale`` in place; the text tower is never touched."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.text.parameters():
        parameter.requires_grad_(False)
    parameters = [*model.visual.parameters(), model.logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(pixels) // BATCH_SIZE
    total_steps = EPOCHS * steps_per_epoch
    warmup = steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps)),
    )
    background = float(pixels.min())
    captions_of = [torch.nonzero(caption_labels == label).flatten() for label in range(10)]
    for epoch in range(EPOCHS):
        started = time.time()
        model.visual.train()
        order = torch.randperm(len(pixels), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            batch_labels = labels[batch]
            # One random training caption of its class per image, a fresh draw each time.
            picks = torch.stack(
                [
                    captions_of[int(label)][torch.randint(len(captions_of[int(label)]), (1,), generator=generator)]
                    for label in batch_labels
                ]
            ).squeeze(1)
            images = augment(pixels[batch], background, generator).expand(-1, 3, -1, -1)
            image_features = F.normalize(model.encode_image(images), dim=-1)
            loss = contrastive_loss(image_features, caption_features[picks], batch_labels, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
        print(
            f"epoch {epoch + 1}/{EPOCHS}: loss {np.mean(losses):.4f}, "
            f"logit scale {model.logit_scale.exp().item():.1f}, {time.time() - started:.0f}s",
            flush=True,
        )


def precision_at_10(
    query_features: torch.Tensor, image_features: torch.Tensor, image_labels: torch.Tensor, query_labels: Sequence[int]
) -> list[float]:
    """Per query, the share of its 10 nearest images (cosine) that have the query's label."""
    top = (query_features @ image_features.T).topk(10, dim=1).indices
    return [float((image_labels[row] == label).float().mean()) for row, label in zip(top, query_labels, strict=True)]


def evaluate(model: torch.nn.Module, tokenizer: object, test_pixels: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """The figures of the model card, on float embeddings of the 10k test images."""
    image_features = encode_pixels(model, test_pixels)
    prompt_features = encode_texts(model, tokenizer, CLASS_PROMPTS)
    predictions = (image_features @ prompt_features.T).argmax(dim=1)
    zero_shot = float((predictions == test_labels).float().mean())
    class_precision = precision_at_10(prompt_features, image_features, test_labels, range(10))

    # Held-out wordings, and — to tell the model's errors from the text tower's — which class the
    # query's MiniLM embedding is nearest to, against each class's mean training-caption embedding.
    captions, caption_labels = training_captions()
    caption_features = encode_texts(model, tokenizer, captions)
    centroids = F.normalize(
        torch.stack([caption_features[torch.from_numpy(caption_labels == label)].mean(0) for label in range(10)]),
        dim=-1,
    )
    queries = [query for query, _ in HELD_OUT_QUERIES]
    query_labels = [label for _, label in HELD_OUT_QUERIES]
    query_features = encode_texts(model, tokenizer, queries)
    held_precision = precision_at_10(query_features, image_features, test_labels, query_labels)
    nearest_class = (query_features @ centroids.T).argmax(dim=1).tolist()
    return {
        "zero_shot_top1": zero_shot,
        "class_queries": [
            {"query": prompt, "class": fashion_mnist.CLASS_NAMES[label], "precision_at_10": precision}
            for label, (prompt, precision) in enumerate(zip(CLASS_PROMPTS, class_precision, strict=True))
        ],
        "mean_class_precision_at_10": float(np.mean(class_precision)),
        "held_out_queries": [
            {
                "query": query,
                "class": fashion_mnist.CLASS_NAMES[label],
                "precision_at_10": precision,
                "text_nearest_class": fashion_mnist.CLASS_NAMES[nearest],
            }
            for query, label, precision, nearest in zip(
                queries, query_labels, held_precision, nearest_class, strict=True
            )
        ],
        "mean_held_out_precision_at_10": float(np.mean(held_precision)),
    }


def print_report(figures: dict) -> None:
    """Human-readable figures on stdout."""
    print(f"zero-shot top-1 (one prompt per class, 10k test images): {figures['zero_shot_top1']:.2%}")
    print(f"text→image precision@10, mean over the class queries: {figures['mean_class_precision_at_10']:.3f}")
    for row in figures["class_queries"]:
        print(f"  {row['precision_at_10']:.1f}  {row['query']!r} ({row['class']})")
    print(f"held-out wordings, mean precision@10: {figures['mean_held_out_precision_at_10']:.3f}")
    for row in figures["held_out_queries"]:
        nearest = row["text_nearest_class"]
        note = "" if nearest == row["class"] else f"  [MiniLM puts it nearest {nearest}]"
        print(f"  {row['precision_at_10']:.1f}  {row['query']!r} ({row['class']}){note}")


def main(argv: Sequence[str] | None = None) -> int:
    """Train (unless ``--eval-only``), write the checkpoint, print and optionally save the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=bundled.WEIGHTS_FILE, help="checkpoint to write")
    parser.add_argument("--eval-only", action="store_true", help="measure the checkpoint at --out, no training")
    parser.add_argument("--figures", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is fastest on a CPU shared with other jobs"
    )
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()

    model, preprocess, tokenizer = bundled.create_model()
    test_images, test_labels = fashion_mnist.load("test")
    test_pixels = preprocess_all(test_images, preprocess)
    if args.eval_only:
        model.load_state_dict(load_file(args.out), strict=False)
    else:
        train_images, train_labels = fashion_mnist.load("train")
        train_pixels = preprocess_all(train_images, preprocess)
        captions, caption_labels = training_captions()
        caption_features = encode_texts(model, tokenizer, captions)
        print(
            f"{len(captions)} training captions, {len(train_pixels)} training images, "
            f"{sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f} M image-tower parameters",
            flush=True,
        )
        train(
            model,
            train_pixels,
            torch.from_numpy(train_labels),
            caption_features,
            torch.from_numpy(caption_labels),
            args.seed,
        )
        # Only what the text package does not ship: the image tower and the logit scale.
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if not name.startswith("text.")
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, args.out, metadata={"arch": bundled.ARCH, "seed": str(args.seed), "epochs": str(EPOCHS)})
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.time() - started:.0f}s")

    figures = evaluate(model, tokenizer, test_pixels, torch.from_numpy(test_labels))
    figures["seconds"] = round(time.time() - started)
    print_report(figures)
    if args.figures:
        args.figures.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
