"""Evaluation generation under ZeRO-3: a LoRA-merged replica per rank against the synced lockstep.

    torchrun --nproc_per_node 2 bench/bench_eval_replica.py --model tiny --n-prompts 16 --max-new-tokens 48
    torchrun --nproc_per_node 8 bench/bench_eval_replica.py --model qwen2.5-7b \\
        --model-path /path/to/Qwen2.5-7B-Instruct --n-prompts 184 --max-new-tokens 512    # GPUs

Needs ``torchrun`` with 2 or more processes: with one, or under ZeRO-2, the engine's model is
whole and both paths are the same. Builds the engine as the training loop does
(:func:`ray_mtup.training.prepare_data`, :func:`ray_mtup.engine.build_engine`, ZeRO-3), takes
``--train-steps`` optimizer steps at ``--lr`` so the adapter is not zero, then generates the
first ``--n-prompts`` validation prompts, sharded over the ranks as the per-epoch evaluation
shards them, by each path in turn (``--rounds`` interleaves them):

* ``synced``: ``generate`` on the partitioned engine model with ``synced_gpus=True``;
* ``replica``: :func:`ray_mtup.replica.merged_replica` (gather + merge, timed with it), then
  ``generate`` with ``synced_gpus=False``, then the replica is freed.

A path's time is the slowest rank's (what the evaluation waits for), barrier to barrier.
Prints one JSON object per path (rank 0) and an ``eval_ratio`` line: synced seconds over
replica seconds (median and best round) and whether both produced identical outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

from bench.common import MODEL_CHOICES, emit, rank_device, summarise  # noqa: E402

PATHS = ("synced", "replica")


def bench_config(args: argparse.Namespace, world: int, on_gpu: bool) -> Any:
    """The TrainConfig of the bench's engine and evaluation."""
    from ray_mtup.config import TrainConfig

    return TrainConfig(model=args.model, model_path=args.model_path, data_dir=args.data_dir,
                       num_workers=world, per_device_batch_size=args.batch, global_batch_size=args.batch * world,
                       zero_stage=3, use_gpu=on_gpu, learning_rate=args.lr, eval_batch_size=args.eval_batch,
                       max_new_tokens=args.max_new_tokens, max_samples=args.max_samples, seed=args.seed,
                       test_split=0.0)


def run_path(path: str, engine: Any, tokenizer: Any, prompts: list[str], cfg: Any, device: Any,
             world: int) -> tuple[float, float, list[str], int]:
    """(seconds of the slowest rank, replica build seconds of the slowest rank, this rank's
    texts, this rank's new tokens) for one path."""
    import contextlib

    import torch.distributed as dist

    from ray_mtup.distributed import all_reduce
    from ray_mtup.generation import generate
    from ray_mtup.prompts import get_template
    from ray_mtup.replica import merged_replica

    template = get_template(cfg.template)
    model = engine.module
    model.eval()
    dist.barrier()
    t0 = time.perf_counter()
    build = 0.0
    with merged_replica(model, device) if path == "replica" else contextlib.nullcontext(model) as gen_model:
        build = time.perf_counter() - t0
        out = generate(gen_model, tokenizer, prompts, batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.max_new_tokens, synced_gpus=path == "synced", stop_template=template)
    seconds = time.perf_counter() - t0
    seconds, build = all_reduce([seconds, build], device, world, "max")
    return seconds, build, out.texts, sum(out.new_tokens)


def train_a_little(engine: Any, tokenizer: Any, data: Any, steps: int, device: Any) -> None:
    """``steps`` optimizer steps on the first training batches (accumulation 1): a non-zero adapter."""
    from ray_mtup import dataset

    engine.train()
    size = engine.train_micro_batch_size_per_gpu()
    for step in range(steps):
        items = data.train_encoded[step * size:(step + 1) * size] or data.train_encoded[:size]
        batch = dataset.collate(items, tokenizer.pad_token_id)
        loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="tiny")
    parser.add_argument("--model-path", default=None, help="weights (a directory) for a qwen2.5-* name")
    parser.add_argument("--data-dir", default=None, help="corpus directory (default: the training default)")
    parser.add_argument("--max-samples", type=int, default=200, help="corpus graphs read (None: all)")
    parser.add_argument("--n-prompts", type=int, default=16, help="validation prompts generated per path")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch", type=int, default=8, help="generation batch per rank")
    parser.add_argument("--batch", type=int, default=4, help="training micro-batch per rank")
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps before generating")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of those steps")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both paths; timings are pooled")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        print("bench_eval_replica.py: run it under torchrun with --nproc_per_node 2 or more "
              "(with one process the ZeRO-3 model is whole and both paths are the same)", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    from ray_mtup.distributed import gather, init_distributed, shard
    from ray_mtup.engine import Schedule, build_engine
    from ray_mtup.generation import prompts_for
    from ray_mtup.prompts import get_template
    from ray_mtup.training import prepare_data

    on_gpu = torch.cuda.is_available()
    init_distributed(on_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    device, _ = rank_device(on_gpu, world)

    cfg = bench_config(args, world, on_gpu)
    data, source, tokenizer = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    engine, _keep_alive, _ = build_engine(cfg, source, tokenizer, world, on_gpu,
                                          Schedule(1, max(1, args.train_steps), 0))
    train_a_little(engine, tokenizer, data, args.train_steps, device)
    n = min(args.n_prompts, len(data.val))
    idx, real = shard(n, rank, world)
    prompts = prompts_for(get_template(cfg.template), [data.val[i].sentence for i in idx],
                          [data.val[i].context for i in idx])
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    builds: list[float] = []
    texts: dict[str, list[str]] = {}
    tokens: dict[str, float] = {}
    for _ in range(args.rounds):
        for path in PATHS:
            seconds, build, out, new = run_path(path, engine, tokenizer, prompts, cfg, device, world)
            times[path].append(seconds)
            if path == "replica":
                builds.append(build)
            texts[path] = out[:real]
            tokens[path] = new
    by_path = {p: [t for part in gather(texts[p], world) for t in part] for p in PATHS}
    new_tokens = {p: sum(gather(tokens[p], world)) for p in PATHS}
    if rank == 0:
        common = {"model": args.model, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                  "world_size": world, "zero_stage": 3, "n_prompts": n, "max_new_tokens": args.max_new_tokens,
                  "eval_batch": args.eval_batch, "rounds": args.rounds, "loadavg_1m": round(os.getloadavg()[0], 2)}
        stats = {p: summarise(times[p]) for p in PATHS}
        for p in PATHS:
            extra = {"replica_build_s_median": round(summarise(builds)["median_s"], 4)} if p == "replica" else {}
            emit({"bench": "eval_generation", "path": p, **common,
                  "seconds_median": round(stats[p]["median_s"], 4), "seconds_min": round(stats[p]["min_s"], 4),
                  "new_tokens": int(new_tokens[p]),
                  "new_tokens_per_s": round(new_tokens[p] / stats[p]["median_s"], 1), **extra})
        emit({"bench": "eval_ratio", **common,
              "synced_over_replica": round(stats["synced"]["median_s"] / stats["replica"]["median_s"], 3),
              "synced_over_replica_best": round(stats["synced"]["min_s"] / stats["replica"]["min_s"], 3),
              "outputs_identical": by_path["synced"] == by_path["replica"],
              "distinct_outputs": len(set(by_path["replica"]))})
    engine.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
