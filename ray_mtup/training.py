"""The per-worker training loop (layer 3): every Ray Train worker runs :func:`train_loop_per_worker`.

One epoch = DeepSpeed ZeRO steps over length-grouped, dynamically padded MTUP batches,
then validation loss, batched greedy generation on the validation split (all ranks, each
on its shard), repair, corpus SMATCH for Task 1 and Task 2, and one ``ray.train.report``
on every rank, with the LoRA adapter (plus tokenizer and trainer state) as the checkpoint.

Everything the loop needs arrives in its config dict (``{"train": TrainConfig.to_dict()}``);
nothing is read from globals. A restarted run continues at the epoch after the latest
checkpoint (``ray.train.get_checkpoint``): adapter weights and the schedule position are
restored; AdamW moments restart from zero (documented in the README).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import corpus, dataset, retrieval, scoring
from .config import SAMPLE_DATA_DIR, TrainConfig
from .errors import TrainingError
from .generation import Parsed, generate, parse_outputs, prompts_for
from .modeling import BASE_FILE, apply_lora, base_fingerprint, build_model, build_tokenizer, load_base_weights
from .prompts import TEMPLATES, get_template

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.json"
PREDICTIONS_FILE = "val_predictions.txt"
PREDICTIONS_JSONL = "val_predictions.jsonl"


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config derived from the training config (the one place it is built).

    >>> ds = deepspeed_config(TrainConfig(zero_stage=3, per_device_batch_size=2, grad_accum=8), 4, True)
    >>> ds["train_batch_size"], ds["zero_optimization"]["stage"], ds["bf16"]["enabled"]
    (64, 3, True)
    >>> ds["optimizer"]["params"]["torch_adam"]
    True
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.per_device_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "weight_decay": cfg.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                # torch's AdamW: nothing is JIT-compiled (FusedAdam/CPUAdam need a compiler).
                "torch_adam": True,
            },
        },
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def objective(task2_f1: float, val_loss: float) -> float:
    """The search objective: Task 2 F1, exact ties ordered by validation loss.

    Early on no output parses and every trial has F1 0; the tie-break lets ASHA still rank
    them. It moves the value by under 0.01 points of F1.

    >>> objective(0.5, 2.0) > objective(0.5, 3.0), objective(0.51, 9.0) > objective(0.5, 0.1)
    (True, True)
    """
    if not math.isfinite(val_loss):
        return -1.0
    return task2_f1 - 1e-4 * min(val_loss, 10.0)


def cosine_with_warmup(total_steps: int, warmup_steps: int, offset: int = 0):
    """LR multiplier: linear warm-up, then cosine decay to 0; ``offset`` resumes mid-schedule.

    >>> f = cosine_with_warmup(100, 10)
    >>> round(f(0), 2), round(f(10), 2), round(f(55), 2), round(f(100), 2)
    (0.1, 1.0, 0.5, 0.0)
    """

    def factor(step: int) -> float:
        s = step + offset
        if s < warmup_steps:
            return (s + 1) / max(1, warmup_steps)
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class RunData:
    """What a worker builds from the corpus: splits, encodings and lengths."""

    train: list[dataset.MtupExample]
    val: list[dataset.MtupExample]
    val_gold: list[str]
    train_encoded: list[dataset.Encoded]
    val_encoded: list[dataset.Encoded]
    skipped_long: list[str]


def load_examples(cfg: TrainConfig) -> tuple[list[dataset.MtupExample], list[dataset.MtupExample], list[str]]:
    """Read the corpus, subset and split it; returns (train, val, raw gold graphs of val)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else SAMPLE_DATA_DIR
    examples = corpus.load_corpus(data_dir)
    train_ex, val_ex = dataset.select_and_split(examples, cfg.val_split, cfg.seed, cfg.max_samples)
    train, val = retrieval.attach(cfg.retrieval_k, dataset.to_mtup(train_ex), dataset.to_mtup(val_ex))
    return train, val, [e.amr or "" for e in val_ex]


def tokenizer_texts(train: Sequence[dataset.MtupExample]) -> list[str]:
    """Texts the tiny model's BPE is trained on: training examples and every template's text."""
    texts = []
    for t in TEMPLATES.values():
        texts += [t.instruction, t.step1_marker, t.step2_marker]
    for ex in train:
        texts += [ex.sentence, ex.task1, ex.task2]
    return texts


