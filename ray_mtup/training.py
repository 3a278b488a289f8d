"""The per-worker training loop (layer 3), the same under Ray Train and under torchrun.

:func:`train_loop` takes a :class:`~ray_mtup.session.Session` (rank, world size, report,
the checkpoint to resume from) and runs the epochs: DeepSpeed ZeRO steps over
length-grouped, dynamically padded MTUP batches, or padding-free packed rows with ``packing``
(:func:`train_epoch`), then per-epoch
evaluation (:mod:`ray_mtup.evaluation`), then one report on every rank with the adapter as
the checkpoint (:mod:`ray_mtup.checkpointing`). :func:`train_loop_per_worker` is Ray Train's
entry; ``python -m ray_mtup.worker`` is torchrun's.

A restarted run continues at the epoch after its latest checkpoint with the saved adapter and
the schedule at the same step; AdamW's moments restart from zero (docs/faults.md, "Resume semantics").
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dataset, memory, objective
from .checkpointing import save_checkpoint, save_stop_state, trainable_state, weights_digest, write_failure
from .config import TrainConfig
from .distributed import all_reduce, barrier, init_distributed
from .engine import Schedule, build_engine, grad_accum
from .errors import PERMANENT_ERRORS, TrainingError
from .evaluation import RunData, evaluate_epoch
from .faults import FaultInjector
from .generation import derived_max_new_tokens
from .logs import setup_logging
from .modeling import WeightsSource, base_source, build_tokenizer, count_parameters, effective_packing, liger_applied
from .prompts import get_template
from .session import RaySession, Session

logger = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry: ``config = {"train": TrainConfig dict}``."""
    setup_logging()
    train_loop(TrainConfig.from_dict(config["train"]), RaySession())


def prepare_data(cfg: TrainConfig) -> tuple[RunData, WeightsSource, Any]:
    """Splits (with retrieved context), the base weights' source and tokenizer, the encodings,
    the evaluation subset and the generation budget."""
    train_ex, val_ex, val_gold = dataset.load_examples(cfg)
    train_ex, val_ex = dataset.with_retrieval(cfg, train_ex, val_ex)
    source = base_source(cfg, dataset.tokenizer_texts(train_ex))
    tokenizer = build_tokenizer(source)
    template = get_template(cfg.template)
    train_enc, skipped = dataset.encode_all(tokenizer, template, train_ex, cfg.max_seq_len, cfg.chat_template)
    val_enc, skipped_val = dataset.encode_all(tokenizer, template, val_ex, cfg.max_seq_len, cfg.chat_template)
    if not train_enc:
        raise TrainingError(f"every training example is longer than max_seq_len={cfg.max_seq_len}")
    budget = cfg.max_new_tokens or derived_max_new_tokens([e.completion_length for e in train_enc])
    data = RunData(train_ex, val_ex, dataset.evaluation_subset(cfg, val_ex), dataset.evaluation_subset(cfg, val_gold),
                   train_enc, val_enc, skipped + skipped_val, budget)
    return data, source, tokenizer


