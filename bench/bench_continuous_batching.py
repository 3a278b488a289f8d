"""transformers' continuous batching against the project's evaluation generation, in one run.

    python bench/bench_continuous_batching.py [--data-dir ../shared/data/vlsp2025] [--device cpu|cuda]
                                              [--models tiny,qwen_like] [--n 64] [--max-new-tokens 64]

Both arms generate greedily from the same model object for the first ``--n`` validation prompts
of the project's seeded split: ``project`` is ``ray_mtup.generation.generate`` (length-sorted
batches of ``eval_batch_size``, the stopping rule), ``continuous`` is ``model.generate_batch``
(paged attention, rows refilled as others end; it stops rows only at EOS or the budget). The
models are random-init (``bench_eval.models``), so no row ends early: the case where refilling
gains nothing and each arm's per-step overhead shows. Prints wall seconds, new tokens/s, the
ratio, and whether the generated token ids are the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_eval import models  # noqa: E402
from bench.common import default_data_dir, emit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="corpus directory (default: RAY_MTUP_DATA_DIR, else ../shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny,qwen_like")
    p.add_argument("--n", type=int, default=64, help="validation prompts")
    p.add_argument("--batch-size", type=int, default=32, help="the project's eval_batch_size")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    import torch
    from ray_mtup.generation import decoding_config, generate, prompts_for
    from ray_mtup.prompts import get_template

    torch.manual_seed(0)
    template = get_template("v4_compact")
    for name, model, tokenizer, data in models(args.models.split(","), args.data_dir or default_data_dir(),
                                                args.device):
        prompts = prompts_for(template, [ex.sentence for ex in data.val[:args.n]])
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
        gen_cfg = decoding_config(tokenizer, args.max_new_tokens)  # the project's greedy settings
        t0 = time.perf_counter()
        project = generate(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           stop_template=template)
        project_s = time.perf_counter() - t0
        model.generate_batch(ids[:2], generation_config=gen_cfg, progress_bar=False)  # warm-up, not timed
        t0 = time.perf_counter()
        outputs = model.generate_batch(ids, generation_config=gen_cfg, progress_bar=False)
        continuous_s = time.perf_counter() - t0
        by_prompt = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outputs.values()}
        continuous_texts = [tokenizer.decode(by_prompt[tuple(x)], skip_special_tokens=True) for x in ids]
        new_tokens = sum(project.new_tokens)
        emit({"bench": "continuous_batching", "model": name, "device": args.device, "rows": len(ids),
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "project_s": round(project_s, 2), "continuous_s": round(continuous_s, 2),
              "project_new_tokens_per_s": round(new_tokens / project_s, 1),
              "continuous_new_tokens_per_s": round(sum(len(v) for v in by_prompt.values()) / continuous_s, 1),
              "continuous_over_project": round(continuous_s / project_s, 2),
              "same_texts": [t.strip() for t in continuous_texts] == [t.strip() for t in project.texts]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
