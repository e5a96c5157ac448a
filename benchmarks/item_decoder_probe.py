"""Probe: can a better item decoder, fitted after training on the same codes, lift item→item recall?

The default codec's image queries are scored through its second decoder ``W₂ (ẑ + β₂)``
(``docs/codecs.md`` §11j). This trains the default exactly as ``semdb ingest`` does on CuPL
(``codecs_cupl.py --codec default --bits 64 --query-sample generic``), freezes the codes, and refits
only the item decoder — which cannot change zero-shot or mAP, since text queries never see it —
then measures 10-recall@10 of the first 2,000 test sentences against their float neighbours:

* ``lsq``: an *additive* decoder ``x̂ = Σ_m C[m, word_m]`` (one ``d``-vector per word and centroid,
  still scannable as a 4-bit PQ over a 256-d lifted space), fitted by ridge least squares onto the
  unit training embeddings, at four ridges;
* ``linear`` / ``additive``: the linear decoder, or that additive one started from it, trained by a
  neighbour-listwise loss: for a training sentence ``q``, KL between softmax(cos(q, ·)/τ) over its
  32 float neighbours plus 512 random training sentences, scored by their floats and by their
  decoded codes.

Run::

    OMP_NUM_THREADS=2 python benchmarks/item_decoder_probe.py --split-seed 0 --seed 2 --mode lsq
    OMP_NUM_THREADS=2 python benchmarks/item_decoder_probe.py --split-seed 2 --seed 0 --mode linear --steps 400

The figures and the verdict are in ``docs/codecs.md`` §11l.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from codecs_cupl import generic_sample, load_cupl, protocol, split

from semdb.codecs.choice import train_for_database
from semdb.codecs.pqvae import unpack_indices
from semdb.evaluation import RECALL_K, RECALL_QUERIES, recall_at_k
from semdb.index import flat_index

NEIGHBOURS = 32  # float neighbours of each fine-tuning query among its candidates
RANDOM_CANDIDATES = 512  # random training sentences beside them
BATCH = 256  # fine-tuning queries per step


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows of ``vectors (n, d)`` scaled to unit length."""
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    """Train the default codec, refit its item decoder as asked, print 10-R@10 as it goes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="the codec's training seed")
    parser.add_argument("--mode", choices=("lsq", "linear", "additive"), default="lsq")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tau", type=float, default=0.05, help="temperature of the listwise loss")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--neighbour-queries", type=int, default=5000, help="training sentences used as queries")
    args = parser.parse_args()
    torch.manual_seed(0)

    names, sentences, labels, prompts = load_cupl()
    train, test, *_ = protocol(names, sentences, labels, prompts, args.split_seed)
    sample = generic_sample(names, split(labels, len(names), args.split_seed)[1])
    start = time.process_time()
    codec = train_for_database(
        train, codec=None, bits=64, fidelity=None, queries=lambda _: sample, seed=args.seed
    ).codec
    print(f"trained {codec.describe()} in {time.process_time() - start:.1f} s CPU", flush=True)
    model = codec.base.model  # type: ignore[attr-defined]
    config = model.config
    words, centroids, latent = config.subvectors, config.codebook_size, config.latent_dim

    recall_queries = test[:RECALL_QUERIES]
    _, true_top = flat_index(test).search(recall_queries, RECALL_K)

    def recall(decoded: np.ndarray) -> float:
        _, found = flat_index(unit(decoded)).search(recall_queries, RECALL_K)
        return recall_at_k(true_top, found)

    test_words = torch.from_numpy(unpack_indices(codec.encode(test), config.codebook_bits))  # (m, M)
    train_words = torch.from_numpy(unpack_indices(codec.encode(train), config.codebook_bits))  # (n, M)
    item = model.item_decoder
    with torch.no_grad():
        weight, shift, codebook = item.linear.weight.clone(), item.shift.clone(), model.codebook.clone()
        per_word = weight.view(weight.shape[0], words, latent).permute(1, 0, 2)  # (M, d, e)
        table = torch.einsum("mde,mwe->mwd", per_word, codebook[None] + shift.view(words, 1, latent))  # (M, K, d)
    word_axis = torch.arange(words)

    def additive(indices: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Words ``(n, M)`` → ``(n, d)``: ``Σ_m c[m, word_m]``."""
        return c[word_axis[None], indices].sum(1)

    def linear(indices: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Words ``(n, M)`` → ``(n, d)``: ``W (ẑ + β)``."""
        return (codebook[indices].reshape(len(indices), -1) + b) @ w.T

    with torch.no_grad():
        print(f"the trained item decoder: 10-R@10 {recall(linear(test_words, weight, shift).numpy()):.4f}", flush=True)

    if args.mode == "lsq":

        def one_hot(indices: torch.Tensor) -> np.ndarray:
            """Words ``(n, M)`` → ``(n, M · K)`` float64, a 1 at ``K m + word_m``."""
            hot = np.zeros((len(indices), words * centroids))
            hot[np.arange(len(indices))[:, None], (indices + word_axis * centroids).numpy()] = 1.0
            return hot

        train_hot, test_hot = one_hot(train_words), one_hot(test_words)
        gram, cross = train_hot.T @ train_hot, train_hot.T @ unit(train).astype(np.float64)
        for ridge in (1e-3, 1e-1, 1.0, 10.0):
            fitted = np.linalg.solve(gram + ridge * np.diag(gram).mean() / 100 * np.eye(len(gram)), cross)
            print(f"additive, least squares, ridge {ridge:g}: 10-R@10 {recall(test_hot @ fitted):.4f}", flush=True)
        return

    x = torch.from_numpy(unit(train).astype(np.float32))
    start = time.process_time()
    chosen = torch.randperm(len(x))[: args.neighbour_queries]
    _, found = flat_index(x.numpy()).search(x[chosen].numpy(), NEIGHBOURS)
    neighbours = torch.from_numpy(found)
    print(f"float neighbours of {len(chosen)} queries in {time.process_time() - start:.1f} s CPU", flush=True)

    params = (
        [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(shift.clone())]
        if args.mode == "linear"
        else [torch.nn.Parameter(table.clone())]
    )
    optimiser = torch.optim.Adam(params, lr=args.lr)
    mm = torch.arange(words)
    for step in range(args.steps):
        rows = torch.randint(0, len(chosen), (BATCH,))
        queries = x[chosen[rows]]  # (B, d)
        candidates = torch.cat([neighbours[rows], torch.randint(0, len(x), (BATCH, RANDOM_CANDIDATES))], 1)
        cand_words = train_words[candidates]  # (B, C, M)
        if args.mode == "linear":
            decoded = F.normalize(linear(cand_words.reshape(-1, words), *params), dim=-1)
            scores = torch.einsum("bd,bcd->bc", queries, decoded.view(BATCH, -1, x.shape[1]))
        else:  # through the table's look-ups: decoding every candidate to d dimensions is too slow
            c = params[0]
            lut = torch.einsum("bd,mwd->bmw", queries, c)  # (B, M, K)
            raw = torch.gather(lut[:, None].expand(-1, cand_words.shape[1], -1, -1), 3, cand_words[..., None])
            pair = torch.einsum("mwd,nvd->mnwv", c, c)  # (M, M, K, K)
            flat_words = cand_words.reshape(-1, words)
            squared = pair[mm[:, None], mm[None, :], flat_words[:, :, None], flat_words[:, None, :]].sum((1, 2))
            scores = raw.squeeze(-1).sum(-1) / squared.view(BATCH, -1).clamp_min(1e-12).sqrt()
        target = torch.einsum("bd,bcd->bc", queries, x[candidates])
        loss = F.kl_div(
            F.log_softmax(scores / args.tau, -1),
            F.log_softmax(target / args.tau, -1),
            reduction="batchmean",
            log_target=True,
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if (step + 1) % max(1, args.steps // 4) == 0:
            with torch.no_grad():
                decoded_test = linear(test_words, *params) if args.mode == "linear" else additive(test_words, params[0])
                print(
                    f"step {step + 1}: loss {float(loss):.4f}, 10-R@10 {recall(decoded_test.numpy()):.4f}", flush=True
                )


if __name__ == "__main__":
    main()
