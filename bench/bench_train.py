"""Training tokens/s: the project's DeepSpeed ZeRO step against a plain transformers + peft loop.

    torchrun --nproc_per_node 1 bench/bench_train.py --model tiny --steps 5
    torchrun --nproc_per_node 1 bench/bench_train.py --model qwen2.5-7b --seq-len 1024 \\
        --batch 2 --gradient-checkpointing          # on one GPU

Runs, in one process group and on the same random batch (``--batch`` x ``--seq-len`` tokens,
no padding, labels = inputs) and the same model and LoRA adapter (rebuilt from the same
seed for every variant):

* ``plain_peft``: ``loss.backward()``, gradient clipping, ``torch.optim.AdamW`` (wrapped in
  DDP when there is more than one process);
* ``deepspeed_zero2`` / ``deepspeed_zero3``: the training loop's step, i.e. ``deepspeed.initialize``
  with :func:`ray_mtup.training.deepspeed_config` (bf16 on GPU, torch AdamW), ``engine(**batch)``,
  ``engine.backward``, ``engine.step``.

``tiny`` is the project's random-init Qwen2 (:func:`ray_mtup.modeling.build_model`); the
``qwen2.5-*`` names build a random-init ``Qwen2ForCausalLM`` with the real shape
(:data:`bench.common.QWEN25_DIMS`) unless ``--model-path`` gives weights. Prints one JSON
object per variant (rank 0) and a ``train_ratio`` line: each ZeRO variant's tokens/s over
the plain loop's, from the median step (``*_over_plain``) and from the fastest step
(``*_over_plain_best``: the steadier figure on a machine shared with other jobs; use
``--rounds`` there too, which interleaves the variants). Without torchrun it runs as a single process (world size 1).

Micro-batch at a fixed global batch (issue 13): ``--global-batch 16 --micro-batches 2,auto``
replaces the variants above with one DeepSpeed variant per micro-batch, each an optimizer step
of ``global / (micro x world)`` accumulated micro-steps over ``micro x --seq-len`` random
tokens; ``auto`` is the micro-batch (and each variant's ZeRO stage) that
:mod:`ray_mtup.memory` plans for this device (or for ``--device-memory`` bytes), as
``zero_stage: auto`` / ``per_device_batch_size: auto`` runs get. Prints one JSON object per
variant with its plan, and a ``micro_batch_ratio`` line: the planned variant's tokens/s over
the first one's, from the median step (``planned_over_micro2``) and the fastest
(``planned_over_micro2_best``; ``--rounds`` interleaves the variants)::

    python bench/bench_train.py --model tiny --seq-len 256 --global-batch 16 --micro-batches 2,auto --steps 3

The plan is made for ``--plan-seq-len`` tokens (the loop plans at the longest training example;
default ``--seq-len``) and timed at ``--seq-len``. ``--with-plain`` adds ``plain_peft`` at the
first setting's micro-batch and accumulation (``planned_over_plain``): the GPU check's train step,
``--micro-batches auto --with-plain``, is the run a user gets against plain peft. Every DeepSpeed
variant builds its model while a ``HfDeepSpeedConfig`` of its config is alive, as the loop's
:func:`ray_mtup.engine.build_engine` does, so under ZeRO-3 the base is partitioned as it is built
(``zero.Init``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

from bench.common import MODEL_CHOICES, build_base_model, emit, rank_device, summarise  # noqa: E402

logger = logging.getLogger("bench_train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standalone_env() -> None:
    """Make a lone ``python bench/bench_train.py`` look like ``torchrun --nproc_per_node 1``."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def train_config(args: argparse.Namespace, zero_stage: int | str, on_gpu: bool, world: int = 1,
                 micro: int | str | None = None, global_batch: int | None = None) -> Any:
    """The TrainConfig whose DeepSpeed config and model settings the bench uses (by default one
    micro-batch of ``--batch`` per optimizer step)."""
    from ray_mtup.config import LoraSettings, TrainConfig

    micro = args.batch if micro is None else micro
    return TrainConfig(
        model=args.model, model_path=args.model_path, per_device_batch_size=micro,
        global_batch_size=global_batch or micro * world, num_workers=world,
        zero_stage=zero_stage, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
        gradient_checkpointing=args.gradient_checkpointing, use_gpu=on_gpu,
        max_seq_len=max(32, args.seq_len), seed=args.seed,
    )


