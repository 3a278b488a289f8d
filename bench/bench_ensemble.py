"""Time the ensemble's selection: K(K-1)/2 SMATCH pairs per sentence (ray_mtup.ensemble.select).

    python bench/bench_ensemble.py [--data-dir DIR] [--top 5] [--run EXPERIMENT] [--repeats 3]

On the 184 validation graphs of the project's seeded split. The candidates are, by default,
the graphs of each sentence's K BM25-nearest training sentences (VLSP-sized graphs that
partly agree, as a search's trials do, and no model needed); with ``--run`` a search's
cached parses (``<experiment>/ensemble/<trial>/val.json``, written by the ``ensemble``
command) of its K best trials. Prints one JSON line: the seconds of one selection (median of
``--repeats``), the pairs scored and the seconds per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package importable
    sys.path.insert(0, str(REPO))

from bench.common import default_data_dir, emit, require_corpus, summarise  # noqa: E402


def lookup_candidates(data_dir: str, k: int) -> tuple[list[list[str]], str]:
    """Per candidate c (0..k-1), the graph of each validation sentence's (c+1)-th BM25 neighbour."""
    from ray_mtup.config import TrainConfig
    from ray_mtup.dataset import corpus_splits, to_mtup
    from ray_mtup.retrieval import PairIndex

    cfg = TrainConfig(data_dir=data_dir)
    train, val, _ = corpus_splits(cfg)
    index = PairIndex(to_mtup(train))
    neighbours = [index.neighbours(ex.sentence, k) for ex in val]
    return [[n[c].task2 for n in neighbours] for c in range(k)], cfg.scoring_mode


def run_candidates(run: str, k: int) -> tuple[list[list[str]], str]:
    """The cached validation parses of the search's k best trials."""
    from ray_mtup.ensemble_run import ENSEMBLE_DIR, member_config, top_members

    members = top_members(run, k)
    out = []
    for m in members:
        path = Path(run) / ENSEMBLE_DIR / m.trial_id / "val.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `python -m ray_mtup ensemble --run {run} --top {k}` first")
        out.append([p["graph"] for p in json.loads(path.read_text(encoding="utf-8"))["parses"]])
    return out, member_config(members[0]).scoring_mode


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--top", type=int, default=5, help="K candidates (default: %(default)s)")
    p.add_argument("--run", help="a search's experiment directory whose cached parses to select from")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from ray_mtup.ensemble import select

    if args.run:
        candidates, mode = run_candidates(args.run, args.top)
        source = f"cached validation parses of the {args.top} best trials of {args.run}"
    else:
        if require_corpus(args.data_dir, "bench_ensemble.py") is None:
            return 2
        candidates, mode = lookup_candidates(args.data_dir, args.top)
        source = f"graphs of the {args.top} BM25-nearest training sentences"
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        select(candidates, mode)
        times.append(time.perf_counter() - t0)
    n, k = len(candidates[0]), len(candidates)
    pairs = n * k * (k - 1) // 2
    stats = summarise(times)
    emit({"bench": "ensemble_selection", "candidates": source, "k": k, "n_graphs": n, "mode": mode,
          "smatch_pairs": pairs, **{key: round(v, 3) for key, v in stats.items()},
          "ms_per_pair": round(1000 * stats["median_s"] / pairs, 3)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
