"""Per-epoch evaluation on every rank: validation loss, generation on the validation split,
repair, corpus SMATCH for Task 1 and Task 2, and the search objective.

Each rank takes a shard of the validation graphs, padded with repeats to the same length on
every rank (ZeRO-3 needs the same number of forward passes everywhere); the padded rows are
computed and discarded. Generations are gathered and scored once, identically on every rank.

Generation takes the path of :func:`ray_mtup.replica.plan_generation` (``eval_generation``):
under ZeRO-3 on several workers either a LoRA-merged replica on each rank, generating its
shard alone, or the partitioned model in lockstep (``synced_gpus``); otherwise the engine's
model, which is whole. The path is in the epoch's metrics as ``eval_generation``. Every path
generates from merged weights (:func:`ray_mtup.replica.merged_weight`, the merge ``predict``
applies), in the engine's dtype, which is the one ``predict`` loads: the epoch is chosen on
the model that ships. ``predict_f1_official`` is the official SMATCH of exactly the graphs
``predict`` would write for these rows (Task 2, else Task 1, else the minimal graph; concepts
written with spaces), i.e. what ``evaluate`` gives on ``predict``'s file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from . import dataset, objective, scoring
from .config import TrainConfig
from .amr import concept_style
from .corpus import MtupExample
from .distributed import all_reduce, gather, shard
from .generation import Parsed, generate, parse_outputs, prompts_for, shipped_graphs
from .prompts import get_template
from .replica import generation_batch_size, merged_in_place, merged_replica, plan_generation

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a worker builds from the corpus: splits, encodings, and the generation budget.

    ``val`` (all of it) gives the validation loss; ``eval`` and ``eval_gold``, the subset of
    :func:`ray_mtup.dataset.evaluation_subset`, are what per-epoch generation scores.
    """

    train: list[MtupExample]
    val: list[MtupExample]
    eval: list[MtupExample]
    eval_gold: list[str]
    train_encoded: list[dataset.Encoded]
    val_encoded: list[dataset.Encoded]
    skipped_long: list[str]
    max_new_tokens: int


def validation_loss(model: Any, tokenizer: Any, cfg: TrainConfig, data: RunData, rank: int, world: int,
                    device: Any) -> float:
    """Token-weighted loss over the validation completions (padded shard rows weigh 0)."""
    import torch

    idx, real = shard(len(data.val_encoded), rank, world)
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for pos in range(0, len(idx), cfg.per_device_batch_size):
            chunk = idx[pos:pos + cfg.per_device_batch_size]
            batch = dataset.collate([data.val_encoded[i] for i in chunk], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            per_tok = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                ignore_index=dataset.IGNORE_INDEX, reduction="none").view(labels.shape)
            weight = torch.tensor([1.0 if pos + j < real else 0.0 for j in range(len(chunk))], device=device)
            valid = (labels != dataset.IGNORE_INDEX).float() * weight[:, None]
            loss_sum += float((per_tok * valid).sum())
            tokens += float(valid.sum())
    loss_sum, tokens = all_reduce([loss_sum, tokens], device, world)
    return loss_sum / max(tokens, 1.0)


