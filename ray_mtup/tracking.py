"""Experiment tracking and progress of a search, through Ray Tune's own callbacks.

* :func:`tracker_callbacks` turns ``--tracker`` into Ray's logger callbacks: MLflow
  (``MLflowLoggerCallback``, a SQLite store in the experiment directory, the default),
  TensorBoard (``TBXLoggerCallback``), Weights & Biases (``WandbLoggerCallback``, needs
  ``WANDB_API_KEY``) or none. Each trial is one run; its sampled hyper-parameters are the
  run's parameters and every reported metric is logged at the trial's epoch.
* :func:`record_single_run` logs a run without a search (``--no-search``) to the same
  tracker, as one run: its config as parameters, every epoch's metrics at that epoch, and
  the test figure (``test_*``) after the last one.
* :mod:`ray_mtup.progress` prints one line per finished epoch, and one per finished trial,
  in the driver.

Nothing here imports Ray at import time (the launcher reads :data:`TRACKERS` for its flags).

Open the MLflow store with ``mlflow ui --backend-store-uri sqlite:///<experiment dir>/mlflow.db``
(or ``MlflowClient(tracking_uri=...)``): SQLite is the store MLflow recommends (its file store is
in maintenance mode), and it keeps the tracking data inside the experiment directory, with no
server; the experiment's artifact root is ``<experiment dir>/mlartifacts``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .logs import quiet

logger = logging.getLogger(__name__)

TRACKERS = ("mlflow", "tensorboard", "wandb", "none")
DEFAULT_TRACKER = "mlflow"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def mlflow_uri(results_dir: str | Path) -> str:
    """The MLflow store of an experiment: ``sqlite:///<results dir>/mlflow.db``.

    >>> mlflow_uri("/data/runs/exp")
    'sqlite:////data/runs/exp/mlflow.db'
    """
    return f"sqlite:///{Path(results_dir).resolve() / MLFLOW_DB}"


def _mlflow_experiment(results_dir: Path, experiment_name: str) -> None:
    """Create the store and the experiment, its artifact root inside the experiment directory
    (Ray's callback would otherwise create it with MLflow's default root, ``./mlruns`` of the
    current directory). MLflow logs its table creation at INFO: that logger is quieted here."""
    from mlflow.tracking import MlflowClient

    with quiet("mlflow.store.db.utils", "alembic"):
        client = MlflowClient(tracking_uri=mlflow_uri(results_dir))
        if client.get_experiment_by_name(experiment_name) is None:
            client.create_experiment(experiment_name,
                                     artifact_location=(results_dir.resolve() / MLFLOW_ARTIFACTS).as_uri())


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
    _mlflow_experiment(Path(results_dir), experiment_name)  # the driver logs; workers never touch MLflow
    return [_batched(MLflowLoggerCallback)(tracking_uri=mlflow_uri(results_dir), experiment_name=experiment_name,
                                 tags={"project": "ray_mtup"})]


def _batched(base: type) -> type:
    """Ray's ``MLflowLoggerCallback`` logging each result's metrics in one ``log_batch`` call.

    Ray logs metric by metric; in SQLite that is one committed transaction per metric: an epoch's
    40 metrics took 9 to 90 times as long as one batch on a shared 2-core machine (7.8 s against
    0.09 s under heavy load; ``bench/bench_tracking.py``, docs/benchmarks.md), time the search's
    driver waits on every epoch result.
    """

    class BatchedMLflowLoggerCallback(base):
        def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
            from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
            from ray.tune.utils import flatten_dict

            step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
            now = int(time.time() * 1000)
            metrics = [Metric(key, number, now, step) for key, value in flatten_dict(result).items()
                       if (number := _as_float(value)) is not None]  # what Ray logs: what float() takes
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)

    return BatchedMLflowLoggerCallback


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
        return f"mlflow ui --backend-store-uri {mlflow_uri(results_dir)}"
    if tracker == "tensorboard":
        return f"tensorboard --logdir {Path(results_dir).resolve()}"
    if tracker == "wandb":
        return "the W&B project ray_mtup (group = the experiment name)"
    return "no tracker (--tracker none)"


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b`` keys.

    >>> _flat({"lora": {"r": 8}, "epochs": 3})
    {'lora.r': 8, 'epochs': 3}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _numbers(data: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in _flat(data).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def figure_metrics(test: Mapping[str, Any]) -> dict[str, float]:
    """The test figure of a run as tracker metrics (``test_*``).

    >>> figure_metrics({"task2_f1": 0.3, "ci95": [0.2, 0.4], "validity": 0.9, "submitted": {"task2_f1": 0.35}})
    {'test_task2_f1': 0.3, 'test_ci95_low': 0.2, 'test_ci95_high': 0.4, 'test_validity': 0.9, 'test_submitted_task2_f1': 0.35}
    """
    if "task2_f1" not in test:
        return {}
    out = {"test_task2_f1": test["task2_f1"], "test_ci95_low": test["ci95"][0], "test_ci95_high": test["ci95"][1],
           "test_validity": test.get("validity")}
    if "submitted" in test:
        out["test_submitted_task2_f1"] = test["submitted"]["task2_f1"]
    return _numbers(out)


def record_single_run(tracker: str, results_dir: str | Path, name: str, config: Mapping[str, Any],
                      history: Sequence[Mapping[str, Any]], test: Mapping[str, Any]) -> None:
    """Log a ``--no-search`` run to ``tracker`` as one run, like a search trial: ``config``
    (flattened) as parameters, each epoch's numeric metrics at step ``epoch``, and
    :func:`figure_metrics` at the last epoch. The MLflow store is the one a search would use in
    ``results_dir``. A tracker that fails is logged, not raised: the run's files are written."""
    check_tracker(tracker)
    if tracker == "none":
        return
    params = {k: str(v) for k, v in _flat(config).items()}
    steps = [(int(m["epoch"]), _numbers(m)) for m in history]
    last = steps[-1][0] if steps else 0
    steps.append((last, figure_metrics(test)))
    try:
        if tracker == "mlflow":
            _mlflow_run(results_dir, name, params, steps)
        elif tracker == "tensorboard":
            _tensorboard_run(results_dir, params, steps)
        else:
            _wandb_run(name, params, steps)
    except (ImportError, OSError) as exc:
        logger.error("the run could not be recorded in %s: %s", tracker, exc)


def _mlflow_run(results_dir: str | Path, name: str, params: dict[str, str],
                steps: Sequence[tuple[int, dict[str, float]]]) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    Path(results_dir).mkdir(parents=True, exist_ok=True)
    _mlflow_experiment(Path(results_dir), name)
    client = MlflowClient(tracking_uri=mlflow_uri(results_dir))
    experiment_id = client.get_experiment_by_name(name).experiment_id
    run_id = client.create_run(experiment_id, run_name=name, tags={"project": "ray_mtup"}).info.run_id
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i:i + 100]])
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for step, values in steps for k, v in values.items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_terminated(run_id)


def _tensorboard_run(results_dir: str | Path, params: dict[str, str],
                     steps: Sequence[tuple[int, dict[str, float]]]) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(Path(results_dir).resolve())) as writer:
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        for step, values in steps:
            for key, value in values.items():
                writer.add_scalar(key, value, step)


def _wandb_run(name: str, params: dict[str, str], steps: Sequence[tuple[int, dict[str, float]]]) -> None:
    import wandb

    run = wandb.init(project="ray_mtup", group=name, name=name, config=params)
    try:
        for step, values in steps:
            run.log(values, step=step)
    finally:
        run.finish()
