"""The search objective's name and the one rule for "best".

Every epoch reports the metric :data:`METRIC` (validation Task 2 SMATCH F1, exact ties
ordered by validation loss; computed by :func:`value`), which Tune
maximises. The best epoch of a run, the best checkpoint of a single run, the best trial of
a search and the leaderboard's order all use :func:`score` of that metric.

>>> best_epoch([{"epoch": 1, METRIC: 0.2}, {"epoch": 2, METRIC: 0.5}, {"epoch": 3, METRIC: 0.5}])["epoch"]
2
>>> best_epoch([{"epoch": 1}, {"epoch": 2, METRIC: -1.0}])["epoch"]  # a missing value never wins
2
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

#: The metric every epoch reports and the search maximises.
METRIC = "objective"
MODE = "max"
#: The score of metrics without a finite objective (never better than a reported one).
MISSING = -math.inf


def value(task2_f1: float, val_loss: float) -> float:
    """The objective of an epoch: Task 2 F1, exact ties ordered by validation loss.

    Early on no output parses and every trial has F1 0; the tie-break lets ASHA still rank
    them. It moves the value by under 0.01 points of F1; a non-finite loss scores -1.

    >>> value(0.5, 2.0) > value(0.5, 3.0), value(0.51, 9.0) > value(0.5, 0.1), value(0.5, math.nan)
    (True, True, -1.0)
    """
    if not math.isfinite(val_loss):
        return -1.0
    return task2_f1 - 1e-4 * min(val_loss, 10.0)


def score(metrics: Mapping[str, Any]) -> float:
    """The objective of one epoch's metrics; :data:`MISSING` when absent, None or NaN.

    >>> score({METRIC: 0.25}), score({METRIC: None}), score({})
    (0.25, -inf, -inf)
    """
    value = metrics.get(METRIC)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return float(value)


def best_epoch(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The epoch with the best objective (the earliest among ties); ``{}`` for an empty history."""
    if not history:
        return {}
    return max(history, key=lambda m: (score(m), -m["epoch"]))
