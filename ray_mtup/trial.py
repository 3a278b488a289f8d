"""Layer 2: one training run as a ``TorchTrainer`` — a Tune trial, or a single-preset reproduction.

* :func:`build_trainer` turns a :class:`~ray_mtup.config.TrainConfig` into a Ray Train V2
  ``TorchTrainer`` (workers, CPUs/GPUs, gloo or NCCL, checkpoint retention, retries).
* :func:`trial_function` is the Tune function trainable: it rebuilds the frozen config
  from the trial's plain dict (base config + sampled hyper-parameters), then builds and fits
  its own ``TorchTrainer`` reporting through ``TuneReportCallback`` (under Train V2 a
  ``TorchTrainer`` cannot be handed to a ``Tuner``).
* :func:`run_single` runs layer 2 directly, without a search (``--no-search``), and writes
  the run's directory: ``config.yaml``, ``metrics.csv``, ``adapter/`` and ``summary.json``,
  which reports the best epoch's adapter scored once on the held-out test set
  (:func:`ray_mtup.holdout.score_on_test`) beside the validation F that chose it; with a
  remote ``storage_path`` (s3://) that directory is then copied to ``<storage_path>/<name>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import objective
from .checkpointing import ADAPTER_FILE, STATE_FILE
from .config import MAX_FAILURES, TrainConfig
from .errors import ConfigError, TrainingError, permanent_error
from .holdout import score_on_test
from .outputs import RunSummary, best_epoch, upload_results, with_launch, with_test_score, write_run_outputs
from .training import train_loop_per_worker

logger = logging.getLogger(__name__)

#: Hyper-parameters a search space may sample, and how each maps onto TrainConfig.
SAMPLED_KEYS = ("learning_rate", "epochs", "lora_r", "lora_alpha_ratio", "template",
                "weight_decay", "warmup_ratio", "lora_dropout", "retrieval_k", "constrained_decoding")
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
    max_failures: int = MAX_FAILURES,
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
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=objective.METRIC,
                checkpoint_score_order=objective.MODE,
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # Ray Train's own INFO lines (worker group start, process group, each checkpoint) stay in
            # its log files; the console shows the project's lines and Ray Train's warnings
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
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


def read_checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """The trainer state (epoch, history, config) stored in a Ray checkpoint."""
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text(encoding="utf-8"))


def run_single(cfg: TrainConfig, name: str, storage_path: str, output_dir: str | Path,
               max_failures: int = MAX_FAILURES, launch: dict[str, Any] | None = None) -> RunSummary:
    """Single-preset reproduction: one TorchTrainer, no search; writes the run directory (with the
    launcher's device decision, ``launch``, in summary.json) and copies it to remote storage."""
    trainer = build_trainer(cfg, name=name, storage_path=storage_path, max_failures=max_failures)
    result = trainer.fit()
    metrics = result.metrics or {}
    if metrics.get("permanent_error"):  # reported by the workers, not retried (ray_mtup.training)
        raise permanent_error(str(metrics["permanent_error"]), str(metrics.get("error_message", "")))
    if result.checkpoint is None:
        raise TrainingError(f"run {name} finished without a checkpoint: {result.error}")
    state = read_checkpoint_state(result.checkpoint)
    history = state["history"]
    candidates = result.best_checkpoints or [(result.checkpoint, history[-1])]
    with_adapter = {int(m["epoch"]): c for c, m in candidates if _has_adapter(c)}
    if not with_adapter:
        raise TrainingError(f"run {name} stopped: {state.get('stop_reason') or 'no epoch produced an adapter'}")
    # a failed checkpoint write (full disk) reports its reason without a checkpoint
    reason = state.get("stop_reason") or (result.metrics or {}).get("stop_reason")
    if reason:
        logger.error("run %s stopped early: %s; outputs use its best earlier epoch", name, reason)
    best = with_adapter[best_epoch(history, with_adapter)]
    with best.as_directory() as best_dir:
        summary = write_run_outputs(Path(output_dir), cfg, history, Path(best_dir), state.get("memory_plan"))
    # the figure to report: the chosen epoch's adapter, scored once on the held-out test set
    summary = with_test_score(summary, cfg, score_on_test(summary.adapter_dir, best.path, cfg.use_gpu,
                                                             out_dir=output_dir))
    if launch is not None:
        summary = with_launch(summary, cfg, launch)
    if "://" in storage_path:  # remote storage: the run directory goes next to the checkpoints, like a search's
        upload_results(Path(output_dir), f"{storage_path.rstrip('/')}/{name}")
    return summary


def _has_adapter(checkpoint: Any) -> bool:
    with checkpoint.as_directory() as d:
        return (Path(d) / ADAPTER_FILE).is_file()
