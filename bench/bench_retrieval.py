"""Retrieval-augmented MTUP and constrained decoding, measured on the validation split.

    python bench/bench_retrieval.py --baselines
    python bench/bench_retrieval.py --run runs/rk1 --constrained both --max-new-tokens 320

``--baselines`` scores two parsers that only look things up in the training split: the most
frequent training graph for every sentence, and the graph of the BM25-nearest training
sentence (:class:`ray_mtup.retrieval.PairIndex`, the retriever the prompts use).

``--run DIR`` (a ``--no-search`` run directory, repeatable) loads the run's adapter, rebuilds
its split and its retrieved examples, and generates for the validation sentences without
and/or with constrained decoding. Each arm prints Task 2 F in both SMATCH modes with a
bootstrap interval, validity before repair (:func:`ray_mtup.grammar.well_formed` on the raw
step-2 text), generation new tokens/s and the run's mean training tokens/s (from its
``summary.json``, or the trainer state of a checkpoint directory).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import default_data_dir, emit, require_corpus  # noqa: E402

MODES = ("normalised", "official")


def score(gold: Sequence[str], preds: Sequence[str | None], bootstrap: int) -> dict[str, Any]:
    """Task 2 F, precision, recall and bootstrap interval in both modes (predictions: raw or None)."""
    from ray_mtup import scoring

    out: dict[str, Any] = {}
    for mode in MODES:
        s, _, pairs = scoring._evaluate(gold, [p or "" for p in preds], mode, None,
                                        scoring.DEFAULT_RESTARTS, scoring.DEFAULT_SEED)
        out[f"f1_{mode}"] = round(s.f1, 4)
        if bootstrap:
            low, high = scoring.bootstrap_ci(pairs, n_resamples=bootstrap, seed=0)
            out[f"ci_{mode}"] = [round(low, 4), round(high, 4)]
    out["validity_after_repair"] = round(s.validity, 4)
    return out


def baselines(data_dir: str, bootstrap: int) -> None:
    from ray_mtup.config import TrainConfig
    from ray_mtup.retrieval import PairIndex
    from ray_mtup.dataset import load_examples

    train, val, gold = load_examples(TrainConfig(data_dir=data_dir))
    index = PairIndex(train)
    frequent = collections.Counter(ex.task2 for ex in train).most_common(1)[0][0]
    emit({"bench": "retrieval_baseline", "parser": "most_frequent_training_graph", "n": len(val),
          **score(gold, [frequent] * len(val), bootstrap)})
    nearest = [index.neighbours(ex.sentence, 1)[0].task2 for ex in val]
    emit({"bench": "retrieval_baseline", "parser": "bm25_nearest_training_graph", "n": len(val),
          **score(gold, nearest, bootstrap)})


def _history(run: Path, adapter: Path) -> list[dict[str, Any]]:
    """Per-epoch metrics up to the evaluated adapter: the run's summary.json, else the checkpoint's state."""
    from ray_mtup.checkpointing import STATE_FILE

    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text(encoding="utf-8"))["history"]
    return json.loads((adapter / STATE_FILE).read_text(encoding="utf-8"))["history"]


def evaluate_run(run: Path, data_dir: str, constrained: bool, args: argparse.Namespace) -> dict[str, Any]:
    from ray_mtup.generation import generate, prompts_for
    from ray_mtup.grammar import ConstrainedStats, well_formed
    from ray_mtup.predict import find_adapter, load_merged
    from ray_mtup.prompts import get_template, parse_generation
    from ray_mtup.dataset import load_examples, with_retrieval

    adapter = find_adapter(run)
    model, tokenizer, cfg = load_merged(adapter)
    cfg = cfg.replace(data_dir=data_dir)
    train, val, gold = load_examples(cfg)
    _, val = with_retrieval(cfg, train, val)
    n = len(val) if args.limit is None else min(args.limit, len(val))
    val, gold = val[:n], gold[:n]
    template = get_template(cfg.template)
    prompts = prompts_for(template, [ex.sentence for ex in val], [ex.context for ex in val])
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    raw = generate(model, tokenizer, prompts, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
                   stop_template=template, constrained=constrained).texts
    gen_s = time.perf_counter() - t0
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in raw)
    task2 = [parse_generation(template, r)[1] for r in raw]
    history = _history(run, adapter)
    record = {"bench": "retrieval_arm", "run": str(run), "retrieval_k": cfg.retrieval_k,
              "constrained": constrained, "n": n, "epochs": len(history),
              **score(gold, task2, args.bootstrap),
              "validity_before_repair": round(sum(map(well_formed, task2)) / max(1, n), 4),
              "gen_new_tokens": new_tokens, "gen_s": round(gen_s, 1),
              "gen_new_tokens_per_s": round(new_tokens / gen_s, 1),
              "train_tokens_per_s": round(sum(m["tokens_per_s"] for m in history) / len(history), 1),
              "train_s": round(sum(m["epoch_time_s"] for m in history), 1)}
    if args.save:
        name = f"k{cfg.retrieval_k}_epoch{len(history)}{'_constrained' if constrained else ''}"
        preds = Path(args.save) / f"{name}.jsonl"
        preds.parent.mkdir(parents=True, exist_ok=True)
        preds.write_text("".join(json.dumps({"id": ex.id, "raw": r}, ensure_ascii=False) + "\n"
                                 for ex, r in zip(val, raw)), encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--baselines", action="store_true", help="score the lookup baselines")
    p.add_argument("--run", action="append", default=[],
                   help="a --no-search run directory or one of its checkpoint directories (repeatable)")
    p.add_argument("--constrained", choices=("off", "on", "both"), default="both")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's max_new_tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="first N validation graphs only")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no interval)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--save", help="folder for the raw generations (JSONL per arm)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if require_corpus(args.data_dir, "bench_retrieval.py") is None:
        return 2
    if args.baselines:
        baselines(args.data_dir, args.bootstrap)
    arms = {"off": (False,), "on": (True,), "both": (False, True)}[args.constrained]
    for run in args.run:
        for constrained in arms:
            emit(evaluate_run(Path(run), args.data_dir, constrained, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
