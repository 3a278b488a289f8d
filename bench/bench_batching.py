"""Useful-token fraction of the project's batching on the real corpus.

    python bench/bench_batching.py [--data-dir DIR] [--batch-sizes 2,4,8] [--epochs 3]

Encodes the training split of the VLSP corpus exactly as the training loop does
(``load_examples`` -> tiny BPE trained on the training texts -> ``dataset.encode_all``) and
compares, per batch size, the real tokens over the padded tokens of:

* ``length_grouped``: :class:`ray_mtup.dataset.LengthGroupedBatches` + dynamic padding
  (each batch padded to its own longest member), averaged over ``--epochs`` epochs; also with
  ``pad_to_multiple_of=8`` (what the loop does on GPU);
* ``random_dynamic``: seeded random batches, each padded to its own longest member;
* ``pad_to_corpus_max``: every batch padded to the longest example of the corpus.

The tokenizer is the tiny model's BPE (vocabulary ``--vocab-size``); Qwen's tokenizer gives
different lengths, but the fraction depends mostly on how dispersed the lengths are.
Prints one JSON object per line; exits 2 when the corpus is absent.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

from bench.common import default_data_dir, emit, require_corpus  # noqa: E402


def padded_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]], pad_to_multiple_of: int = 1,
                    width: int | None = None) -> float:
    """Real tokens over computed tokens; each batch is padded to its longest member rounded up
    to ``pad_to_multiple_of``, or to the fixed ``width`` when given.

    >>> lengths = [2, 4, 3, 3]
    >>> padded_fraction(lengths, [[0, 1], [2, 3]])   # (2+4+3+3) / (4*2 + 3*2)
    0.8571428571428571
    >>> padded_fraction(lengths, [[0, 1], [2, 3]], pad_to_multiple_of=8)
    0.375
    >>> padded_fraction(lengths, [[0, 1], [2, 3]], width=4)
    0.75
    """
    real = sum(lengths[i] for b in batches for i in b)
    padded = 0
    for b in batches:
        w = width if width is not None else max(lengths[i] for i in b)
        w = -(-w // pad_to_multiple_of) * pad_to_multiple_of
        padded += w * len(b)
    return real / padded if padded else 1.0


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Seeded random (not length-grouped) batches covering ``range(n)`` once.

    >>> sorted(i for b in random_batches(5, 2, 0) for i in b), [len(b) for b in random_batches(5, 2, 0)]
    ([0, 1, 2, 3, 4], [2, 2, 1])
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, epoch: int, seed: int,
                           world_size: int = 1) -> list[list[int]]:
    """All ranks' batches of one epoch of the project's sampler."""
    from ray_mtup.dataset import LengthGroupedBatches

    out: list[list[int]] = []
    for rank in range(world_size):
        sampler = LengthGroupedBatches(lengths, batch_size, rank, world_size, seed)
        sampler.set_epoch(epoch)
        out.extend(sampler)
    return out


def corpus_lengths(data_dir: Path, vocab_size: int, max_seq_len: int, seed: int, template: str,
                   tokenizer_path: str | None = None) -> list[int]:
    """Token lengths of the encoded training split, as the training loop computes them.

    ``tokenizer_path``: a local Qwen2.5 directory whose tokenizer replaces the tiny BPE.
    """
    from ray_mtup import dataset
    from ray_mtup.config import TinyModelSettings, TrainConfig
    from ray_mtup.dataset import load_examples, tokenizer_texts
    from ray_mtup.modeling import base_source, build_tokenizer
    from ray_mtup.prompts import get_template

    cfg = TrainConfig(data_dir=str(data_dir), tiny=TinyModelSettings(vocab_size=vocab_size),
                      max_seq_len=max_seq_len, seed=seed, template=template,
                      model="qwen2.5-7b" if tokenizer_path else "tiny", model_path=tokenizer_path)
    train, _, _ = load_examples(cfg)
    tokenizer = build_tokenizer(base_source(cfg, tokenizer_texts(train)))
    encoded, skipped = dataset.encode_all(tokenizer, get_template(cfg.template), train, cfg.max_seq_len)
    if skipped:
        logging.getLogger(__name__).warning("%d examples longer than %d tokens left out", len(skipped), max_seq_len)
    return [len(e) for e in encoded]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="VLSP 2025 corpus folder (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="2,4,8", help="comma-separated micro-batch sizes")
    parser.add_argument("--epochs", type=int, default=3, help="sampler epochs averaged (length-grouped, random)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the sampler shards over")
    parser.add_argument("--vocab-size", type=int, default=3000, help="tiny BPE vocabulary (TinyModelSettings)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="longer examples are skipped, as in training")
    parser.add_argument("--tokenizer-path", default=None,
                        help="local model directory whose tokenizer replaces the tiny BPE (e.g. Qwen2.5)")
    parser.add_argument("--template", default="v2_natural", help="MTUP prompt template")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("penman").setLevel(logging.ERROR)

    data_dir = require_corpus(args.data_dir, "bench_batching")
    if data_dir is None:
        return 2
    lengths = corpus_lengths(data_dir, args.vocab_size, args.max_seq_len, args.seed, args.template,
                             args.tokenizer_path)
    longest = max(lengths)
    emit({"bench": "batching_setup", "n_train": len(lengths), "real_tokens": sum(lengths),
          "tokenizer": args.tokenizer_path or f"tiny-bpe-{args.vocab_size}",
          "template": args.template, "len_min": min(lengths), "len_median": statistics.median(lengths),
          "len_mean": round(statistics.fmean(lengths), 1), "len_max": longest,
          "len_stdev": round(statistics.stdev(lengths), 1)})
    epochs = range(1, args.epochs + 1)
    for b in (int(x) for x in args.batch_sizes.split(",")):
        grouped = [length_grouped_batches(lengths, b, e, args.seed, args.world_size) for e in epochs]
        rand = [random_batches(len(lengths), b, args.seed * 1000 + e) for e in epochs]
        emit({
            "bench": "useful_token_fraction",
            "batch_size": b,
            "world_size": args.world_size,
            "length_grouped": round(statistics.fmean(padded_fraction(lengths, g) for g in grouped), 4),
            "length_grouped_pad8": round(statistics.fmean(padded_fraction(lengths, g, 8) for g in grouped), 4),
            "random_dynamic": round(statistics.fmean(padded_fraction(lengths, r) for r in rand), 4),
            "pad_to_corpus_max": round(padded_fraction(lengths, rand[0], width=longest), 4),
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
