"""Train the codec shipped for the bundled ``tiny-fashion`` model: ``semdb/assets/tiny_fashion_codec.safetensors``.

The calibration set is the 60,000 Fashion-MNIST *training* images (never the test split the demo
and the benchmarks search), embedded by the bundled model; the codec is what ``semdb ingest`` would
train on them (:func:`semdb.codecs.choice.train_for_database`, fidelity measured on 1,000 held-out
images and the generic query sample) — for this model's low-dimensional embeddings, 64-bit PQ.
``semdb ingest --codec-file semdb/assets/tiny_fashion_codec.safetensors --model tiny-fashion``
then codes a new database from its first batch, with no staging::

    python scripts/train_bundled_codec.py          # ~2 min on 2 cores
"""

from __future__ import annotations

import time

from PIL import Image

from semdb import fashion_mnist
from semdb.codec_file import BUNDLED_CODEC_FILE, write_codec_file
from semdb.codecs.choice import train_for_database
from semdb.encoder import BUNDLED_MODEL, load_encoder
from semdb.vocabulary import query_sample


def main() -> None:
    """Embed the calibration images, train, measure, write the codec file."""
    start = time.perf_counter()
    encoder = load_encoder(BUNDLED_MODEL, batch_size=512)
    images, _ = fashion_mnist.load("train")
    embeddings = encoder.encode_images([Image.fromarray(image) for image in images])
    trained = train_for_database(
        embeddings, codec=None, bits=None, fidelity=None, queries=lambda limit: query_sample(encoder, limit)
    )
    report = {**trained.report, "calibration_set": "Fashion-MNIST training split (60,000 images)"}
    write_codec_file(BUNDLED_CODEC_FILE, trained.codec, model=BUNDLED_MODEL, report=report)
    print(f"wrote {BUNDLED_CODEC_FILE} in {time.perf_counter() - start:.0f}s: {report}")


if __name__ == "__main__":
    main()
