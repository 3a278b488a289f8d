"""Experiment tracking and progress of a search, through Ray Tune's own callbacks.

* :func:`tracker_callbacks` turns ``--tracker`` into Ray's logger callbacks: MLflow
  (``MLflowLoggerCallback``, a local file store in the experiment directory, the default),
  TensorBoard (``TBXLoggerCallback``), Weights & Biases (``WandbLoggerCallback``, needs
  ``WANDB_API_KEY``) or none. Each trial is one run; its sampled hyper-parameters are the
  run's parameters and every reported metric is logged at the trial's epoch.
* :class:`EpochProgress` prints one line per finished epoch in the driver:
  ``trial <id> epoch k/N task2_f1 x (best so far y)``.

Open the MLflow store with
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://<experiment dir>/mlruns``
(MLflow 3 keeps its file store in maintenance mode and refuses it without that opt-in; the
file store is what keeps the tracking data inside the experiment directory, with no server).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("mlflow", "tensorboard", "wandb", "none")
DEFAULT_TRACKER = "mlflow"
MLFLOW_DIR = "mlruns"
#: MLflow >= 3.7 refuses a file store unless this is set (its documented opt-in).
MLFLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"


def mlflow_uri(results_dir: str | Path) -> str:
    """The MLflow file store of an experiment: ``file://<results dir>/mlruns``.

    >>> mlflow_uri("/data/runs/exp")
    'file:///data/runs/exp/mlruns'
    """
    return (Path(results_dir).resolve() / MLFLOW_DIR).as_uri()


def check_tracker(tracker: str) -> None:
    """Fail before Ray starts on an unknown tracker, or W&B without its API key."""
    if tracker not in TRACKERS:
        raise ConfigError("tracker", f"unknown tracker {tracker!r}; choose from {list(TRACKERS)}")
    if tracker == "wandb" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("tracker", "wandb needs WANDB_API_KEY in the environment "
                                     "(or choose --tracker mlflow/tensorboard/none)")


def tracker_callbacks(tracker: str, results_dir: str | Path, experiment_name: str) -> list[Any]:
    """Ray Tune logger callbacks for ``tracker`` (one of :data:`TRACKERS`).

    ``results_dir`` is the experiment's local results directory (MLflow's store goes into
    it). Ray already writes CSV, JSON and TensorBoard files into every trial's directory;
    ``tensorboard`` names that logger explicitly.
    """
    check_tracker(tracker)
    if tracker == "none":
        return []
    if tracker == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]
    if tracker == "wandb":
        return [_wandb_callback(experiment_name)]
    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        import mlflow  # noqa: F401  (MLflowLoggerCallback imports it only at setup)
    except ImportError as exc:
        raise ConfigError("tracker", f"mlflow is not installed ({exc}); pip install mlflow, "
                                     "or choose --tracker tensorboard/none") from exc
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(MLFLOW_FILE_STORE_ENV, "true")  # the driver logs; workers never touch MLflow
    return [MLflowLoggerCallback(tracking_uri=mlflow_uri(results_dir), experiment_name=experiment_name,
                                 tags={"project": "ray_mtup"})]


def _wandb_callback(experiment_name: str) -> Any:
    try:
        import wandb  # noqa: F401
        from ray.air.integrations.wandb import WandbLoggerCallback
    except ImportError as exc:
        raise ConfigError("tracker", f"wandb is not installed ({exc}); pip install wandb") from exc
    return WandbLoggerCallback(project="ray_mtup", group=experiment_name)


def tracker_location(tracker: str, results_dir: str | Path) -> str:
    """Where a person opens what ``tracker`` recorded (one line for the closing message)."""
    if tracker == "mlflow":
        return f"{MLFLOW_FILE_STORE_ENV}=true mlflow ui --backend-store-uri {mlflow_uri(results_dir)}"
    if tracker == "tensorboard":
        return f"tensorboard --logdir {Path(results_dir).resolve()}"
    if tracker == "wandb":
        return "the W&B project ray_mtup (group = the experiment name)"
    return "no tracker (--tracker none)"


def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class EpochProgress(_callback_base()):  # type: ignore[misc]
    """One line per finished epoch of any trial, with the best F1 of the search so far."""

    def __init__(self, planned_epochs: int, metric: str = "task2_f1"):
        self.planned_epochs = planned_epochs
        self.metric = metric
        self.best = -math.inf
        self.lines: list[str] = []

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or "epoch" not in result:
            return
        self.best = max(self.best, float(value))
        planned = int((trial.config or {}).get("epochs", self.planned_epochs))
        line = format_progress(trial.trial_id, int(result["epoch"]), planned, float(value), self.best, self.metric)
        self.lines.append(line)
        logger.info(line)


def format_progress(trial_id: str, epoch: int, planned: int, value: float, best: float,
                    metric: str = "task2_f1") -> str:
    """
    >>> format_progress("ab12", 2, 3, 0.41234, 0.5)
    'trial ab12 epoch 2/3 task2_f1 0.4123 (best so far 0.5000)'
    """
    return f"trial {trial_id} epoch {epoch}/{planned} {metric} {value:.4f} (best so far {best:.4f})"