def evaluate_epoch(engine: Any, tokenizer: Any, cfg: TrainConfig, data: RunData, rank: int, world: int,
                   device: Any) -> tuple[dict[str, Any], list[Parsed]]:
    """Validation loss, then generation on the validation subset, repair and corpus SMATCH."""
    model = engine.module
    model.eval()
    val_loss = validation_loss(model, tokenizer, cfg, data, rank, world, device)
    n_eval = len(data.eval)
    template = get_template(cfg.template)
    idx, real = shard(n_eval, rank, world)
    t0 = time.perf_counter()
    prompts = prompts_for(template, [data.eval[i].sentence for i in idx], [data.eval[i].context for i in idx],
                          tokenizer if cfg.chat_template else None)
    seq_len = max((len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
    plan = plan_generation(model, cfg, cfg.stage() == 3, world, device, seq_len + data.max_new_tokens)
    if rank == 0:
        logger.info("evaluation generation: %s: %s", plan.path, plan.reason)
    with merged_replica(model, device) if plan.path == "replica" else merged_in_place(model) as gen_model:
        rows = generation_batch_size(gen_model, cfg, device, seq_len + data.max_new_tokens, len(prompts), world)
        out = generate(gen_model, tokenizer, prompts, batch_size=rows,
                       max_new_tokens=data.max_new_tokens, synced_gpus=plan.synced_gpus, cache=cfg.generation_cache,
                       progress=rank == 0, stop_template=template, constrained=cfg.constrained_decoding)
    gen_time = time.perf_counter() - t0  # with the replica's gathering and merging
    gathered = gather(list(zip(idx[:real], out.texts[:real])), world)
    by_index = {i: text for part in gathered for i, text in part}
    parsed = parse_outputs(template, [by_index[i] for i in range(n_eval)])
    new_tokens, hit_limit = all_reduce([sum(out.new_tokens[:real]), sum(out.hit_limit[:real])], device, world)
    metrics, pairs = score_epoch(cfg, data.eval_gold, parsed, val_loss, progress=rank == 0)
    shipped, _ = shipped_graphs(parsed)  # what predict writes, as it writes it
    metrics["predict_f1_official"] = scoring.score_corpus(
        data.eval_gold, [concept_style(g, "space") for g in shipped], mode="official").f1
    metrics.update(n_eval=n_eval, hit_token_limit=int(hit_limit), max_new_tokens=data.max_new_tokens,
                   gen_new_tokens_per_s=new_tokens / max(gen_time, 1e-9), eval_generation=plan.path)
    return metrics, prediction_records(data.eval, data.eval_gold, parsed, pairs)


def prediction_records(examples: Sequence[Any], gold: Sequence[str], parsed: Sequence[Parsed],
                       pairs: Sequence[scoring.PairCounts]) -> list[dict[str, Any]]:
    """One record per scored sentence, as saved in a checkpoint's ``val_predictions.jsonl``: id,
    sentence, gold graph, raw output, both tasks' graphs (None when unreadable, scored as empty)
    and the sentence's own Task 2 F (``task2_f1``, in the run's scoring mode).

    >>> from types import SimpleNamespace as NS
    >>> p = Parsed("raw", None, "(c / chó)", False)
    >>> prediction_records([NS(id="f:1", sentence="chó")], ["(c / chó)"], [p], [scoring.PairCounts(2, 2, 2, True)])[0]["task2_f1"]
    1.0
    """
    return [{"id": ex.id, "sentence": ex.sentence, "gold": g, "raw": p.raw, "task1_graph": p.task1_graph,
             "task2_graph": p.task2_graph, "task2_f1": pair.f1}
            for ex, g, p, pair in zip(examples, gold, parsed, pairs, strict=True)]


def score_epoch(cfg: TrainConfig, gold: Sequence[str], parsed: Sequence[Parsed], val_loss: float,
                progress: bool = False) -> tuple[dict[str, Any], list[scoring.PairCounts]]:
    """Corpus SMATCH of both tasks in the run's mode, Task 2 in the official one too, and the
    objective; and the Task 2 counts of every sentence. ``progress`` shows a bar (rank 0 only).

    The objective's rule: a Task 2 output that cannot be read (None) counts as an empty graph;
    the held-out test figure (:mod:`ray_mtup.holdout`) follows the same rule."""
    pairs = scoring.score_pairs(gold, [p.task2_graph for p in parsed], mode=cfg.scoring_mode, progress=progress)
    t2 = scoring.Score.from_pairs(pairs, cfg.scoring_mode)
    t1 = scoring.score_corpus(gold, [p.task1_graph for p in parsed], mode=cfg.scoring_mode)
    # The shared task's convention too, so every epoch compares with the published leaderboard.
    t2_official = t2 if t2.mode == "official" else scoring.score_corpus(
        gold, [p.task2_graph for p in parsed], mode="official")
    return {
        "val_loss": val_loss,
        "task1_f1": t1.f1,
        "task2_f1": t2.f1,
        "task2_precision": t2.precision,
        "task2_recall": t2.recall,
        "task2_f1_official": t2_official.f1,
        "validity": t2.validity,
        "task1_validity": t1.validity,
        "repaired_rate": sum(p.task2_repaired for p in parsed) / max(1, len(parsed)),
        objective.METRIC: objective.value(t2.f1, val_loss),
        "scoring_mode": t2.mode,
    }, pairs
