"""Layer 2: one training run as a ``TorchTrainer`` — a Tune trial, or a single-preset reproduction.

* :func:`build_trainer` turns a :class:`~ray_mtup.config.TrainConfig` into a Ray Train V2
  ``TorchTrainer`` (workers, CPUs/GPUs, gloo or NCCL, checkpoint retention, retries).
* :func:`trial_function` is the Tune function trainable: it rebuilds the frozen config
  from the trial's plain dict (base config + sampled hyper-parameters), then builds and fits
  its own ``TorchTrainer`` reporting through ``TuneReportCallback`` (under Train V2 a
  ``TorchTrainer`` cannot be handed to a ``Tuner``).
* :func:`run_single` runs layer 2 directly, without a search (``--no-search``), and writes
  the run's directory: ``config.yaml``, ``metrics.csv``, ``adapter/`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import TrainConfig
from .errors import ConfigError, TrainingError
from .training import ADAPTER_FILE, STATE_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)

#: Hyper-parameters a search space may sample, and how each maps onto TrainConfig.
SAMPLED_KEYS = ("learning_rate", "epochs", "lora_r", "lora_alpha_ratio", "template",
                "weight_decay", "warmup_ratio", "lora_dropout", "retrieval_k", "constrained_decoding")
OBJECTIVE = "objective"  # Task 2 F1, ties by val_loss (ray_mtup.training.objective)
COLLECTIVE_TIMEOUT_S = 3 * 3600  # generation of a whole validation split can take a while


def apply_sampled(base: Mapping[str, Any], sampled: Mapping[str, Any]) -> TrainConfig:
    """The trial's TrainConfig: ``base`` (a TrainConfig dict) with sampled values applied.

    >>> cfg = apply_sampled(TrainConfig().to_dict(), {"lora_r": 16, "lora_alpha_ratio": 2, "epochs": 9})
    >>> cfg.lora.r, cfg.lora.alpha, cfg.epochs
    (16, 32, 9)
    """
    overrides: dict[str, Any] = {}
    for key, value in sampled.items():
        if key not in SAMPLED_KEYS:
            raise ConfigError(key, f"not a tunable hyper-parameter; choose from {list(SAMPLED_KEYS)}")
    if "learning_rate" in sampled:
        overrides["learning_rate"] = float(sampled["learning_rate"])
    if "epochs" in sampled:
        overrides["epochs"] = int(sampled["epochs"])
    if "template" in sampled:
        overrides["template"] = sampled["template"]
    if "weight_decay" in sampled:
        overrides["weight_decay"] = float(sampled["weight_decay"])
    if "warmup_ratio" in sampled:
        overrides["warmup_ratio"] = float(sampled["warmup_ratio"])
    if "lora_dropout" in sampled:
        overrides["lora.dropout"] = float(sampled["lora_dropout"])
    if "retrieval_k" in sampled:
        overrides["retrieval_k"] = int(sampled["retrieval_k"])
    if "constrained_decoding" in sampled:
        overrides["constrained_decoding"] = bool(sampled["constrained_decoding"])
    r = int(sampled.get("lora_r", base["lora"]["r"]))
    overrides["lora.r"] = r
    if "lora_alpha_ratio" in sampled:
        overrides["lora.alpha"] = int(round(r * float(sampled["lora_alpha_ratio"])))
    return TrainConfig.from_dict(base).replace(**overrides)


def build_trainer(
    cfg: TrainConfig,
    name: str,
    storage_path: str,
    callbacks: Sequence[Any] = (),
    max_failures: int = 1,
    keep_checkpoints: int = 2,
) -> Any:
    """A Ray Train V2 ``TorchTrainer`` running :func:`train_loop_per_worker` for ``cfg``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=OBJECTIVE,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def trial_function(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Layer 2 inside Tune: rebuild the config, build and fit this trial's TorchTrainer.

    ``config`` holds the sampled hyper-parameters; ``context`` (bound with
    ``tune.with_parameters``) = ``{"base": TrainConfig dict, "storage_path": str,
    "max_failures": int, "keep_checkpoints": int}``. The inner run is named after the trial,
    so a restored trial's TorchTrainer resumes from that run's latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sampled = {k: v for k, v in config.items() if k in SAMPLED_KEYS}
    cfg = apply_sampled(context["base"], sampled)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        name=f"train_{trial_id}",
        storage_path=context["storage_path"],
        callbacks=[TuneReportCallback()],
        max_failures=context["max_failures"],
        keep_checkpoints=context["keep_checkpoints"],
    )
    trainer.fit()


