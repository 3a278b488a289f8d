"""Experiment tracking and progress of a search, through Ray Tune's own callbacks.

* :func:`tracker_callbacks` turns ``--tracker`` into Ray's logger callbacks: MLflow
  (``MLflowLoggerCallback``, a local file store in the experiment directory, the default),
  TensorBoard (``TBXLoggerCallback``), Weights & Biases (``WandbLoggerCallback``, needs
  ``WANDB_API_KEY``) or none. Each trial is one run; its sampled hyper-parameters are the
  run's parameters and every reported metric is logged at the trial's epoch.
* :mod:`ray_mtup.progress` prints one line per finished epoch in the driver.

Nothing here imports Ray at import time (the launcher reads :data:`TRACKERS` for its flags).

Open the MLflow store with
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://<experiment dir>/mlruns``
(MLflow 3 keeps its file store in maintenance mode and refuses it without that opt-in; the
file store is what keeps the tracking data inside the experiment directory, with no server).
"""

from __future__ import annotations

import logging
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
        import mlflow  # noqa: F401  (MLflowLoggerCallback imports it only at setup)
        from ray.air.integrations.mlflow import MLflowLoggerCallback
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
