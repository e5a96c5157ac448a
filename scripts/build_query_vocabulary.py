"""Build ``semdb/assets/query_vocabulary.json``: the generic query sample semdb weights its codecs by.

Source: the CuPL descriptions of the ImageNet classes (Pratt et al., "What does a platypus look
like?", 2023) as shipped in the ``clip-benchmark`` 1.6.2 wheel
(``clip_benchmark/datasets/cupl_prompts.json``, key ``imagenet1k``; MIT licence, copyright 2022
Mehdi Cherti). For each of its 998 class names the asset keeps the prompt ``"a photo of a {class}."``
(and the first :data:`DESCRIPTIONS_PER_CLASS` CuPL descriptions, none by default), grouped by class
so that a benchmark can leave out the classes it judges on (``benchmarks/codecs_cupl.py``).

Why prompts only (``docs/codecs.md`` §11, CuPL split 0, query-weighted pqvae-pca at 32 bits, closed
form, zero-shot / mAP@100): the 800 training classes' prompts .739 / .706; those plus two CuPL
descriptions each (2,400 texts) .676 / .649; three prompt templates each ("a photo of a", "a picture
of a", "an image of a") .718 / .721; with the bare name as the third .711 / .695. Queries look like
prompts, not like descriptions, and the weighting follows the sample's covariance.

::

    pip download clip-benchmark==1.6.2 --no-deps -d /tmp/cb && pip install --no-deps /tmp/cb/*.whl
    python scripts/build_query_vocabulary.py
"""

from __future__ import annotations

import json
from pathlib import Path

DESCRIPTIONS_PER_CLASS = 0
OUT = Path(__file__).resolve().parent.parent / "semdb" / "assets" / "query_vocabulary.json"


def main() -> None:
    """Read the CuPL prompts from the installed clip-benchmark and write the asset."""
    from importlib.metadata import distribution

    import clip_benchmark

    source = Path(clip_benchmark.__file__).parent / "datasets" / "cupl_prompts.json"
    prompts: dict[str, list[str]] = json.loads(source.read_text())["imagenet1k"]
    classes = {
        name: [f"a photo of a {name}."] + [text.strip() for text in prompts[name][:DESCRIPTIONS_PER_CLASS]]
        for name in sorted(prompts)
    }
    licence = distribution("clip-benchmark").read_text("LICENSE") or ""
    if "MIT License" not in licence:
        raise SystemExit("the installed clip-benchmark does not carry its MIT licence file: reinstall 1.6.2")
    asset = {
        "source": "CuPL ImageNet descriptions, clip-benchmark 1.6.2 (clip_benchmark/datasets/cupl_prompts.json)",
        "licence": licence.strip(),
        "classes": classes,
    }
    OUT.write_text(json.dumps(asset, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {sum(len(t) for t in classes.values())} texts of {len(classes)} classes to {OUT}")


if __name__ == "__main__":
    main()
