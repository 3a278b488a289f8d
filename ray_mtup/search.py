"""Layer 1, the search: Ray Tune with Optuna (TPE) and ASHA over per-trial TorchTrainers.

Search spaces are YAML files (shipped in ``search_spaces/`` at the top of the repository, or any
path) validated by :func:`load_search_space`.
:func:`run_search` builds ``OptunaSearch`` (seeded, with the model's documented optimum as
the first point) and an ``ASHAScheduler`` on the ``epoch`` counter, runs a ``Tuner`` over
:func:`ray_mtup.trial.trial_function`, then hands the results to :mod:`ray_mtup.reporting`.

The objective is the ``objective`` metric (:mod:`ray_mtup.objective`): validation Task 2 SMATCH F1, with exact ties
(common early on, when no output parses yet) ordered by validation loss
(``task2_f1 - 1e-4 * val_loss``; see :func:`ray_mtup.objective.value`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import objective, reporting
from .config import MAX_FAILURES, TEMPLATE_NAMES, TrainConfig, load_yaml, optimum
from .errors import ConfigError
from .tracking import check_tracker, tracker_callbacks
from .trial import SAMPLED_KEYS, apply_sampled, trial_function

logger = logging.getLogger(__name__)

PARAM_TYPES = ("loguniform", "uniform", "randint", "choice")
SPACE_KEYS = ("params", "num_samples", "grace_period", "reduction_factor", "seed", "overrides")


@dataclass(frozen=True)
class ParamSpec:
    """One sampled hyper-parameter: ``loguniform``/``uniform``/``randint`` (inclusive) or ``choice``."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        key = f"params.{self.name}"
        if self.type not in PARAM_TYPES:
            raise ConfigError(f"{key}.type", f"unknown type {self.type!r}; choose from {list(PARAM_TYPES)}")
        if self.type == "choice":
            if not self.values:
                raise ConfigError(f"{key}.values", "a choice needs a non-empty list of values")
        else:
            if self.low is None or self.high is None:
                raise ConfigError(key, f"{self.type} needs low and high")
            if not self.low < self.high:
                raise ConfigError(key, f"bounds inverted or empty: low={self.low} >= high={self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ConfigError(f"{key}.low", f"loguniform needs low > 0, got {self.low}")
        if self.name == "template":
            bad = [v for v in self.values if v not in TEMPLATE_NAMES]
            if bad:
                raise ConfigError(f"{key}.values", f"unknown template {bad[0]!r}; choose from {list(TEMPLATE_NAMES)}")

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        return self.low <= value <= self.high  # type: ignore[operator]

    def to_tune(self) -> Any:
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # tune's upper bound is exclusive
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space file."""

    path: str
    params: dict[str, ParamSpec]
    num_samples: int = 16
    grace_period: int = 2
    reduction_factor: int = 2
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def max_epochs(self) -> int:
        spec = self.params.get("epochs")
        if spec is None:
            return int(self.overrides.get("epochs", 1))
        return int(max(spec.values) if spec.type == "choice" else spec.high)  # type: ignore[arg-type]

    def param_space(self) -> dict[str, Any]:
        return {name: spec.to_tune() for name, spec in self.params.items()}


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space YAML; errors name the offending key."""
    data = load_yaml(path)
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {path}; valid keys: {list(SPACE_KEYS)}")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise ConfigError("params", f"{path} needs a non-empty mapping 'params'")
    params = {}
    for name, spec in raw_params.items():
        if name not in SAMPLED_KEYS:
            raise ConfigError(f"params.{name}", f"not a tunable hyper-parameter; choose from {list(SAMPLED_KEYS)}")
        if not isinstance(spec, dict):
            raise ConfigError(f"params.{name}", "expected a mapping with 'type'")
        extra = sorted(set(spec) - {"type", "low", "high", "values"}, key=str)
        if extra:
            raise ConfigError(f"params.{name}.{extra[0]}", "unknown key; valid: type, low, high, values")
        values = spec.get("values")
        if values is not None and not isinstance(values, list):
            raise ConfigError(f"params.{name}.values", f"expected a list, got {values!r}")
        params[name] = ParamSpec(name, str(spec.get("type")), _num(spec.get("low"), f"params.{name}.low"),
                                 _num(spec.get("high"), f"params.{name}.high"), tuple(values or ()))
        _check_param_values(params[name])
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ConfigError("overrides", "expected a mapping of TrainConfig fields")
    TrainConfig().replace(**overrides)  # validates field names and values
    counters = {k: _int(data[k], k) for k in ("num_samples", "grace_period", "reduction_factor", "seed") if k in data}
    space = SearchSpace(str(path), params, **counters, overrides=dict(overrides))
    for key in ("num_samples", "grace_period"):
        if int(getattr(space, key)) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(space, key)}")
    if space.reduction_factor < 2:
        raise ConfigError("reduction_factor", f"must be >= 2, got {space.reduction_factor}")
    return space


