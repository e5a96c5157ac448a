"""Memory and time of decoding a batch of large images with ``decode_image``, reduced against full size.

A batch holds its decoded images until the model has encoded them. This measures what holding them
costs: each variant runs in a fresh process, which reads and decodes every file of a folder with
:func:`semdb.images.decode_image` and keeps the images in a list, as a batch does; the process
reports its peak RSS (sampled every 2 ms, and ``ru_maxrss``), the CPU time of the decoding thread
and the wall time.

* ``full``: N images of 4000 × 4000 px (half JPEG, half PNG) decoded at full size (no ``min_side``:
  the baseline, what a batch held before images were reduced);
* ``reduced``: the same files with ``min_side=448`` (what ingest asks for a 224 px model);
* ``200 MP PNG, full`` / ``200 MP, min_side=448``: one 14,142 × 14,142 PNG with ``max_pixels=250_000_000``,
  above Pillow's own limit (89,478,485 pixels), which semdb's replaces.

The images are written to a temporary folder (removed at the end) by a separate process, so that no
measuring process inherits the writer's memory.

    python3 benchmarks/decode_memory.py [--count 40] [--min-side 448]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import machine, print_table

HERE = Path(__file__).resolve().parent
HUGE_SIDE = 14_142  # 200 M pixels
HUGE_MAX_PIXELS = 250_000_000

# Writes the images: a smooth colour field with fine grain, so that neither format compresses it to
# nothing (a 4000 × 4000 PNG is ~25 MB, a JPEG ~4 MB). The 200 MP image gets no grain: it would take
# minutes to write, and a PNG costs the same to decode and hold either way.
WRITER = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image

folder, count, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folder.mkdir(parents=True)
for i in range(count):
    rng = np.random.default_rng(i)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = field.resize((side, side), Image.Resampling.BICUBIC)
    if side <= 4000:
        grain = rng.integers(-12, 13, (side, side, 1), dtype=np.int16)
        image = Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))
    if i % 2 == 0 and count > 1:
        image.save(folder / f"img{i:03d}.jpg", quality=90)
    else:
        image.save(folder / f"img{i:03d}.png", compress_level=1)
"""

# Decodes a folder, holding every image; prints one JSON line of figures.
DECODER = """
import json, resource, sys, time
from pathlib import Path
from PIL import Image
from _bench import PeakRss, rss_bytes
from semdb.images import decode_image, read_bytes

folder, max_pixels = Path(sys.argv[1]), int(sys.argv[2])
min_side = int(sys.argv[3]) if sys.argv[3] != "none" else None
start_rss = rss_bytes()
held = []
cpu, wall = time.thread_time(), time.perf_counter()
with PeakRss() as peak:
    for path in sorted(folder.iterdir()):
        held.append(decode_image(read_bytes(str(path)), max_pixels, min_side=min_side))
cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
print(json.dumps({
    "images": len(held),
    # Pillow keeps 2-, 3- and 4-band pixels in 4 bytes (an RGB 4000 × 4000 image: 61 MiB), greys in 1.
    "held_bytes": sum(image.width * image.height * (4 if len(image.getbands()) > 1 else 1) for image in held),
    "sizes": sorted({image.size for image in held}),
    "start_rss": start_rss, "peak_rss": peak.peak,
    "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cpu_s": cpu, "wall_s": wall,
    "pillow_limit": Image.MAX_IMAGE_PIXELS,
}))
"""


def write_images(folder: Path, count: int, side: int) -> int:
    """Write ``count`` images of ``side`` px to ``folder`` in a separate process; returns the bytes written."""
    subprocess.run([sys.executable, "-c", WRITER, str(folder), str(count), str(side)], check=True)
    return sum(path.stat().st_size for path in folder.iterdir())


def decode_folder(folder: Path, max_pixels: int, min_side: int | None) -> dict[str, Any]:
    """Decode every file of ``folder`` in a fresh process holding the images; its figures."""
    result = subprocess.run(
        [sys.executable, "-c", DECODER, str(folder), str(max_pixels), str(min_side or "none")],
        capture_output=True,
        text=True,
        check=False,
        cwd=HERE,
    )
    if result.returncode != 0:
        raise SystemExit(f"decoding {folder} failed: {result.stderr.strip()[-800:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=40, help="4000 × 4000 px images in the batch")
    parser.add_argument("--min-side", type=int, default=448, help="the min_side of the reduced variants")
    parser.add_argument("--no-huge", action="store_true", help="skip the 200 MP image")
    args = parser.parse_args()
    print(machine())
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="semdb-decode-memory-") as work:
        root = Path(work)
        started = time.perf_counter()
        batch_bytes = write_images(root / "batch", args.count, 4000)
        written = f"{args.count} images of 4000 × 4000 px ({batch_bytes / mib:.0f} MiB)"
        variants: list[tuple[str, Path, int, int | None]] = [
            ("full (baseline)", root / "batch", 64_000_000, None),
            (f"reduced, min_side={args.min_side}", root / "batch", 64_000_000, args.min_side),
        ]
        if not args.no_huge:
            huge_bytes = write_images(root / "huge", 1, HUGE_SIDE)
            written += f" and one of {HUGE_SIDE} × {HUGE_SIDE} px ({huge_bytes / mib:.0f} MiB)"
            variants += [
                ("200 MP PNG, full", root / "huge", HUGE_MAX_PIXELS, None),
                (f"200 MP, min_side={args.min_side}", root / "huge", HUGE_MAX_PIXELS, args.min_side),
            ]
        print(f"wrote {written} in {time.perf_counter() - started:.0f} s", flush=True)

        rows = []
        baseline: dict[str, Any] = {}
        for name, folder, max_pixels, min_side in variants:
            figures = decode_folder(folder, max_pixels, min_side)
            if min_side is None:  # a full-size row: the baseline of the rows after it
                baseline = figures
            peak = figures["peak_rss"]
            rows.append(
                [
                    name,
                    figures["images"],
                    " ".join(f"{width}×{height}" for width, height in figures["sizes"]),
                    f"{figures['held_bytes'] / mib:.0f}",
                    f"{peak / mib:.0f}",
                    f"{(peak - figures['start_rss']) / mib:.0f}",
                    f"{figures['ru_maxrss'] / mib:.0f}",
                    f"{peak / baseline['peak_rss']:.2f}",
                    f"{figures['cpu_s']:.2f}",
                    f"{figures['cpu_s'] / baseline['cpu_s']:.2f}",
                    f"{figures['wall_s']:.2f}",
                    f"{figures['wall_s'] / baseline['wall_s']:.2f}",
                ]
            )
        print_table(
            "decode_image, images held as a batch holds them (one fresh process per row; × = against the "
            "full-size row above it)",
            [
                "variant",
                "images",
                "decoded sizes",
                "held MiB",
                "peak RSS MiB",
                "peak − start MiB",
                "ru_maxrss MiB",
                "× peak",
                "CPU s",
                "× CPU",
                "wall s",
                "× wall",
            ],
            rows,
        )


if __name__ == "__main__":
    main()
