"""How close ``evaluate``'s official F is to smatch 1.0.4's own corpus F, on real files.

For each corpus file: the file against itself, against a perturbed copy (every 4th graph
replaced by another sentence's graph, the root concept of the next renamed) and against its
repaired copy (canonical PENMAN, ``chủ_tịch``). smatch runs through its own file reader and
``score_amr_pairs`` with ``random`` seeded once (its per-restart reseeding from the OS is
disabled), so both figures are reproducible. Prints one JSON line per pair.

    python bench/bench_official_agreement.py --data-dir ../shared/data/vlsp2025
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smatch  # noqa: E402

from ray_mtup import amr  # noqa: E402
from ray_mtup.corpus import read_amr_file, write_amr_file  # noqa: E402
from ray_mtup.scoring import evaluate_files  # noqa: E402


def smatch_corpus_f(gold: Path, pred: Path, seed: int = 0) -> float:
    """smatch 1.0.4's corpus F of ``pred`` against ``gold`` (its default 5 starts), seeded."""
    saved = random.seed
    saved(seed)
    random.seed = lambda *a, **k: None  # smatch calls random.seed() before every restart
    smatch.match_triple_dict.clear()
    try:
        with pred.open(encoding="utf-8") as f1, gold.open(encoding="utf-8") as f2:
            *_, (_, _, f) = smatch.score_amr_pairs(f1, f2)
    finally:
        random.seed = saved
    return f


def _perturbed(examples, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(examples):
        graph = examples[rng.randrange(len(examples))].amr if i % 4 == 0 else ex.amr
        if i % 4 == 1:
            graph = re.sub(r"^\((\S+) / [^\n:()]+", r"(\1 / khác", graph, count=1)
        out.append((ex.sentence, graph))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    for name in ("train_amr_1.txt", "train_amr_2.txt"):
        gold = Path(args.data_dir) / name
        examples = read_amr_file(gold)
        perturbed = tmp / f"perturbed_{name}"
        write_amr_file(perturbed, _perturbed(examples, 3))
        repaired = tmp / f"repaired_{name}"
        write_amr_file(repaired, [(ex.sentence, amr.repair(ex.amr).graph) for ex in examples])
        for label, pred in (("itself", gold), ("perturbed", perturbed), ("repaired (chủ_tịch)", repaired)):
            t0 = time.perf_counter()
            ours = {mode: evaluate_files(gold, pred, mode=mode)["f1"] for mode in ("official", "normalised")}
            t1 = time.perf_counter()
            theirs = smatch_corpus_f(gold, pred)
            print(json.dumps({"gold": name, "pred": label, "official": round(ours["official"], 4),
                              "smatch_1.0.4": round(theirs, 4), "diff": round(abs(ours["official"] - theirs), 4),
                              "normalised": round(ours["normalised"], 4), "ours_s": round(t1 - t0, 1),
                              "smatch_s": round(time.perf_counter() - t1, 1)}, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
