"""Time corpus SMATCH on VLSP-sized graphs.

    python bench/bench_smatch.py [--data-dir DIR] [--restarts N]

Gold graphs come from the VLSP 2025 training files; each "prediction" is a perturbed copy
(about 30% of concepts changed, one role in five renamed, one graph in ten replaced by
garbage that cannot be repaired). Prints one JSON line per measurement: the first 150 pairs
(the size of the public test) and all 1,842, in both modes, plus the repair+score path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package importable
    sys.path.insert(0, str(REPO))

from ray_mtup.config import corpus_dir  # noqa: E402
from ray_mtup.corpus import read_amr_file  # noqa: E402
from ray_mtup.scoring import DEFAULT_RESTARTS, evaluate_predictions, score_corpus  # noqa: E402

FILES = ("train_amr_1.txt", "train_amr_2.txt")
GARBAGE = "(x / :ARG0 ((("


def perturb(graph: str, rng: random.Random) -> str:
    """A plausible wrong prediction: some concepts and roles changed, or garbage."""
    if rng.random() < 0.1:
        return GARBAGE
    graph = re.sub(r"/ ([^\s()]+)", lambda m: "/ sai" if rng.random() < 0.3 else m.group(0), graph)
    return re.sub(r":([a-z]+)", lambda m: ":mod" if rng.random() < 0.2 else m.group(0), graph)


def timed(label: str, fn, n: int, repeats: int) -> None:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score = fn()
        times.append(time.perf_counter() - start)
    print(json.dumps({
        "bench": label,
        "n_pairs": n,
        "seconds_best": round(min(times), 4),
        "seconds_median": round(sorted(times)[len(times) // 2], 4),
        "ms_per_pair": round(1000 * min(times) / n, 3),
        "f1": round(score.f1, 6),
        "n_valid": score.n_valid,
        "mode": score.mode,
    }), flush=True)


def main(argv: list[str] | None = None) -> int:
    default_dir = str(corpus_dir(None, default=REPO.parent / "shared/data/vlsp2025"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_dir, help="VLSP 2025 corpus folder (default: %(default)s)")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS, help="hill-climbing starts per pair")
    parser.add_argument("--repeats", type=int, default=3, help="timings per measurement (best and median printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("penman").setLevel(logging.ERROR)  # one warning per broken graph otherwise

    data_dir = Path(args.data_dir)
    missing = [name for name in FILES if not (data_dir / name).is_file()]
    if missing:
        print(f"bench_smatch: corpus not found: {', '.join(str(data_dir / m) for m in missing)} "
              "(pass --data-dir or set RAY_MTUP_DATA_DIR)", file=sys.stderr)
        return 2

    golds = [ex.amr for name in FILES for ex in read_amr_file(data_dir / name)]
    rng = random.Random(0)
    preds = [perturb(g, rng) for g in golds]
    print(json.dumps({"bench": "setup", "n_graphs": len(golds), "cpus": os.cpu_count(),
                      "restarts": args.restarts}), flush=True)

    for n in (150, len(golds)):
        for mode in ("official", "normalised"):
            timed(f"score_corpus[{n}]", lambda: score_corpus(golds[:n], preds[:n], mode, restarts=args.restarts),
                  n, args.repeats)
        timed(f"evaluate_predictions[{n}] (repair+score)",
              lambda: evaluate_predictions(golds[:n], preds[:n], "official", restarts=args.restarts)[0],
              n, args.repeats)
    timed(f"gold_vs_gold[{len(golds)}]", lambda: score_corpus(golds, golds, restarts=args.restarts),
          len(golds), 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