@dataclass(frozen=True)
class RunSummary:
    """What a finished single run leaves behind, as written to ``summary.json``."""

    run_dir: str
    history: list[dict[str, Any]]
    best_epoch: int
    best: dict[str, Any]
    final: dict[str, Any]
    adapter_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "best_epoch": self.best_epoch, "best": self.best,
                "final": self.final, "adapter_dir": self.adapter_dir, "epochs_run": len(self.history)}


def read_checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """The trainer state (epoch, history, config) stored in a checkpoint."""
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text(encoding="utf-8"))


def best_of(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The epoch with the best objective (Task 2 F1, ties by val_loss; the earliest among ties)."""
    return max(history, key=lambda m: (m.get(OBJECTIVE, 0.0), -m["epoch"]))


EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "task1_f1", "task2_f1", "validity", "tokens_per_s",
                 "useful_token_fraction", "epoch_time_s", "eval_time_s")


def format_epoch_table(history: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width per-epoch table for the terminal."""
    head = ["epoch", "loss", "val_loss", "T1 F1", "T2 F1", "valid", "tok/s", "useful", "train s", "eval s"]
    rows = [" ".join(f"{h:>9}" for h in head)]
    for m in history:
        cells = []
        for col in EPOCH_COLUMNS:
            v = m.get(col, float("nan"))
            cells.append(f"{v:>9d}" if isinstance(v, int) else f"{v:>9.4f}" if abs(v) < 100 else f"{v:>9.0f}")
        rows.append(" ".join(cells) + (f"  {m['stop_reason']}" if m.get("stop_reason") else ""))
    return "\n".join(rows)


def write_run_outputs(out_dir: Path, cfg: TrainConfig, history: Sequence[Mapping[str, Any]],
                      best_checkpoint: Any) -> RunSummary:
    """config.yaml, metrics.csv, adapter/ (best epoch) and summary.json in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.write_yaml(out_dir / "config.yaml",
                   f"resolved config; rerun with: python run_tune.py --no-search --config {out_dir / 'config.yaml'}")
    columns = sorted({k for m in history for k in m})
    with (out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    adapter_dir = None
    if best_checkpoint is not None:
        adapter = out_dir / "adapter"
        if adapter.exists():
            shutil.rmtree(adapter)
        best_checkpoint.to_directory(str(adapter))
        adapter_dir = str(adapter)
    best = dict(best_of(history))
    summary = RunSummary(str(out_dir), list(history), int(best["epoch"]), best, dict(history[-1]), adapter_dir)
    (out_dir / "summary.json").write_text(json.dumps(
        {**summary.to_dict(), "config": cfg.to_dict(), "history": list(history)}, indent=2,
        ensure_ascii=False), encoding="utf-8")
    return summary


def run_single(cfg: TrainConfig, name: str, storage_path: str, output_dir: str | Path,
               max_failures: int = 1) -> RunSummary:
    """Single-preset reproduction: one TorchTrainer, no search; writes the run directory."""
    trainer = build_trainer(cfg, name=name, storage_path=storage_path, max_failures=max_failures)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingError(f"run {name} finished without a checkpoint: {result.error}")
    state = read_checkpoint_state(result.checkpoint)
    history = state["history"]
    with_adapter = [(c, m) for c, m in (result.best_checkpoints or [(result.checkpoint, history[-1])])
                    if _has_adapter(c)]
    if not with_adapter:
        raise TrainingError(f"run {name} stopped: {state.get('stop_reason') or 'no epoch produced an adapter'}")
    best_ckpt = max(with_adapter, key=lambda cm: cm[1].get(OBJECTIVE, -1.0))[0]
    if state.get("stop_reason"):
        logger.error("run %s stopped early: %s; outputs use its best earlier epoch", name, state["stop_reason"])
    return write_run_outputs(Path(output_dir), cfg, history, best_ckpt)


def _has_adapter(checkpoint: Any) -> bool:
    with checkpoint.as_directory() as d:
        return (Path(d) / ADAPTER_FILE).is_file()
