"""The step-2 stopping rule: rows that run out of budget, tokens and time, with the rule and without.

    python bench/bench_stopping.py --run runs/<run> [--n 64]

Loads a trained run's adapter (as ``predict`` does), generates its validation prompts twice
with the run's own token budget — once ending rows at EOS only, once also ending a row as soon
as its step-2 graph has closed — and prints, for each, the rows that hit the budget, the new
tokens, the seconds, and Task 2 F1 (normalised mode) of the parsed graphs. The rule must not
change a parse: it only cuts what follows the closed graph.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run directory (or adapter directory)")
    parser.add_argument("--n", type=int, default=64, help="validation prompts (the first N of the split)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from ray_mtup import scoring
    from ray_mtup.dataset import load_examples
    from ray_mtup.generation import generate, parse_outputs, prompts_for
    from ray_mtup.predict import find_adapter, load_merged
    from ray_mtup.prompts import get_template

    model, tokenizer, cfg = load_merged(find_adapter(args.run))
    budget = cfg.max_new_tokens
    _, val, gold = load_examples(cfg)
    template = get_template(cfg.template)
    prompts = prompts_for(template, [ex.sentence for ex in val[:args.n]])
    parses = {}
    for rule in ("eos_only", "step2_closed"):
        t0 = time.perf_counter()
        out = generate(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=budget,
                       stop_template=template if rule == "step2_closed" else None)
        seconds = time.perf_counter() - t0
        parses[rule] = [p.task2_graph for p in parse_outputs(template, out.texts)]
        f1 = scoring.score_corpus(gold[:len(prompts)], parses[rule], mode="normalised").f1
        emit({"bench": "stopping", "rule": rule, "rows": len(prompts), "max_new_tokens": budget,
              "hit_token_limit": sum(out.hit_limit), "new_tokens": sum(out.new_tokens),
              "seconds": round(seconds, 2), "task2_f1": round(f1, 4)})
    same = sum(a == b for a, b in zip(parses["eos_only"], parses["step2_closed"]))
    emit({"bench": "stopping", "identical_parses": same, "rows": len(prompts)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
