"""Evaluation generation, today's path against the new one, as ratios from one run.

    python bench/bench_eval.py [--data-dir ../shared/data/vlsp2025] [--device cpu|cuda]
                               [--models tiny,qwen_like] [--max-new-tokens 128] [--base c76575d]

"Today's" code is the package as it was at ``--base`` (a git revision, read with
``git archive`` into a temporary directory and imported as ``ray_mtup_base``); the new code is
this checkout. Both generate the validation prompts of the project's seeded split (all 184
VLSP graphs by default) with the same model object, free (stopping rule) and grammar-
constrained, and the script prints per arm: wall seconds, new tokens/s, seconds inside the
stopping rule and inside the grammar processor, and whether the parses are identical. Models:
``tiny`` (the project's tiny model, tokenizer trained on the corpus) and ``qwen_like`` (a
checkpoint written by the project's writer in the tests' Qwen2 layout, ``SMALL_TINY``);
both are random-init, so rows run to the budget: the case whose per-step cost grows.

Each arm generates from the model its path generates from: with ``--lora`` (the default) the
model carries the run's LoRA (``modeling.apply_lora``: r 64 on the seven projections, as peft
initialises it), today's path generates from it unmerged (``engine.module``, as it did on the
ZeRO-2 and one-worker paths) and the new one merged in place (``replica.merged_in_place``, the
evaluation's path). A fresh adapter's B is zero, so both give the same tokens while each pays
its path's cost; ``--no-lora`` compares the bare base in both arms.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, default_data_dir, emit  # noqa: E402

SMALL_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 800}


def load_base(rev: str, into: Path) -> Any:
    """The package as it was at ``rev``, importable as ``ray_mtup_base``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ray_mtup"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "ray_mtup").rename(into / "ray_mtup_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("ray_mtup_base.generation"), importlib.import_module("ray_mtup_base.grammar")