def _shard(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices of rank's shard padded (with repeats) to the same length on every rank.

    Returns (indices, number of real ones): padded entries are computed but discarded, so
    every rank runs the same number of forward passes (required by ZeRO-3).

    >>> _shard(5, 1, 2)
    ([1, 3, 1], 2)
    """
    own = list(range(rank, n, world))
    per_rank = -(-n // world)
    real = len(own)
    padded = own + [own[i % len(own)] if own else 0 for i in range(per_rank - real)]
    return padded, real


def _gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _all_reduce(values: Sequence[float], device: Any, world: int, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def evaluate_epoch(
    engine: Any, tokenizer: Any, cfg: TrainConfig, data: RunData, rank: int, world: int, device: Any
) -> tuple[dict[str, Any], list[Parsed]]:
    """Validation loss, generation on the validation split, repair and corpus SMATCH."""
    import torch

    model = engine.module
    # -- validation loss (token-weighted, shards padded with zero-weight repeats)
    idx, real = _shard(len(data.val_encoded), rank, world)
    loss_sum, tokens = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for pos in range(0, len(idx), cfg.per_device_batch_size):
            chunk = idx[pos:pos + cfg.per_device_batch_size]
            batch = dataset.collate([data.val_encoded[i] for i in chunk], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            per_tok = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=dataset.IGNORE_INDEX, reduction="none",
            ).view(shift_labels.shape)
            weight = torch.tensor([1.0 if pos + j < real else 0.0 for j in range(len(chunk))], device=device)
            valid = (shift_labels != dataset.IGNORE_INDEX).float() * weight[:, None]
            loss_sum += float((per_tok * valid).sum())
            tokens += float(valid.sum())
    loss_sum, tokens = _all_reduce([loss_sum, tokens], device, world)
    val_loss = loss_sum / max(tokens, 1.0)

    # -- generation on (a capped prefix of) the shuffled validation split
    n_eval = len(data.val) if cfg.eval_max_samples is None else min(cfg.eval_max_samples, len(data.val))
    template = get_template(cfg.template)
    idx, real = _shard(n_eval, rank, world)
    t0 = time.perf_counter()
    raw = generate(
        model, tokenizer,
        prompts_for(template, [data.val[i].sentence for i in idx], [data.val[i].context for i in idx]),
        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
        synced_gpus=(cfg.zero_stage == 3 and world > 1), cache=cfg.generation_cache,
        template=template if cfg.constrained_decoding else None,
    )
    gen_time = time.perf_counter() - t0
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in raw[:real])
    gathered = _gather(list(zip(idx[:real], raw[:real])), world)
    by_index = {i: text for part in gathered for i, text in part}
    raw_all = [by_index[i] for i in range(n_eval)]
    parsed = parse_outputs(template, raw_all)
    gold = data.val_gold[:n_eval]
    t2 = scoring.score_corpus(gold, [p.task2_graph for p in parsed], mode=cfg.scoring_mode)
    t1 = scoring.score_corpus(gold, [p.task1_graph for p in parsed], mode=cfg.scoring_mode)
    # The shared task's convention too, so every epoch compares with the published leaderboard.
    t2_official = t2 if t2.mode == "official" else scoring.score_corpus(
        gold, [p.task2_graph for p in parsed], mode="official")
    new_tokens, gen_time_max = _all_reduce([new_tokens, gen_time], device, world)
    metrics = {
        "val_loss": val_loss,
        "task1_f1": t1.f1,
        "task2_f1": t2.f1,
        "task2_precision": t2.precision,
        "task2_recall": t2.recall,
        "task2_f1_official": t2_official.f1,
        "validity": t2.validity,
        "task1_validity": t1.validity,
        "repaired_rate": sum(p.task2_repaired for p in parsed) / max(1, len(parsed)),
        "n_eval": n_eval,
        "objective": objective(t2.f1, val_loss),
        "scoring_mode": t2.mode,
        "gen_new_tokens_per_s": new_tokens / max(gen_time, 1e-9),
    }
    return metrics, parsed


def _trainable_state(engine: Any, zero_stage: int) -> dict[str, Any]:
    """Full (gathered) LoRA weights on CPU; every rank must call this under ZeRO-3."""
    import deepspeed

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params}
    return {n: p.detach().cpu().clone() for n, p in params}


def save_checkpoint(directory: Path, engine: Any, tokenizer: Any, state: dict[str, Any],
                    weights: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> None:
    """Adapter (safetensors), tokenizer, trainer state and the epoch's validation predictions.

    ``predictions`` are dicts with id, sentence, raw, task1_graph and task2_graph (None when
    invalid); the JSONL keeps them exactly (for re-scoring), the .txt is for reading.
    """
    from peft import get_peft_model_state_dict

    model = engine.module
    adapter_sd = get_peft_model_state_dict(model, state_dict=weights)
    model.save_pretrained(str(directory), state_dict=adapter_sd, safe_serialization=True)
    base = {n: w for n, w in weights.items() if "lora_" not in n}
    if base:  # lora.train_base: the trained base weights, named as in the PeftModel
        from safetensors.torch import save_file

        save_file(base, str(directory / BASE_FILE))
    tokenizer.save_pretrained(str(directory))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    with (directory / PREDICTIONS_JSONL).open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    lines = []
    for p in predictions:
        graph = p["task2_graph"] if p["task2_graph"] is not None else "# invalid output (scored as empty)"
        lines.append(f"#::snt {p['sentence']}\n{graph}\n")
    (directory / PREDICTIONS_FILE).write_text("\n".join(lines), encoding="utf-8")


def weights_digest(weights: dict[str, Any]) -> str:
    """A short hash of named tensors (key order independent); proves which adapter is loaded."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_resume_state(model: Any) -> dict[str, Any] | None:
    """Load the adapter of the latest checkpoint into ``model``; return its trainer state."""
    import ray.train
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(Path(d) / ADAPTER_FILE))  # safetensors: no pickle is executed
        load_base_weights(model, Path(d))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise TrainingError(f"checkpoint adapter does not fit the model: {result.unexpected_keys[:3]}")
    loaded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state["loaded_adapter_digest"] = weights_digest(loaded)
    logger.info("resuming after epoch %d (adapter %s)", state["epoch"], state["loaded_adapter_digest"])
    return state


