"""Training tokens/s with padding-free packing (and Liger's kernels) against "off", in one run.

    python bench/bench_packing.py --model tiny --rounds 3                    # CPU
    python bench/bench_packing.py --model qwen2.5-7b --batch 2 --gradient-checkpointing --liger   # one GPU

The same real micro-batches of the corpus (``--data-dir``, default ``../shared/data/vlsp2025``
when present, else the shipped sample corpus), encoded by the project and picked by the training
loop's :class:`~ray_mtup.dataset.LengthGroupedBatches`, go through the loop's DeepSpeed ZeRO-2
step (:func:`ray_mtup.engine.deepspeed_config`, :func:`ray_mtup.training.micro_batch`,
:func:`ray_mtup.training.forward_loss`, ``engine.backward``, ``engine.step``) in each variant:

* ``padded``: dynamic padding (the default loop);
* ``packed``: ``packing`` on, one padding-free row per micro-batch;
* with ``--liger`` (CUDA and liger-kernel present): ``padded_liger`` and ``packed_liger``, run
  after the others, since Liger patches transformers' Qwen2 module for the whole process.

Each variant is rebuilt from the same seed; ``--rounds`` repeats them (interleaved, so load from
other jobs hits all). tokens/s counts real tokens only (no padding). Prints one JSON object per
variant, then a ``packing_ratio`` line: each variant's tokens/s over ``padded``'s (median round
and best round), and the first micro-batch's loss of each (packed equals padded to 1e-4).
Qwen2.5 names without ``--model-path`` build a random-init model of the real shape and feed it
the tiny BPE's token ids of the same examples (real lengths, not Qwen's tokenisation).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

from bench.bench_train import _standalone_env  # noqa: E402
from bench.common import DEFAULT_DATA_DIR, MODEL_CHOICES, build_base_model, emit, summarise  # noqa: E402

VARIANTS = {"padded": (False, False), "packed": (True, False),
            "padded_liger": (False, True), "packed_liger": (True, True)}


def data_dir(arg: str | None) -> str | None:
    """``--data-dir``, else the VLSP corpus next to the repository when present, else None (the
    shipped sample corpus)."""
    if arg:
        return arg
    from ray_mtup.config import corpus_dir

    found = corpus_dir(None, default=DEFAULT_DATA_DIR)
    return str(found) if found is not None and (found / "train_amr_1.txt").is_file() else None


def base_config(args: argparse.Namespace, on_gpu: bool) -> Any:
    from ray_mtup.config import LoraSettings, TrainConfig

    return TrainConfig(model=args.model, model_path=args.model_path, data_dir=data_dir(args.data_dir),
                       max_samples=args.max_samples, per_device_batch_size=args.batch,
                       global_batch_size=args.batch, zero_stage=2, use_gpu=on_gpu, seed=args.seed,
                       lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0),
                       gradient_checkpointing=args.gradient_checkpointing, max_seq_len=args.max_seq_len)


def real_batches(cfg: Any, n: int) -> tuple[list[list[Any]], Any, Any]:
    """The first ``n`` micro-batches the loop's sampler picks in epoch 1, the tokenizer and the
    weights' source (tiny's for a Qwen2.5 shape without weights)."""
    from ray_mtup import dataset
    from ray_mtup.training import prepare_data

    data_cfg = cfg if cfg.model == "tiny" or cfg.model_path else cfg.replace(model="tiny")
    data, source, tokenizer = prepare_data(data_cfg)
    sampler = dataset.LengthGroupedBatches([len(e) for e in data.train_encoded], cfg.per_device_batch_size,
                                           seed=cfg.seed)
    sampler.set_epoch(1)
    batches = [[data.train_encoded[i] for i in idx] for idx in sampler][:n]
    return batches, tokenizer, source


def run_variant(name: str, args: argparse.Namespace, cfg: Any, batches: list[list[Any]], tokenizer: Any,
                source: Any, device: Any, on_gpu: bool) -> dict[str, Any]:
    """Build the model + LoRA + engine afresh, run the micro-batches, free everything."""
    import deepspeed
    import torch

    from ray_mtup.engine import deepspeed_config
    from ray_mtup.modeling import apply_liger, apply_lora, effective_packing, liger_applied
    from ray_mtup.training import forward_loss, micro_batch

    packing, liger = VARIANTS[name]
    cfg = cfg.replace(packing=packing, liger_kernel=liger)
    torch.manual_seed(cfg.seed)
    model = build_base_model(args.model, cfg, tokenizer, device, source)
    if liger and not liger_applied(model):  # a random-init Qwen2.5 shape skips build_model
        apply_liger(model, cfg, device.type)
    packing = effective_packing(cfg, model)
    model = apply_lora(model, cfg.lora)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=deepspeed_config(cfg, 1, on_gpu))
    engine.train()
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    seconds, losses, real, padded = 0.0, [], 0, 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    for i, items in enumerate(batches):
        batch = micro_batch(items, pad, packing, on_gpu)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_loss(engine, batch, device)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if on_gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds += time.perf_counter() - t0
            real += sum(len(x) for x in items)
            padded += batch["input_ids"].numel()
    out = {"seconds": seconds, "real_tokens": real, "row_tokens": padded, "first_loss": losses[0],
           "packing": packing, "liger_kernel": liger_applied(engine.module),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None}
    engine.destroy()
    del engine, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="tiny")
    parser.add_argument("--model-path", default=None, help="real weights (directory or .gguf)")
    parser.add_argument("--data-dir", default=None, help="corpus (default: ../shared/data/vlsp2025 if present)")
    parser.add_argument("--max-samples", type=int, default=400, help="corpus subset that is encoded")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (examples)")
    parser.add_argument("--batches", type=int, default=8, help="timed micro-batches per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed micro-batches first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the variants")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true", help="also Liger on vs off (needs CUDA + liger-kernel)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    _standalone_env()
    import deepspeed
    import torch

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if not on_gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = base_config(args, on_gpu)
    batches, tokenizer, source = real_batches(cfg, args.warmup + args.batches)
    from ray_mtup.modeling import liger_status

    phases = [["padded", "packed"]]
    if args.liger:
        ok, why = liger_status(cfg.replace(liger_kernel=True), device.type)
        if ok:
            phases.append(["padded_liger", "packed_liger"])  # after: Liger's patches are process-wide
        else:
            emit({"bench": "packing", "note": f"--liger skipped: {why}"})
    common = {"model": args.model, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "corpus": cfg.data_dir or "sample", "batch": args.batch, "batches": args.batches,
              "rounds": args.rounds, "gradient_checkpointing": args.gradient_checkpointing}
    runs: dict[str, list[dict[str, Any]]] = {}
    for phase in phases:
        for _ in range(args.rounds):
            for name in phase:
                runs.setdefault(name, []).append(
                    run_variant(name, args, cfg, batches, tokenizer, source, device, on_gpu))
    rate: dict[str, float] = {}
    best: dict[str, float] = {}
    for name, rounds in runs.items():
        real = rounds[0]["real_tokens"]
        stats = summarise([r["seconds"] for r in rounds])
        rate[name], best[name] = real / stats["median_s"], real / stats["min_s"]
        emit({"bench": "packing", "variant": name, **common, "packing": rounds[0]["packing"],
              "liger_kernel": rounds[0]["liger_kernel"], "real_tokens": real,
              "useful_token_fraction": round(real / rounds[0]["row_tokens"], 4),
              "tokens_per_s": round(rate[name], 1), "tokens_per_s_best": round(best[name], 1),
              "first_loss": round(rounds[0]["first_loss"], 6), "peak_mem_gib": rounds[0]["peak_mem_gib"],
              "loadavg_1m": round(os.getloadavg()[0], 2)})
    emit({"bench": "packing_ratio", **common,
          **{f"{n}_over_padded": round(rate[n] / rate["padded"], 3) for n in rate if n != "padded"},
          **{f"{n}_over_padded_best": round(best[n] / best["padded"], 3) for n in best if n != "padded"},
          **({"packed_liger_over_packed": round(rate["packed_liger"] / rate["packed"], 3)}
             if "packed_liger" in rate else {}),
          "first_loss_packed_minus_padded": runs["packed"][0]["first_loss"] - runs["padded"][0]["first_loss"]})
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