class Timer:
    """Seconds spent inside ``cls.__call__`` (patched for the block)."""

    def __init__(self, cls: Any):
        self.cls, self.seconds, self.calls = cls, 0.0, 0

    def __enter__(self) -> "Timer":
        inner = self.original = self.cls.__call__
        timer = self

        def timed(obj: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(obj, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.calls += 1

        self.cls.__call__ = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.__call__ = self.original


def models(names: list[str], data_dir: str, device: str) -> Any:
    from ray_mtup.config import TinyModelSettings, TrainConfig, resolve_config
    from ray_mtup.dataset import tokenizer_texts
    from ray_mtup.modeling import WeightsSource, build_model, build_tokenizer, write_tiny_checkpoint
    from ray_mtup.training import prepare_data

    cfg = resolve_config("tiny", overrides={"data_dir": data_dir})
    data, source, tokenizer = prepare_data(cfg)
    for name in names:
        if name == "tiny":
            yield name, build_model(source, cfg, tokenizer, device), tokenizer, data
        elif name == "qwen_like":
            texts = tokenizer_texts(data.train)
            path = write_tiny_checkpoint(TinyModelSettings(**SMALL_TINY), 0, texts,
                                         cache_dir=Path(tempfile.gettempdir()) / "ray_mtup_bench_eval")
            src = WeightsSource(str(path))
            tok = build_tokenizer(src)
            yield name, build_model(src, TrainConfig(model_path=str(path)), tok, device), tok, data
        else:
            raise SystemExit(f"unknown model {name!r}")


def rule_cost(base_gen: Any, new_gen: Any, tokenizer: Any, data: Any, rows: int, steps: int) -> dict[str, Any]:
    """The stopping rule alone, old against new, on ``rows`` rows of ``steps`` tokens cut from the
    validation gold graphs (no step-2 marker, so no row stops: the rows that run to the budget)."""
    import torch

    from ray_mtup.prompts import get_template

    template = get_template("v4_compact")
    text = " ".join(data.val_gold)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    streams = [ids[i * 7: i * 7 + steps] for i in range(rows)]
    full = torch.tensor(streams)
    out: dict[str, Any] = {"bench": "stopping_rule", "rows": rows, "steps": steps}
    decisions = {}
    for label, gen in (("base", base_gen), ("new", new_gen)):
        rule = gen.Step2Closed(tokenizer, template, 0)
        seconds, per_step, made = 0.0, [], []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            made.append(rule(full[:, :step], None).tolist())
            dt = time.perf_counter() - t0
            seconds += dt
            per_step.append(dt)
        decisions[label] = made
        out[label] = {"seconds": round(seconds, 3), "ms_first_10_steps": round(1e3 * sum(per_step[:10]) / 10, 3),
                      "ms_last_10_steps": round(1e3 * sum(per_step[-10:]) / 10, 3)}
    out["speedup"] = round(out["base"]["seconds"] / max(out["new"]["seconds"], 1e-9), 1)
    out["same_decisions"] = decisions["base"] == decisions["new"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="corpus directory (default: RAY_MTUP_DATA_DIR, else ../shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny,qwen_like")
    p.add_argument("--n", type=int, default=None, help="validation prompts (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="eval_batch_size of both paths")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget per row (0: derived from the data)")
    p.add_argument("--base", default="c76575d", help="git revision of today's path")
    p.add_argument("--arms", default="free,constrained", help="free, constrained, both, or none (rule only)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="the run's LoRA on the model: unmerged in today's arm, merged in place in the new one")
    p.add_argument("--rule-steps", type=int, default=900,
                   help="steps of the stopping-rule-only measurement (0: skip it); 900 is about 7B's derived budget")
    p.add_argument("--forward-steps", type=int, default=32,
                   help="with --rule-steps: time this many plain generation steps at the same batch (0: skip)")
    args = p.parse_args(argv)

    import torch

    import ray_mtup.generation as new_gen
    import ray_mtup.grammar as new_grammar
    from ray_mtup.config import resolve_config
    from ray_mtup.generation import parse_outputs, prompts_for
    from ray_mtup.modeling import apply_lora
    from ray_mtup.prompts import get_template
    from ray_mtup.replica import merged_in_place

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base_gen, base_grammar = load_base(args.base, Path(tmp))
        for name, model, tokenizer, data in models(args.models.split(","), args.data_dir or default_data_dir(),
                                                    args.device):
            template = get_template("v4_compact")
            if args.lora:
                model = apply_lora(model, resolve_config("tiny").lora).eval()
            rows = data.val[:args.n] if args.n else data.val
            prompts = prompts_for(template, [ex.sentence for ex in rows])
            budget = args.max_new_tokens or data.max_new_tokens
            if args.rule_steps:
                rule = rule_cost(base_gen, new_gen, tokenizer, data, args.batch_size, args.rule_steps)
                emit({"model": name, **rule})
                if args.forward_steps:  # the model's own step at the same batch, same run: the rule's share
                    t0 = time.perf_counter()
                    new_gen.generate(model, tokenizer, prompts[:args.batch_size], batch_size=args.batch_size,
                                     max_new_tokens=args.forward_steps)
                    step = (time.perf_counter() - t0) / args.forward_steps
                    whole = {k: args.rule_steps * step + rule[k]["seconds"] for k in ("base", "new")}
                    emit({"bench": "batch_of_budget", "model": name, "rows": args.batch_size,
                          "steps": args.rule_steps, "model_ms_per_step": round(1e3 * step, 2),
                          "base_s": round(whole["base"], 1), "new_s": round(whole["new"], 1),
                          "speedup": round(whole["base"] / whole["new"], 2),
                          "note": "steps x measured model step + measured rule seconds, one batch run to the budget"})
            for arm in [a for a in args.arms.split(",") if a and a != "none"]:
                result: dict[str, Any] = {}
                for label, gen, gram in (("base", base_gen, base_grammar), ("new", new_gen, new_grammar)):
                    merged = merged_in_place(model) if args.lora and label == "new" else contextlib.nullcontext(model)
                    with Timer(gen.Step2Closed) as stop, Timer(gram.PenmanLogitsProcessor) as proc:
                        t0 = time.perf_counter()
                        with merged as gen_model:  # the merge is timed: the new path pays it every epoch
                            out = gen.generate(gen_model, tokenizer, prompts, batch_size=args.batch_size,
                                               max_new_tokens=budget, stop_template=template,
                                               constrained=arm == "constrained")
                        wall = time.perf_counter() - t0
                    result[label] = {"wall_s": round(wall, 2), "new_tokens": sum(out.new_tokens),
                                     "new_tokens_per_s": round(sum(out.new_tokens) / wall, 1),
                                     "stopping_rule_s": round(stop.seconds, 3),
                                     "grammar_processor_s": round(proc.seconds, 3),
                                     "parses": [(x.task1_graph, x.task2_graph)
                                                for x in parse_outputs(template, out.texts)]}
                same = result["base"].pop("parses") == result["new"].pop("parses")
                emit({"bench": "eval", "model": name, "device": args.device, "arm": arm, "rows": len(prompts),
                      "lora": "base unmerged, new merged in place" if args.lora else "none",
                      "max_new_tokens": budget, "batch_size": args.batch_size, **result,
                      "speedup": round(result["base"]["wall_s"] / max(result["new"]["wall_s"], 1e-9), 2),
                      "same_parses": same})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
