"""Quick start: ingest a few hundred Fashion-MNIST images with the bundled model and search them by text.

Runs offline in about a minute on two CPU cores::

    python examples/01_quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import semdb
from semdb import fashion_mnist
from semdb.demo import label_from_path, write_images


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="semdb-quickstart-"))
    write_images(workdir / "images", count=300)  # 30 test-split images per class, as PNG files

    with semdb.connect(workdir / "quickstart.semdb", model="tiny-fashion", bits=64) as db:
        report = db.ingest([workdir / "images"])
        print(f"ingested {report.added} images; {db.stats().bytes_per_image:.0f} bytes per image")
        for query in ["a pair of sneakers", "a handbag", "something to wear over a shirt when it is cold"]:
            hits = db.search(query, k=5)
            labels = [fashion_mnist.CLASS_NAMES[label_from_path(hit.path) or 0] for hit in hits]
            print(f"{query!r:55} → {', '.join(labels)}")


if __name__ == "__main__":
    main()
