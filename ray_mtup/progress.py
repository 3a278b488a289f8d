"""Progress of a search a person can follow: one line per finished epoch, in the driver.

``trial <id> epoch k/N task2_f1 x (best so far y)``, logged by a ``ray.tune.Callback`` (Tune
runs callbacks in the driver process), so nobody has to read Ray's trial tables.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)


class EpochProgress(Callback):
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
