"""Evaluation generation throughput: the project's ``generate`` against HF's default batched call.

    python bench/bench_generate.py --model tiny --n-prompts 64 --max-new-tokens 64
    python bench/bench_generate.py --model qwen2.5-7b --static-cache --compile     # on a GPU

Prompts: the validation split of the corpus (``load_examples`` + ``prompts_for``, the 184
graphs the per-epoch evaluation generates for on the full corpus), or the shipped sample
corpus when ``--data-dir`` is absent. The model is wrapped with a fresh LoRA adapter, as
``engine.module`` is during evaluation (``--no-lora`` for the bare model). Variants, all
greedy with the same ``--max-new-tokens``:

* ``hf_default``: ``model.generate`` on batches of ``--hf-batch`` (64) prompts in input
  order, left-padded, with the model's default generation settings;
* ``project``: :func:`ray_mtup.generation.generate` (batches sorted by length, stop at EOS,
  ``--batch-size`` = the evaluation batch);
* ``project_static`` (with ``--static-cache``): the same call with
  ``generation_config.cache_implementation = "static"``; ``--compile`` lets transformers
  compile the decoding step (automatic on GPU with a static cache; forced on CPU), without it
  compilation is disabled.

The ``project`` variants generate as the per-epoch evaluation does: with the step-2 stopping
rule (:class:`ray_mtup.generation.Step2Closed`, ``stop_template``), whose cost is part of the time.

``--real-lengths`` (the GPU check uses it): a random-init model never emits EOS, so every row
would run to ``--max-new-tokens`` and a batch costs what its budget allows, unlike a trained
parser. :class:`EndAtRealLength` then forces EOS in each row once it has generated as many
tokens as a real completion of the corpus (the training split's MTUP completions, encoded with
the run's tokenizer: step 1, step 2 and EOS), picked per prompt by a hash of its tokens, so both
variants stop every row at the same length. Without it, new tokens are counted per sequence up
to and including its first EOS. Prints one JSON object per variant and a ``generate_ratio`` line
(each variant's new tokens/s over ``hf_default``'s).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

from bench.common import CORPUS_FILES, MODEL_CHOICES, build_base_model, default_data_dir, emit  # noqa: E402


def new_token_count(row: Sequence[int], eos_id: int) -> int:
    """Generated tokens of one row up to and including its first EOS (all of them if none).

    >>> new_token_count([5, 6, 0, 1, 1], eos_id=0), new_token_count([5, 6, 7], eos_id=0)
    (3, 3)
    """
    for i, tok in enumerate(row):
        if tok == eos_id:
            return i + 1
    return len(row)


def pick_length(prompt_ids: Sequence[int], lengths: Sequence[int]) -> int:
    """The real completion length assigned to a prompt: ``lengths`` indexed by a hash of its
    tokens (stable across processes, unlike ``hash``).

    >>> pick_length([5, 6, 7], [10, 20, 30]) == pick_length([5, 6, 7], [10, 20, 30])
    True
    >>> pick_length([1], [42])
    42
    """
    import zlib

    return lengths[zlib.crc32(",".join(map(str, prompt_ids)).encode()) % len(lengths)]


class EndAtRealLength:
    """A logits processor that makes EOS the only choice once a row has generated its target
    number of tokens (:func:`pick_length` of its prompt, left padding stripped).

    A generate call is recognised by its prompts: a call whose first ``width`` columns differ
    from the previous call's, or whose length is not one more, is a new batch, and its rows'
    targets are computed once; every later step is one comparison on the device."""

    def __init__(self, lengths: Sequence[int], eos_id: int, pad_id: int):
        self.lengths, self.eos_id, self.pad_id = list(lengths), eos_id, pad_id
        self.prompts: Any = None
        self.targets: Any = None
        self.last_len = -1

    def _new_batch(self, input_ids: Any) -> bool:
        if self.prompts is None or input_ids.shape[0] != self.prompts.shape[0]:
            return True
        if input_ids.shape[1] != self.last_len + 1:
            return True
        return not bool((input_ids[:, : self.prompts.shape[1]] == self.prompts).all())

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._new_batch(input_ids):
            self.prompts = input_ids.clone()
            rows = [[t for t in row if t != self.pad_id] for row in input_ids.tolist()]
            self.targets = torch.tensor([pick_length(r, self.lengths) for r in rows], device=input_ids.device)
        self.last_len = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompts.shape[1]
        done = (generated + 1 >= self.targets).unsqueeze(1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_id] = 0.0
        return torch.where(done, forced, scores)


class GenerateCounter:
    """Wraps ``model.generate`` (as an instance attribute) to count what each call produced,
    and to add ``processor`` (an :class:`EndAtRealLength`) to every call's logits processors."""

    def __init__(self, model: Any, eos_id: int, processor: Any = None):
        self.model, self.eos_id, self.processor = model, eos_id, processor
        self.inner = model.generate
        self.new_tokens = 0
        self.positions = 0
        self.calls = 0

    def __enter__(self) -> "GenerateCounter":
        self.model.generate = self
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.generate  # back to the class's method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.processor is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), self.processor])
        out = self.inner(*args, **kwargs)
        width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        new = out[:, width:].tolist()
        self.calls += 1
        self.positions += sum(len(r) for r in new)
        self.new_tokens += sum(new_token_count(r, self.eos_id) for r in new)
        return out


