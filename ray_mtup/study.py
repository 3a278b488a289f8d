"""The finished search as an Optuna study, and Optuna's own plots of it.

:func:`rebuild_study` makes an in-memory ``optuna`` study from the trials' records (each
trial's sampled parameters with the search space's distributions, its best objective as the
value, its per-epoch Task 2 F1 as intermediate values). That is more robust than reaching
into ``OptunaSearch`` after ``Tuner.fit()`` (absent on a resumed search) and needs nothing
but what the trials left. :func:`write_study_plots` draws, with
``optuna.visualization.matplotlib`` (no plotly): the optimisation history, the parameter
importances (fANOVA; needs >= 2 complete trials whose parameters vary) and a slice plot.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .logs import quiet

logger = logging.getLogger(__name__)

STUDY_PLOTS = ("optuna_history.png", "optuna_importances.png", "optuna_slice.png")


def distributions(space: Any) -> dict[str, Any]:
    """Optuna distributions of a :class:`~ray_mtup.search.SearchSpace`'s parameters."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for name, spec in space.params.items():
        if spec.type == "choice":
            out[name] = CategoricalDistribution(list(spec.values))
        elif spec.type == "randint":
            out[name] = IntDistribution(int(spec.low), int(spec.high))
        else:
            out[name] = FloatDistribution(spec.low, spec.high, log=spec.type == "loguniform")
    return out


def rebuild_study(records: Sequence[Any], space: Any) -> Any:
    """An in-memory study (direction maximize) with one complete trial per scored record.

    ``records`` are :class:`ray_mtup.reporting.TrialRecord`; a record without a finite
    objective (no epoch, or every epoch diverged) is left out.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(space)
    study = optuna.create_study(direction="maximize", study_name=Path(space.path).stem)
    for r in records:
        value = r.best.get("objective") if r.history else None
        if value is None or value < 0:
            continue
        params = {k: r.sampled[k] for k in dists if k in r.sampled}
        study.add_trial(optuna.trial.create_trial(
            value=float(value), params=params, distributions={k: dists[k] for k in params},
            intermediate_values={int(m["epoch"]): float(m.get("task2_f1") or 0.0) for m in r.history},
            user_attrs={"trial_id": r.trial_id, "stopped_early": r.stopped_early},
        ))
    return study


def write_study_plots(records: Sequence[Any], space: Any, out_dir: Path) -> list[str]:
    """Optuna's history, importance and slice plots as PNG; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = rebuild_study(records, space)
    n = len(study.trials)
    if n == 0:
        logger.info("no scored trial: no Optuna plots")
        return []
    varying = [k for k in distributions(space)
               if len({repr(t.params.get(k)) for t in study.trials if k in t.params}) > 1]
    plots = [("optuna_history.png", ovm.plot_optimization_history, True),
             ("optuna_importances.png", ovm.plot_param_importances, n >= 2 and bool(varying)),
             ("optuna_slice.png", ovm.plot_slice, True)]
    paths = []
    for name, draw, possible in plots:
        if not possible:
            logger.info("%s skipped: parameter importances need >= 2 complete trials whose "
                        "parameters vary (have %d)", name, n)
            continue
        # Optuna draws a choice parameter (lora_r: 8, 16, 64) as category strings, which matplotlib
        # notes at INFO on every plot ("Using categorical units ... parsable as floats"): expected here.
        with warnings.catch_warnings(), quiet("matplotlib.category"):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # matplotlib on one-valued or categorical axes
            result = draw(study)
        fig = _figure_of(result)
        fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4.5))
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(out_dir / name))
    return paths


def _figure_of(result: Any) -> Any:
    """The figure of an Axes or of an array of Axes (``plot_slice`` with several params)."""
    import numpy as np

    first = np.asarray(result, dtype=object).flat[0] if not hasattr(result, "figure") else result
    return first.figure