def build_tokenizer_for(args: argparse.Namespace) -> tuple[Any, Any]:
    """Tiny: the project's BPE trained on the shipped sample corpus; Qwen shapes: only the
    vocabulary size matters (the batch is random ids), so no tokenizer is loaded."""
    from ray_mtup.config import TrainConfig
    from ray_mtup.dataset import load_examples, tokenizer_texts
    from ray_mtup.modeling import base_source, build_tokenizer

    if args.model == "tiny":
        cfg = TrainConfig()
        train, _, _ = load_examples(cfg)
        source = base_source(cfg, tokenizer_texts(train))
        return build_tokenizer(source), source
    if args.model_path is not None:
        source = base_source(TrainConfig(model=args.model, model_path=args.model_path))
        return build_tokenizer(source), source
    return None, None


def make_batch(vocab_size: int, batch: int, seq_len: int, seed: int, device: Any) -> dict[str, Any]:
    """A fixed random batch: no padding, labels = inputs (every position is trained on)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device)}


def time_steps(step: Callable[[], float], steps: int, warmup: int,
               sync: Callable[[], None]) -> tuple[list[float], list[float], list[float]]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``.

    Returns (wall seconds, process CPU seconds, losses of every call).

    >>> wall, cpu, losses = time_steps(lambda: 1.5, steps=2, warmup=1, sync=lambda: None)
    >>> len(wall), len(cpu), losses
    (2, 2, [1.5, 1.5, 1.5])
    """
    losses, times, cpu = [], [], []
    for i in range(warmup + steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        losses.append(loss)
    return times, cpu, losses


def planned_setting(args: argparse.Namespace, micro: str, source: Any, device: Any, world: int,
                    on_gpu: bool) -> dict[str, Any]:
    """The ZeRO stage and micro-batch :mod:`ray_mtup.memory` plans for ``micro`` (``auto`` or an
    integer) at ``--global-batch``, from this device's free memory (or ``--device-memory``)."""
    from ray_mtup import memory

    cfg = train_config(args, "auto", on_gpu, world, micro if micro == "auto" else int(micro), args.global_batch)
    seq_len = args.plan_seq_len or args.seq_len
    if args.device_memory:
        free = total = args.device_memory
    else:
        free, total = memory.device_memory(device)
        if not on_gpu:
            free, total = free // world, total // world
    path = source.path if source is not None else None
    shape = memory.model_shape(args.model, path, source.kwargs.get("gguf_file") if source is not None else None)
    plan = memory.plan_for_config(cfg, shape, world=world, free_bytes=free, total_bytes=total, on_gpu=on_gpu,
                                  seq_len=seq_len)
    return {"zero_stage": plan.zero_stage, "micro": plan.micro_batch_size, "accum": plan.grad_accum,
            "gradient_checkpointing": args.gradient_checkpointing, "plan_seq_len": seq_len,
            "requested_micro": micro, "plan_needed_gb": round(plan.chosen.needed / 1e9, 2),
            "plan_free_gb": round(free / 1e9, 2), "plan_fits": plan.fits}


def run_variant(variant: str, args: argparse.Namespace, tokenizer: Any, source: Any, device: Any, world: int,
                rank: int, local_rank: int, on_gpu: bool, total_steps: int,
                setting: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a fresh model + LoRA, run one variant's steps, free everything; returns timings.

    ``setting`` (:func:`planned_setting`): a DeepSpeed variant at that stage and micro-batch,
    each step accumulating ``accum`` micro-steps."""
    import deepspeed
    import torch
    from transformers import get_cosine_schedule_with_warmup
    from transformers.integrations import HfDeepSpeedConfig

    from ray_mtup.engine import deepspeed_config, grad_accum
    from ray_mtup.modeling import apply_lora

    if setting is not None:
        cfg = train_config(args, setting["zero_stage"], on_gpu, world, setting["micro"], args.global_batch)
    else:
        stage = int(variant[-1]) if variant.startswith("deepspeed") else 2
        cfg = train_config(args, stage, on_gpu, world)
    accum = grad_accum(cfg, cfg.num_workers)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    # As the loop's build_engine: the config is alive while the base is built (zero.Init under ZeRO-3).
    keep_alive = HfDeepSpeedConfig(ds_config) if variant != "plain_peft" else None
    model = apply_lora(build_base_model(args.model, cfg, tokenizer, device, source), cfg.lora)
    embeddings = model.get_input_embeddings().weight
    vocab = getattr(embeddings, "ds_shape", embeddings.shape)[0]  # zero.Init: the full shape of a shard
    batch = make_batch(vocab, cfg.per_device_batch_size, args.seq_len, args.seed + rank, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    holder: Any
    if variant == "plain_peft":
        params = [p for p in model.parameters() if p.requires_grad]
        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if on_gpu else None)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(0.9, 0.999), eps=1e-8)
        sched = get_cosine_schedule_with_warmup(opt, 0, total_steps)
        net.train()

        def step() -> float:  # the same micro-steps per optimizer step as the DeepSpeed variant
            for _ in range(accum):
                loss = net(**batch).loss
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        holder = (net, opt)
    else:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda o: get_cosine_schedule_with_warmup(o, 0, total_steps),
        )
        engine.train()

        def step() -> float:  # the training loop's micro-steps of one optimizer step
            for _ in range(accum):
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
            return float(loss.detach())

        holder = engine

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    times, cpu, losses = time_steps(step, args.steps, args.warmup_steps, sync)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None
    if hasattr(holder, "destroy"):
        holder.destroy()
    del holder, model, step, batch, keep_alive
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {"times": times, "cpu": cpu, "losses": losses, "trainable": trainable, "peak_mem_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="tiny")
    parser.add_argument("--model-path", default=None, help="real weights (directory or .gguf) instead of random init")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per process")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--zero-stages", default="2,3", help="comma-separated ZeRO stages to run ('' for none)")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha = 2r, all linear layers)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain peft loop")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the sequence of variants; timings of all rounds are pooled")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--global-batch", type=int, default=0,
                        help="compare micro-batches at this global batch (see --micro-batches); 0: off")
    parser.add_argument("--micro-batches", default="2,auto",
                        help="with --global-batch: comma-separated micro-batches, 'auto' = the memory plan's")
    parser.add_argument("--plan-seq-len", type=int, default=0,
                        help="with --global-batch: plan 'auto' for sequences of this length (default --seq-len)")
    parser.add_argument("--with-plain", action="store_true",
                        help="with --global-batch: also time plain peft at the first setting's micro-batch")
    parser.add_argument("--device-memory", type=float, default=0.0,
                        help="with --global-batch: plan 'auto' for this many free bytes per device "
                             "(default: what the device reports)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    _standalone_env()
    import deepspeed
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    device, local_rank = rank_device(on_gpu, world)

    tokenizer, source = build_tokenizer_for(args)
    if args.global_batch:
        return compare_micro_batches(args, tokenizer, source, device, world, rank, local_rank, on_gpu)
    stages = [int(s) for s in args.zero_stages.split(",") if s.strip()]
    variants = ([] if args.no_plain else ["plain_peft"]) + [f"deepspeed_zero{s}" for s in stages]
    total_steps = args.steps + args.warmup_steps
    common = {"model": args.model, "random_init": args.model != "tiny" and args.model_path is None,
              "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "world_size": world, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "lora_r": args.lora_r,
              "gradient_checkpointing": args.gradient_checkpointing}
    runs: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):  # rounds interleave the variants, so load from other processes hits all
        for variant in variants:
            out = run_variant(variant, args, tokenizer, source, device, world, rank, local_rank, on_gpu, total_steps)
            run = runs.setdefault(variant, {**out, "times": [], "cpu": []})
            run["times"] += out["times"]
            run["cpu"] += out["cpu"]
            dist.barrier()
    tokens_per_step = world * args.batch * args.seq_len
    results: dict[str, float] = {}
    best: dict[str, float] = {}
    for variant, run in runs.items():
        stats = summarise(run["times"])
        results[variant] = tokens_per_step / stats["median_s"]
        best[variant] = tokens_per_step / stats["min_s"]
        if rank == 0:
            emit({"bench": "train", "variant": variant, **common, "rounds": args.rounds,
                  "trainable_params": run["trainable"],
                  "tokens_per_s": round(results[variant], 1),
                  "tokens_per_s_mean": round(tokens_per_step / stats["mean_s"], 1),
                  "tokens_per_s_best": round(best[variant], 1),
                  "step_median_s": round(stats["median_s"], 4), "step_min_s": round(stats["min_s"], 4),
                  "cpu_s_per_step_median": round(summarise(run["cpu"])["median_s"], 4),
                  "loss_first": round(run["losses"][0], 5), "loss_last": round(run["losses"][-1], 5),
                  "peak_mem_gib": run["peak_mem_gib"], "loadavg_1m": round(os.getloadavg()[0], 2)})
    if rank == 0 and "plain_peft" in results:
        emit({"bench": "train_ratio", **common,
              **{f"{v}_over_plain": round(results[v] / results["plain_peft"], 3) for v in results if v != "plain_peft"},
              **{f"{v}_over_plain_best": round(best[v] / best["plain_peft"], 3) for v in best if v != "plain_peft"}})
    dist.destroy_process_group()
    return 0


def compare_micro_batches(args: argparse.Namespace, tokenizer: Any, source: Any, device: Any, world: int,
                          rank: int, local_rank: int, on_gpu: bool) -> int:
    """``--global-batch``: tokens/s of each ``--micro-batches`` setting at the same global batch."""
    import torch
    import torch.distributed as dist

    from bench.common import emit, summarise

    settings = {f"micro_{m.strip()}": planned_setting(args, m.strip(), source, device, world, on_gpu)
                for m in args.micro_batches.split(",") if m.strip()}
    if args.with_plain:
        settings["plain_peft"] = {**next(iter(settings.values())), "zero_stage": None}
    total_steps = args.steps + args.warmup_steps
    runs: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for variant, setting in settings.items():
            out = run_variant(variant, args, tokenizer, source, device, world, rank, local_rank, on_gpu,
                              total_steps, {**setting, "zero_stage": setting["zero_stage"] or 2})
            run = runs.setdefault(variant, {**out, "times": [], "cpu": []})
            run["times"] += out["times"]
            run["cpu"] += out["cpu"]
            dist.barrier()
    tokens_per_step = args.global_batch * args.seq_len
    rates: dict[str, float] = {}
    best: dict[str, float] = {}
    for variant, run in runs.items():
        stats = summarise(run["times"])
        rates[variant] = tokens_per_step / stats["median_s"]
        best[variant] = tokens_per_step / stats["min_s"]
        if rank == 0:
            emit({"bench": "train_micro_batch", "variant": variant, "model": args.model,
                  "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "world_size": world,
                  "global_batch": args.global_batch, "seq_len": args.seq_len, **settings[variant],
                  "steps": args.steps, "rounds": args.rounds, "tokens_per_s": round(rates[variant], 1),
                  "tokens_per_s_best": round(tokens_per_step / stats["min_s"], 1),
                  "step_median_s": round(stats["median_s"], 4), "loss_last": round(run["losses"][-1], 5),
                  "peak_mem_gib": run["peak_mem_gib"], "loadavg_1m": round(os.getloadavg()[0], 2)})
    names = list(rates)
    if rank == 0 and len(names) > 1:
        first = names[0]
        emit({"bench": "micro_batch_ratio", "model": args.model, "global_batch": args.global_batch,
              "seq_len": args.seq_len, **{f"{v}_over_{first}": round(rates[v] / rates[first], 3) for v in names[1:]},
              **{f"{v}_over_{first}_best": round(best[v] / best[first], 3) for v in names[1:]},
              **({"planned_over_micro2": round(rates["micro_auto"] / rates["micro_2"], 3),
                  "planned_over_micro2_best": round(best["micro_auto"] / best["micro_2"], 3)}
                 if {"micro_auto", "micro_2"} <= set(rates) else {}),
              **({"planned_over_plain": round(rates["micro_auto"] / rates["plain_peft"], 3),
                  "planned_over_plain_best": round(best["micro_auto"] / best["plain_peft"], 3)}
                 if {"micro_auto", "plain_peft"} <= set(rates) else {})})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