def hf_default_generate(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int,
                        max_new_tokens: int) -> None:
    """HF's documented batched call: prompts in input order, left-padded, default settings."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=False)
        with torch.no_grad():
            model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                           max_new_tokens=max_new_tokens)


def real_completion_lengths(tokenizer: Any, cfg: Any, train: Sequence[Any], cap: int) -> list[int]:
    """The training split's MTUP completion lengths (step 1, step 2, EOS) in ``tokenizer``'s
    tokens, each at most ``cap``."""
    from ray_mtup.dataset import encode_all
    from ray_mtup.prompts import get_template

    encoded, _ = encode_all(tokenizer, get_template(cfg.template), list(train), cfg.max_seq_len)
    return sorted(min(cap, e.completion_length) for e in encoded)


def load_prompts(args: argparse.Namespace) -> tuple[Any, list[str], str, list[Any]]:
    """(the run's TrainConfig, validation prompts, the corpus they come from, the training split)."""
    from ray_mtup.config import TrainConfig
    from ray_mtup.generation import prompts_for
    from ray_mtup.prompts import get_template
    from ray_mtup.dataset import load_examples

    data_dir = Path(args.data_dir)
    have_corpus = all((data_dir / f).is_file() for f in CORPUS_FILES)
    cfg = TrainConfig(model=args.model, model_path=args.model_path, data_dir=str(data_dir) if have_corpus else None,
                      use_gpu=args.device == "cuda", max_new_tokens=args.max_new_tokens, seed=args.seed)
    train, val, _ = load_examples(cfg)
    prompts = prompts_for(get_template(cfg.template), [ex.sentence for ex in val])
    if args.n_prompts is not None:
        prompts = (prompts * (1 + args.n_prompts // max(1, len(prompts))))[:args.n_prompts]
    return cfg, prompts, str(data_dir) if have_corpus else "sample_data", train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="tiny")
    parser.add_argument("--model-path", default=None, help="real weights (directory or .gguf) instead of random init")
    parser.add_argument("--data-dir", default=default_data_dir(), help="corpus folder (default: %(default)s)")
    parser.add_argument("--n-prompts", type=int, default=None, help="first N validation prompts (repeated if short)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per prompt")
    parser.add_argument("--batch-size", type=int, default=None, help="project batch (default: TrainConfig.eval_batch_size)")
    parser.add_argument("--hf-batch", type=int, default=64, help="batch of the HF default call")
    parser.add_argument("--static-cache", action="store_true", help="also run the project path with a static KV cache")
    parser.add_argument("--compile", action="store_true", help="with --static-cache: compile the decoding step")
    parser.add_argument("--variants", default=None, help="comma-separated subset of hf_default,project,project_static")
    parser.add_argument("--no-lora", action="store_true", help="generate with the bare model (no LoRA adapter)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--real-lengths", action="store_true",
                        help="end each row at the length of a real completion of the corpus (EndAtRealLength)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("penman").setLevel(logging.ERROR)

    import torch
    from transformers import CompileConfig

    from ray_mtup.generation import generate
    from ray_mtup.dataset import tokenizer_texts
    from ray_mtup.modeling import apply_lora, base_source, build_tokenizer
    from ray_mtup.prompts import get_template

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, prompts, source, train = load_prompts(args)
    batch_size = args.batch_size or cfg.eval_batch_size
    if args.model == "tiny" or args.model_path is not None:
        weights = base_source(cfg, tokenizer_texts(train))
    else:  # random-init Qwen2.5 shape: the tiny BPE only supplies ids below the vocabulary size
        from ray_mtup.config import TrainConfig

        weights = base_source(TrainConfig(), tokenizer_texts(train))
    tokenizer = build_tokenizer(weights)
    model = build_base_model(args.model, cfg, tokenizer, device, weights)
    if not args.no_lora:
        model = apply_lora(model, cfg.lora)
    model.eval()
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    real = real_completion_lengths(tokenizer, cfg, train, args.max_new_tokens) if args.real_lengths else None
    ender = EndAtRealLength(real, tokenizer.eos_token_id, tokenizer.pad_token_id) if real else None
    template = get_template(cfg.template)

    variants = args.variants.split(",") if args.variants else \
        ["hf_default", "project"] + (["project_static"] if args.static_cache else [])
    gen_config = model.generation_config
    base = {"model": args.model, "random_init": args.model != "tiny" and args.model_path is None,
            "lora": not args.no_lora, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "prompts": len(prompts), "prompt_source": source,
            "prompt_len_min": min(lengths), "prompt_len_max": max(lengths), "max_new_tokens": args.max_new_tokens,
            "real_lengths": bool(real), "stop_rule": "project variants: Step2Closed",
            **({"real_length_median": real[len(real) // 2], "real_length_max": real[-1]} if real else {})}
    generate(model, tokenizer, prompts[:8], batch_size=8, max_new_tokens=8)  # warm-up: first-call costs
    rates: dict[str, float] = {}
    for variant in variants:
        gen_config.cache_implementation = "static" if variant == "project_static" else None
        gen_config.disable_compile = not (variant == "project_static" and args.compile)
        gen_config.compile_config = None
        if variant == "project_static" and args.compile:
            gen_config.compile_config = CompileConfig()
            if device.type == "cpu":
                gen_config.compile_config._compile_all_devices = True  # transformers compiles on GPU only otherwise
        runs = []
        for _ in range(args.repeats + (1 if variant == "project_static" and args.compile else 0)):
            with GenerateCounter(model, tokenizer.eos_token_id, ender) as counter:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                if variant == "hf_default":
                    hf_default_generate(model, tokenizer, prompts, args.hf_batch, args.max_new_tokens)
                else:
                    generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                             stop_template=template)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append((time.perf_counter() - t0, time.process_time() - c0, counter.new_tokens,
                             counter.positions, counter.calls))
        if variant == "project_static" and args.compile:
            compile_run = runs.pop(0)  # the first run includes compilation
        seconds, cpu_seconds, new_tokens, positions, calls = min(runs)
        rates[variant] = new_tokens / seconds
        record = {"bench": "generate", "variant": variant, **base,
                  "batch_size": args.hf_batch if variant == "hf_default" else batch_size, "generate_calls": calls,
                  "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "new_tokens": new_tokens, "positions_computed": positions,
                  "new_tokens_per_s": round(rates[variant], 1),
                  "compile": variant == "project_static" and args.compile, "loadavg_1m": round(os.getloadavg()[0], 2)}
        if variant == "project_static" and args.compile:
            record["first_run_seconds_with_compile"] = round(compile_run[0], 3)
        emit(record)
    if "hf_default" in rates:
        emit({"bench": "generate_ratio", **base,
              **{f"{v}_over_hf_default": round(r / rates["hf_default"], 3) for v, r in rates.items() if v != "hf_default"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