#: Sampled hyper-parameters that take integers, and the one that takes booleans (the others
#: but ``template`` take any number).
INT_PARAMS = ("epochs", "lora_r", "retrieval_k")
BOOL_PARAMS = ("constrained_decoding",)


def _check_param_values(spec: ParamSpec) -> None:
    """Every choice value and bound has the parameter's type and gives a valid trial config."""
    if spec.name == "template":  # its values are checked against the template names
        return
    points = ([(f"params.{spec.name}.values", v) for v in spec.values] if spec.type == "choice"
              else [(f"params.{spec.name}.low", spec.low), (f"params.{spec.name}.high", spec.high)])
    for key, value in points:
        if spec.name in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise ConfigError(key, f"expected true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        if spec.name in INT_PARAMS and (not float(value).is_integer() or abs(value) > 2**31):
            raise ConfigError(key, f"expected an integer below 2**31, got {value!r}")
        try:
            apply_sampled(TrainConfig().to_dict(), {spec.name: value})
        except ConfigError as exc:
            raise ConfigError(key, f"{value!r} makes an invalid trial config ({exc})") from None


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(key, f"expected an integer, got {value!r}")
    return int(value)


def _num(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {value!r}") from None


def documented_optimum(space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """The first point Optuna evaluates: the model's documented optimum (for a model without
    one, the defaults derived from its size: :func:`ray_mtup.models.model_optimum`), within the space.

    A value outside the space (e.g. the tiny model's under the smoke space) is clipped to
    the nearest allowed value, with a warning.
    """
    spec = optimum(base.model, base.model_path)
    point = {
        "learning_rate": spec.learning_rate,
        "epochs": spec.epochs,
        "lora_r": base.lora.r,
        "lora_alpha_ratio": base.lora.alpha / base.lora.r,
        "template": base.template,
        "weight_decay": base.weight_decay,
        "warmup_ratio": base.warmup_ratio,
        "lora_dropout": base.lora.dropout,
        "retrieval_k": base.retrieval_k,
        "constrained_decoding": base.constrained_decoding,
    }
    point = {k: v for k, v in point.items() if k in space.params}
    for k, v in list(point.items()):
        spec_k = space.params[k]
        if not spec_k.contains(v):
            if spec_k.type == "choice":
                numeric = all(isinstance(x, (int, float)) for x in spec_k.values) and isinstance(v, (int, float))
                point[k] = min(spec_k.values, key=lambda x: abs(x - v)) if numeric else spec_k.values[0]
            else:
                point[k] = min(max(v, spec_k.low), spec_k.high)
                if spec_k.type == "randint":
                    point[k] = int(point[k])
            logger.warning("documented optimum %s=%s of %s lies outside %s; trial 1 uses %s",
                           k, v, base.model, space.path, point[k])
    return point


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs (resources, storage, fault tolerance); the space says what it samples."""

    name: str
    storage_path: str
    workers_per_trial: int = 1
    gpus_per_trial: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = MAX_FAILURES
    keep_checkpoints: int = 2  # per trial, its best by the objective (docs/ensemble.md: disk budget)
    num_samples: int | None = None
    ensemble: int = 0  # K > 0: the summary scores the ensemble of the K best trials (ray_mtup.ensemble_run)
    resume: bool = False
    tracker: str = "mlflow"  # ray_mtup.tracking.TRACKERS
    launch: dict[str, Any] | None = None  # the launcher's device decision (ray_mtup.devices.TrialPlan.to_dict)

    def __post_init__(self) -> None:
        if self.workers_per_trial < 1:
            raise ConfigError("workers_per_trial", f"must be >= 1, got {self.workers_per_trial}")
        if self.gpus_per_trial < 0:
            raise ConfigError("gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial}")
        check_gpu_split(self.gpus_per_trial, self.workers_per_trial)
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", f"must be >= 1 (each trial's best), got {self.keep_checkpoints}")
        if self.ensemble < 0:
            raise ConfigError("ensemble", f"must be >= 0, got {self.ensemble}")
        if self.ensemble and self.num_samples is not None and self.ensemble > self.num_samples:
            raise ConfigError("ensemble", f"the ensemble of {self.ensemble} trials needs at least as many trials; "
                                          f"num_samples is {self.num_samples}")
        check_tracker(self.tracker)


def check_gpu_split(gpus_per_trial: int, workers_per_trial: int) -> None:
    """Each worker of a trial gets one GPU: the GPUs of a trial must split evenly over its workers."""
    if gpus_per_trial and gpus_per_trial % workers_per_trial:
        raise ConfigError("gpus_per_trial", f"{gpus_per_trial} GPUs cannot be split evenly over "
                                            f"{workers_per_trial} workers")


TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its TorchTrainer


def max_concurrent_trials(resources: Mapping[str, float], cfg: TrainConfig,
                          driver_cpu: float = TRIAL_DRIVER_CPU) -> int:
    """How many trials fit on the cluster at once.

    >>> max_concurrent_trials({"CPU": 2.0}, TrainConfig(num_workers=1, cpus_per_worker=0.9))
    2
    >>> max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, TrainConfig(num_workers=4, use_gpu=True))
    2
    """
    cpu_need = cfg.num_workers * cfg.cpus_per_worker + driver_cpu
    fit = math.floor(resources.get("CPU", 0.0) / cpu_need + 1e-9)
    if cfg.use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / cfg.num_workers + 1e-9))
    return max(fit, 0)


def check_resources(resources: Mapping[str, float], cfg: TrainConfig, driver_cpu: float = TRIAL_DRIVER_CPU) -> int:
    """Fail before any trial starts when one trial cannot fit on the cluster.

    ``driver_cpu`` is what a Tune trial's own function holds (0 for a run without a search).
    """
    n = max_concurrent_trials(resources, cfg, driver_cpu)
    if n < 1:
        need = f"{cfg.num_workers} GPU(s)" if cfg.use_gpu else f"{cfg.num_workers * cfg.cpus_per_worker} CPU(s)"
        raise ConfigError("gpus_per_trial" if cfg.use_gpu else "workers_per_trial",
                          f"one trial needs {need}, the cluster has {dict(resources)}")
    return n


def check_storage(storage_path: str) -> None:
    """A local storage path must be writable before any trial starts."""
    if "://" in storage_path:
        return
    path = Path(storage_path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError("storage_path", f"{storage_path} is not writable: {exc}") from exc


def common_horizon(base: TrainConfig, space: SearchSpace) -> TrainConfig:
    """``base`` with every trial's learning-rate schedule spanning the space's maximum epochs
    (``schedule_epochs``); a trial's sampled ``epochs`` is then only where it stops.

    ASHA compares trials at the same epoch; with a schedule per trial length, a short trial
    would already have decayed its learning rate there and a long one not.

    >>> space = SearchSpace("s.yaml", {"epochs": ParamSpec("epochs", "randint", 2, 6)})
    >>> cfg = common_horizon(TrainConfig(epochs=3), space)
    >>> cfg.epochs, cfg.schedule_epochs
    (6, 6)
    """
    if "epochs" not in space.params:  # every trial runs the same epochs: its own schedule is common
        return base
    return base.replace(epochs=space.max_epochs, schedule_epochs=space.max_epochs)


def run_search(base: TrainConfig, space: SearchSpace, settings: SearchSettings) -> dict[str, Any]:
    """Run (or resume) the search; returns the summary written by :mod:`ray_mtup.reporting`.

    ``base`` is the resolved config every trial starts from (the launcher applied the space's
    ``overrides:`` and the flags; :func:`ray_mtup.config.resolve_config`), with the space's
    common schedule horizon (:func:`common_horizon`); a trial only adds its sampled values.
    """
    import ray
    import optuna
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .progress import EpochProgress, TrialProgress
    check_storage(settings.storage_path)
    base = common_horizon(base, space)
    concurrency = check_resources(ray.cluster_resources(), base)
    experiment_dir = f"{settings.storage_path.rstrip('/')}/{settings.name}"
    context = {
        "base": base.to_dict(),
        "storage_path": f"{experiment_dir}/train_runs",
        "max_failures": settings.max_failures,
        "keep_checkpoints": settings.keep_checkpoints,
    }
    trainable = tune.with_resources(tune.with_parameters(trial_function, context=context),
                                    {"CPU": TRIAL_DRIVER_CPU})
    if settings.resume:
        if not tune.Tuner.can_restore(experiment_dir):
            raise ConfigError("resume", f"no experiment to resume at {experiment_dir}")
        logger.info("resuming %s", experiment_dir)
        tuner = tune.Tuner.restore(experiment_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
        first = documented_optimum(space, base)
        searcher = OptunaSearch(metric=objective.METRIC, mode=objective.MODE, points_to_evaluate=[first],
                                sampler=TPESampler(seed=space.seed))
        # epochs not sampled: every trial runs the base config's epochs (overrides and flags included)
        max_t = space.max_epochs if "epochs" in space.params else base.epochs
        num_samples = settings.num_samples or space.num_samples
        callbacks = [*tracker_callbacks(settings.tracker, reporting.local_results_dir(experiment_dir), settings.name),
                     EpochProgress(max_t), TrialProgress(num_samples)]
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=space.grace_period,
                                  reduction_factor=space.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=objective.METRIC, mode=objective.MODE, search_alg=searcher, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=settings.storage_path, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                verbose=0,  # no Tune tables: EpochProgress prints one line per epoch; errors are still logged
            ),
        )
    logger.info("search %s: up to %d concurrent trial(s)", settings.name, concurrency)
    grid = tuner.fit()
    return reporting.write_search_results(grid, base, experiment_dir, space, settings.launch,
                                          ensemble=settings.ensemble)
