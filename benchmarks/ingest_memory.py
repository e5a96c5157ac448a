"""Peak memory of an ingest of large images, against the same ingest of small ones.

Each variant runs ``semdb ingest`` (the bundled tiny-fashion model, the default batch size) in a
fresh process over a folder of generated images, and reports that process's peak RSS, its CPU time
and its wall time:

* ``small``: N images of 400 × 400 px (the baseline: model, database, one batch of small images);
* ``large``: N images of 4000 × 4000 px (half JPEG, half PNG), 16 MP each;
* ``huge``: one 200 MP PNG (14,142 × 14,142 px), ingested with ``--max-pixels 250000000``.

    python3 benchmarks/ingest_memory.py [--count 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench import machine, print_table
from PIL import Image

# The child samples its own RSS: ru_maxrss would carry over the peak of this parent process, which
# holds a 200 MP image while writing it.
CHILD = """
import json, sys, time
from _bench import PeakRss
from semdb.cli import main
cpu, wall = time.process_time(), time.perf_counter()
with PeakRss() as peak:
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                  "peak_rss_kib": peak.peak // 1024}))
"""


def picture(side: int, seed: int) -> Image.Image:
    """A smooth colour field with fine noise: realistic file sizes, nothing that compresses to nothing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    if side > 4000:
        return image  # grain on 200 MP would take minutes to write; the decode costs the same
    grain = rng.integers(-12, 13, (side, side, 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def write_folder(folder: Path, count: int, side: int) -> int:
    """``count`` images of ``side`` px, half JPEG and half PNG; returns the bytes written."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = picture(side, seed=i)
        if i % 2 == 0:
            image.save(folder / f"img{i:03d}.jpg", quality=90)
        else:
            image.save(folder / f"img{i:03d}.png")
    return sum(path.stat().st_size for path in folder.iterdir())


def ingest(folder: Path, database: Path, *extra: str) -> dict[str, float]:
    """Run ``semdb ingest`` on ``folder`` in a fresh process; its exit code, CPU s, wall s and peak RSS."""
    args = ["ingest", str(folder), "--db", str(database), "--model", "tiny-fashion", "--quiet", "--json", *extra]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False, cwd=Path(__file__).parent
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"code"')]
    if not lines:
        raise SystemExit(f"ingest failed: {result.stderr.strip()[-500:]}")
    figures: dict[str, float] = json.loads(lines[-1])
    report = json.loads(result.stdout[: result.stdout.index('{"code"')])
    figures["added"], figures["skipped"] = report["added"], len(report["skipped"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=40, help="images in the small and large folders")
    args = parser.parse_args()
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory(prefix="semdb-memory-") as work:
        root = Path(work)
        started = time.perf_counter()
        write_folder(root / "small", args.count, 400)
        write_folder(root / "large", args.count, 4000)
        (root / "huge").mkdir()
        picture(14_142, seed=99).save(root / "huge" / "huge.png", compress_level=1)
        print(f"images written in {time.perf_counter() - started:.0f} s", flush=True)
        variants: list[tuple[str, Path, tuple[str, ...]]] = [
            ("small", root / "small", ()),
            ("large", root / "large", ()),
            ("huge", root / "huge", ("--max-pixels", "250000000")),
        ]
        baseline = 0.0
        for name, folder, extra in variants:
            figures = ingest(folder, root / f"{name}.semdb", *extra)
            peak_mib = figures["peak_rss_kib"] / 1024
            baseline = baseline or peak_mib
            rows.append(
                [
                    name,
                    len(list(folder.iterdir())),
                    figures["code"],
                    f"{figures['added']:.0f}/{figures['skipped']:.0f}",
                    f"{peak_mib:.0f}",
                    f"{peak_mib / baseline:.2f}",
                    f"{figures['cpu_s']:.1f}",
                    f"{figures['wall_s']:.1f}",
                ]
            )
    print_table(
        "semdb ingest, bundled model, default batch size (64)",
        ["variant", "files", "exit", "added/skipped", "peak RSS MiB", "× small", "CPU s", "wall s"],
        rows,
    )


if __name__ == "__main__":
    main()