def plan_schedule(cfg: TrainConfig, micro_batches: int, world: int) -> Schedule:
    """Optimizer steps per epoch at the configured global batch (``max_steps_per_epoch`` caps them).

    Warm-up and cosine span ``schedule_epochs`` (a search's common horizon; default ``epochs``),
    whatever epoch the run stops at.

    >>> short, long = TrainConfig(epochs=4, schedule_epochs=6), TrainConfig(epochs=6, schedule_epochs=6)
    >>> plan_schedule(short, 40, 1) == plan_schedule(long, 40, 1) != plan_schedule(TrainConfig(epochs=4), 40, 1)
    True
    """
    steps = -(-micro_batches // grad_accum(cfg, world))
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    total = steps * (cfg.schedule_epochs or cfg.epochs)
    return Schedule(steps, total, int(cfg.warmup_ratio * total))


def resolve_memory_plan(cfg: TrainConfig, data: RunData, source: WeightsSource, session: Session, device: Any,
                        on_gpu: bool) -> tuple[TrainConfig, memory.MemoryPlan]:
    """The memory plan of this run and ``cfg`` with its ZeRO stage and micro-batch resolved,
    identical on every rank (planned with the least free memory over ranks); logged on rank 0."""
    init_distributed(on_gpu)  # the all-reduce of the free memory needs the process group (torchrun)
    resolved, plan = memory.resolve_auto(cfg, [len(e) for e in data.train_encoded], source.path, source.kwargs,
                                         session.world_size, device, on_gpu)
    if session.rank == 0:
        (logger.info if plan.fits else logger.warning)("%s", plan.explain())
    return resolved, plan


@dataclass
class Worker:
    """What one rank holds while it trains."""

    cfg: TrainConfig
    session: Session
    engine: Any
    tokenizer: Any
    data: RunData
    source: WeightsSource
    device: Any
    on_gpu: bool
    plan: memory.MemoryPlan | None = None
    packing: bool = False  # cfg.packing where the attention implementation supports it


def train_loop(cfg: TrainConfig, session: Session) -> None:
    """Train ``cfg`` on this rank: the epochs after the latest checkpoint, each evaluated and reported.

    ``zero_stage`` / ``per_device_batch_size`` ``auto`` are resolved first, the same on every
    rank (:func:`resolve_memory_plan`); everything after sees the resolved integers.
    """
    import torch

    device, on_gpu = _device(cfg, session)
    world = session.world_size
    try:  # an error here fails the same way on every rank and every retry: the run ends with it
        data, source, tokenizer = prepare_data(cfg)
        cfg, plan = resolve_memory_plan(cfg, data, source, session, device, on_gpu)
        torch.manual_seed(cfg.seed)  # LoRA's init and dropout: the same on every launcher
        sampler = dataset.LengthGroupedBatches([len(e) for e in data.train_encoded], cfg.per_device_batch_size,
                                               session.rank, world, cfg.seed)
        schedule = plan_schedule(cfg, len(sampler), world)
        with session.resume_from() as checkpoints:
            engine, _keep_alive, resume = build_engine(cfg, source, tokenizer, world, on_gpu, schedule, checkpoints,
                                                       device)
    except PERMANENT_ERRORS as exc:
        report_permanent_error(session, exc)
        return
    if resume and resume.get("stop_reason"):  # the run already ended (NaN loss, out of memory)
        logger.error("not resuming: the run stopped after epoch %d: %s", resume["epoch"], resume["stop_reason"])
        return
    w = Worker(cfg, session, engine, tokenizer, data, source, device, on_gpu, plan,
               effective_packing(cfg, engine.module))
    history: list[dict[str, Any]] = resume["history"] if resume else []
    step = resume["global_step"] if resume else 0
    _log_start(w, schedule, resume)
    faults = FaultInjector(cfg, session.rank, world, session.run_dir())
    first = (resume["epoch"] + 1) if resume else 1
    for epoch in range(first, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        metrics, step = train_epoch(w, list(sampler), schedule, epoch, step, faults)
        metrics["resume_note"] = resume.get("resume_note", "") if resume and epoch == first else ""
        history.append(metrics)
        if metrics["stop_reason"]:
            _report(w, history, resume, predictions=None, faults=faults)
            return
        t0 = time.perf_counter()
        eval_metrics, predictions = evaluate_epoch(engine, tokenizer, cfg, data, session.rank, world, device)
        metrics.update(eval_metrics, eval_time_s=time.perf_counter() - t0)
        if not _report(w, history, resume, predictions, faults):
            return


def report_permanent_error(session: Session, exc: Exception) -> None:
    """End the run with ``exc`` (one of :data:`~ray_mtup.errors.PERMANENT_ERRORS`) as its stop
    reason, reported by every rank without a checkpoint: the training function returns, so Ray
    Train has no crashed worker to retry (its ``FailureConfig`` retries only those). The
    launchers read ``permanent_error`` back (:func:`ray_mtup.trial.run_single`)."""
    logger.error("run stopped before training: %s: %s", type(exc).__name__, exc)
    session.report({"epoch": 0, "global_step": 0, objective.METRIC: -1.0, "stop_reason": f"{type(exc).__name__}: {exc}",
                    "permanent_error": type(exc).__name__, "error_message": str(exc)}, None)


def train_epoch(w: Worker, batches: list[list[int]], schedule: Schedule, epoch: int, step: int,
                faults: FaultInjector) -> tuple[dict[str, Any], int]:
    """One epoch of optimizer steps; returns its metrics and the new global step.

    Every rank runs the same number of micro-steps; a non-finite loss on any rank stops the
    run at the end of that optimizer step, and running out of memory stops it at once, each
    with the reason in the metrics (with several ranks, out of memory fails the worker group:
    the others wait inside the step's collectives).
    """
    import torch

    cfg, engine, world = w.cfg, w.engine, w.session.world_size
    accum = grad_accum(cfg, world)
    micro_steps = schedule.steps_per_epoch * accum
    batches = (batches * (1 + micro_steps // max(1, len(batches))))[:micro_steps]
    engine.train()
    t0 = time.perf_counter()
    loss_sum, real_tokens, padded_tokens, nonfinite, oom = 0.0, 0, 0, 0.0, ""
    for micro, idx in enumerate(batches):
        items = [w.data.train_encoded[i] for i in idx]
        batch = micro_batch(items, w.tokenizer.pad_token_id, w.packing, w.on_gpu)
        real_tokens += sum(len(x) for x in items)
        padded_tokens += batch["input_ids"].numel()
        try:
            faults.before_micro_step(epoch, micro)
            loss = faults.loss(forward_loss(engine, batch, w.device), epoch)
            nonfinite = max(nonfinite, 0.0 if torch.isfinite(loss.detach()) else 1.0)
            engine.backward(loss)
            engine.step()
        except torch.OutOfMemoryError:
            oom = f"out of memory at micro-batch {micro} of epoch {epoch}"
            if world > 1:
                raise TrainingError(f"{oom} on rank {w.session.rank}") from None
            break
        loss_sum += float(loss.detach())
        if (micro + 1) % accum == 0:
            step += 1
            if all_reduce([nonfinite], w.device, world, "max")[0] > 0:
                break
    seconds = time.perf_counter() - t0
    loss_sum, n, real_tokens, padded_tokens, nonfinite = all_reduce(
        [loss_sum, micro + 1, real_tokens, padded_tokens, nonfinite], w.device, world)
    metrics = {"epoch": epoch, "global_step": step, "train_loss": loss_sum / max(n, 1),
               "lr": engine.get_lr()[0], "tokens_per_s": real_tokens / max(seconds, 1e-9),
               "useful_token_fraction": real_tokens / max(padded_tokens, 1), "epoch_time_s": seconds,
               "skipped_long": len(w.data.skipped_long), **batch_metrics(cfg, world),
               "packing": w.packing, "liger_kernel": liger_applied(engine.module),
               "attn_implementation": getattr(engine.module.config, "_attn_implementation", None),
               "stop_reason": oom or (f"non-finite loss at epoch {epoch}, step {step}" if nonfinite else "")}
    if metrics["stop_reason"]:
        metrics.update(task1_f1=0.0, task2_f1=0.0, validity=0.0, val_loss=float("nan"), **{objective.METRIC: -1.0})
    return metrics, step


def micro_batch(items: list[dataset.Encoded], pad_id: int, packing: bool, on_gpu: bool) -> dict[str, Any]:
    """One micro-batch's tensors: a padding-free row with ``packing``, else dynamically padded
    (to a multiple of 8 on GPU)."""
    if packing:
        return dataset.collate_packed(items)
    return dataset.collate(items, pad_id, pad_to_multiple_of=8 if on_gpu else 1)


def forward_loss(model: Any, batch: dict[str, Any], device: Any) -> Any:
    """The model's own loss on ``batch`` (labels passed in: the mean over its label tokens).

    The model computes it, so that Liger's fused linear cross-entropy, when applied
    (:func:`~ray_mtup.modeling.apply_liger`), replaces the logits and the loss. No cache:
    training needs none, and transformers only detects packed sequences without one (with a
    cache, a packed row would attend across its sequences under sdpa/eager).
    """
    return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss


def batch_metrics(cfg: TrainConfig, world: int) -> dict[str, int]:
    """The batch arithmetic of a run, logged every epoch: global = micro x accumulation x world,
    and the ZeRO stage (``cfg`` resolved: see :func:`resolve_memory_plan`)."""
    return {"global_batch_size": cfg.global_batch_size, "micro_batch_size": cfg.micro_batch(),
            "grad_accum": grad_accum(cfg, world), "world_size": world, "zero_stage": cfg.stage()}


def _report(w: Worker, history: list[dict[str, Any]], resume: dict[str, Any] | None,
            predictions: list[dict[str, Any]] | None, faults: FaultInjector) -> bool:
    """Report the last epoch on every rank; rank 0 attaches the checkpoint. False: the run stops.

    ``predictions``: the epoch's :func:`~ray_mtup.evaluation.prediction_records`. After a stop
    (``predictions`` None: non-finite loss, out of memory) the weights are unusable:
    the checkpoint carries only the trainer state, so the run's results say why it ended. A
    checkpoint that cannot be written (a full disk) stops the run too; the previous checkpoint
    stays the latest.
    """
    metrics = history[-1]
    weights = trainable_state(w.engine.module) if predictions is not None else None  # a collective under ZeRO-3
    state = {"epoch": metrics["epoch"], "global_step": metrics["global_step"], "history": history,
             "config": w.cfg.to_dict(), "base_source": w.source.path, "max_new_tokens": w.data.max_new_tokens,
             "stop_reason": metrics["stop_reason"],
             "adapter_digest": weights_digest(weights) if weights is not None else None,
             "resumed_from_epoch": resume["epoch"] if resume else 0,
             "resumed_adapter_digest": resume.get("loaded_adapter_digest") if resume else None,
             "memory_plan": w.plan.to_dict() if w.plan is not None else None}
    with tempfile.TemporaryDirectory() as tmp:
        directory, write_error = Path(tmp) / "checkpoint", ""
        if w.session.rank == 0:
            try:
                if weights is None:
                    logger.error("stopping: %s", metrics["stop_reason"])
                    save_stop_state(directory, state)
                else:
                    save_checkpoint(directory, w.engine.module, w.tokenizer, state, weights,
                                    predictions, before_write=faults.write_hook(metrics["epoch"]))
                    _log_epoch(metrics)
            except OSError as exc:  # e.g. a full disk: nothing half-written is reported
                write_error = write_failure(int(metrics["epoch"]), exc)
        if all_reduce([1.0 if write_error else 0.0], w.device, w.session.world_size, "max")[0] > 0:
            metrics.update({objective.METRIC: -1.0,
                            "stop_reason": write_error or "rank 0 could not write the checkpoint"})
            logger.error("stopping: %s", metrics["stop_reason"])
            w.session.report(metrics, None)
            return False
        w.session.report(metrics, directory if w.session.rank == 0 else None)
    barrier(w.session.world_size)
    return weights is not None




def _device(cfg: TrainConfig, session: Session) -> tuple[Any, bool]:
    import torch

    if cfg.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", session.local_rank)
        torch.cuda.set_device(device)
        return device, True
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return torch.device("cpu"), False


def _log_start(w: Worker, schedule: Schedule, resume: dict[str, Any] | None) -> None:
    if w.session.rank != 0:
        return
    b = batch_metrics(w.cfg, w.session.world_size)
    logger.info("run: %d train / %d val graphs, %d skipped as too long, %d trainable of %d params; "
                "ZeRO-%d, global batch %d = micro %d x accumulation %d x %d worker(s); %d steps/epoch, epochs %d..%d; "
                "generation budget %d new tokens", len(w.data.train_encoded), len(w.data.val),
                len(w.data.skipped_long), count_parameters(w.engine.module, trainable_only=True),
                count_parameters(w.engine.module), b["zero_stage"], b["global_batch_size"], b["micro_batch_size"],
                b["grad_accum"], b["world_size"], schedule.steps_per_epoch,
                (resume["epoch"] + 1) if resume else 1, w.cfg.epochs, w.data.max_new_tokens)


def _log_epoch(m: dict[str, Any]) -> None:
    logger.info("epoch %d: loss %.4f val_loss %.4f task1 F %.4f task2 F %.4f validity %.3f %.0f tok/s; "
                "%d of %d rows hit the %d-token limit", m["epoch"], m["train_loss"], m["val_loss"],
                m["task1_f1"], m["task2_f1"], m["validity"], m["tokens_per_s"], m["hit_token_limit"],
                m["n_eval"], m["max_new_tokens"])