class FaultInjector:
    """Tests only (``TrainConfig.inject_fault``): NaN loss or a killed worker in a given epoch.

    A kill happens once per run: the last rank writes a marker file into the run's storage
    directory (``run_dir``) before exiting, and a retried or restarted run finds it and
    trains on.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int, run_dir: str | None = None):
        self.kind, self.epoch = None, -1
        if cfg.inject_fault:
            kind, _, epoch = cfg.inject_fault.partition("@")
            self.kind, self.epoch = kind, int(epoch)
        if run_dir and "://" not in run_dir:
            self.marker = Path(run_dir) / ".fault_injected"
        else:
            digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
            self.marker = Path(tempfile.gettempdir()) / f"ray_mtup_fault_{digest}"
        self.rank, self.world = rank, world

    def loss(self, loss: Any, epoch: int) -> Any:
        if self.kind == "nan_loss" and epoch == self.epoch:
            return loss * float("nan")
        return loss

    def maybe_kill(self, epoch: int) -> None:
        if self.kind == "kill_worker" and epoch == self.epoch and self.rank == self.world - 1:
            if not self.marker.exists():
                self.marker.write_text("killed\n")
                # Ray Train collects reports by polling the workers (every 2 s by default): wait
                # past that, so the previous epoch's report and checkpoint are registered.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2)) + 1)
                logger.error("inject_fault: killing rank %d in epoch %d", self.rank, epoch)
                os._exit(17)


def _run_dir(ctx: Any) -> str | None:
    """The run's storage directory (Ray's StorageContext is a DeveloperAPI: tolerate its absence)."""
    try:
        return str(ctx.get_storage().experiment_fs_path)
    except AttributeError:
        return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Layer 3: the loop every Ray Train worker runs. ``config = {"train": TrainConfig dict}``."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from .launcher import setup_logging

    setup_logging()
    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    if on_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)

    train_ex, val_ex, val_gold = load_examples(cfg)
    tokenizer = build_tokenizer(cfg, tokenizer_texts(train_ex))
    template = get_template(cfg.template)
    train_enc, skipped = dataset.encode_all(tokenizer, template, train_ex, cfg.max_seq_len)
    val_enc, skipped_val = dataset.encode_all(tokenizer, template, val_ex, cfg.max_seq_len)
    data = RunData(train_ex, val_ex, val_gold, train_enc, val_enc, skipped + skipped_val)
    if not train_enc:
        raise TrainingError(f"every training example is longer than max_seq_len={cfg.max_seq_len}")

    ds_config = deepspeed_config(cfg, world, on_gpu)
    hf_ds = None
    if cfg.zero_stage == 3 and cfg.model != "tiny":
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: from_pretrained partitions)
    base = build_model(cfg, tokenizer, "cuda" if on_gpu else "cpu")
    # predict rebuilds a random-init (tiny) base from its seed; the fingerprint proves it is the same
    fingerprint = base_fingerprint(base) if cfg.model == "tiny" and cfg.model_path is None else None
    model = apply_lora(base, cfg.lora)
    resume = _load_resume_state(model)
    start_epoch = resume["epoch"] + 1 if resume else 1
    history: list[dict[str, Any]] = resume["history"] if resume else []
    global_step = resume["global_step"] if resume else 0

    sampler = dataset.LengthGroupedBatches(
        [len(e) for e in train_enc], cfg.per_device_batch_size, rank, world, cfg.seed
    )
    micro_per_epoch = -(-len(sampler) // cfg.grad_accum) * cfg.grad_accum
    if cfg.max_steps_per_epoch is not None:
        micro_per_epoch = min(micro_per_epoch, cfg.max_steps_per_epoch * cfg.grad_accum)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total_steps)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_with_warmup(total_steps, warmup, offset=global_step)),
    )
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("run: %d train / %d val graphs, %d skipped as too long, %d trainable params, "
                    "%d steps/epoch, epochs %d..%d", len(train_enc), len(val_ex), len(data.skipped_long),
                    trainable, steps_per_epoch, start_epoch, cfg.epochs)

    faults = FaultInjector(cfg, rank, world, _run_dir(ctx) if cfg.inject_fault else None)
    for epoch in range(start_epoch, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        batches = (batches * (1 + micro_per_epoch // max(1, len(batches))))[:micro_per_epoch]
        engine.train()
        t0 = time.perf_counter()
        loss_sum, n_loss, real_tokens, padded_tokens = 0.0, 0, 0, 0
        bad_step: int | None = None
        for micro, idx in enumerate(batches):
            items = [train_enc[i] for i in idx]
            batch = dataset.collate(items, tokenizer.pad_token_id, pad_to_multiple_of=8 if on_gpu else 1)
            real_tokens += sum(len(x) for x in items)
            padded_tokens += batch["input_ids"].numel()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = faults.loss(engine(**batch).loss, epoch)
            if micro == 1:
                faults.maybe_kill(epoch)
            if not torch.isfinite(loss.detach()):
                bad_step = global_step
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            n_loss += 1
            if (micro + 1) % cfg.grad_accum == 0:
                global_step += 1
                if _all_reduce([1.0 if bad_step is not None else 0.0], device, world, "max")[0] > 0:
                    break
        train_time = time.perf_counter() - t0
        loss_sum, n_loss, real_tokens, padded_tokens, nonfinite = _all_reduce(
            [loss_sum, n_loss, real_tokens, padded_tokens, 1.0 if bad_step is not None else 0.0], device, world)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": global_step,
            "train_loss": loss_sum / max(n_loss, 1),
            "lr": engine.get_lr()[0],
            "tokens_per_s": real_tokens / max(train_time, 1e-9) * 1.0,
            "useful_token_fraction": real_tokens / max(padded_tokens, 1),
            "epoch_time_s": train_time,
            "skipped_long": len(data.skipped_long),
            "stop_reason": "",
        }
        if nonfinite > 0:
            metrics.update(task1_f1=0.0, task2_f1=0.0, validity=0.0, val_loss=float("nan"), objective=-1.0,
                           stop_reason=f"non-finite loss at epoch {epoch}, step {global_step}")
            history.append(metrics)
            # The weights are no longer usable: the checkpoint carries only the trainer state
            # (history with the stop reason), so the run's results say why it ended.
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    logger.error("stopping: %s", metrics["stop_reason"])
                    state = {"epoch": epoch, "global_step": global_step, "history": history,
                             "config": cfg.to_dict(), "stop_reason": metrics["stop_reason"]}
                    (Path(tmp) / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
            return
        t1 = time.perf_counter()
        eval_metrics, parsed = evaluate_epoch(engine, tokenizer, cfg, data, rank, world, device)
        metrics.update(eval_metrics)
        metrics["eval_time_s"] = time.perf_counter() - t1
        history.append(metrics)
        weights = _trainable_state(engine, cfg.zero_stage)
        state = {"epoch": epoch, "global_step": global_step, "history": history, "config": cfg.to_dict(),
                 "base_fingerprint": fingerprint, "adapter_digest": weights_digest(weights),
                 "resumed_from_epoch": resume["epoch"] if resume else 0,
                 "resumed_adapter_digest": resume["loaded_adapter_digest"] if resume else None}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                preds = [{"id": data.val[i].id, "sentence": data.val[i].sentence, "raw": p.raw,
                          "task1_graph": p.task1_graph, "task2_graph": p.task2_graph}
                         for i, p in enumerate(parsed)]
                save_checkpoint(Path(tmp), engine, tokenizer, state, weights, preds)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                logger.info("epoch %d: loss %.4f val_loss %.4f task1 F %.4f task2 F %.4f validity %.3f "
                            "%.0f tok/s", epoch, metrics["train_loss"], metrics["val_loss"],
                            metrics["task1_f1"], metrics["task2_f1"], metrics["validity"],
                            metrics["tokens_per_s"])
            ray.train.report(metrics, checkpoint=checkpoint)
        if world > 1:
            dist.barrier()

