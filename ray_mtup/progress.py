"""Progress of a search a person can follow, in the driver: one line per finished epoch and
one per finished trial.

``trial <id> epoch k/N task2_f1 x (best so far y)`` (:class:`EpochProgress`) and
``trial <id> finished: k of N trials done; best task2_f1 so far y; about M min left at the
current pace`` (:class:`TrialProgress`), logged by ``ray.tune.Callback`` s (Tune runs
callbacks in the driver process), so nobody has to read Ray's trial tables.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

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


class TrialProgress(Callback):
    """One line per trial that ends (finished, stopped by ASHA, or failed): how many of the
    search's ``num_samples`` are done, the best value so far, and the time left at the pace
    so far (wall time per finished trial, concurrency included, times the trials left)."""

    def __init__(self, num_samples: int, metric: str = "task2_f1", clock: Callable[[], float] = time.monotonic):
        self.num_samples = num_samples
        self.metric = metric
        self.clock = clock
        self.started = clock()
        self.finished = 0
        self.best = -math.inf
        self.lines: list[str] = []

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self.started = self.clock()
        self.num_samples = num_samples or self.num_samples

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.best = max(self.best, float(value))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, "failed")

    def _ended(self, trial: Any, how: str) -> None:
        self.finished += 1
        line = format_trial_progress(trial.trial_id, how, self.finished, self.num_samples,
                                     self.best if self.best > -math.inf else None,
                                     self.clock() - self.started, self.metric)
        self.lines.append(line)
        logger.info(line)


def format_trial_progress(trial_id: str, how: str, finished: int, total: int, best: float | None,
                          elapsed_s: float, metric: str = "task2_f1") -> str:
    """
    >>> format_trial_progress("ab12", "finished", 2, 8, 0.41234, 600.0)
    'trial ab12 finished: 2 of 8 trials done; best task2_f1 so far 0.4123; about 30 min left at the current pace'
    >>> format_trial_progress("cd34", "failed", 8, 8, None, 90.0)
    'trial cd34 failed: 8 of 8 trials done; best task2_f1 so far -; search done'
    """
    best_text = "-" if best is None else f"{best:.4f}"
    left = max(total - finished, 0)
    pace = "search done" if left == 0 else f"about {format_duration(elapsed_s / finished * left)} left at the current pace"
    return f"trial {trial_id} {how}: {finished} of {total} trials done; best {metric} so far {best_text}; {pace}"


def format_duration(seconds: float) -> str:
    """
    >>> format_duration(42), format_duration(1800), format_duration(2.5 * 3600)
    ('42 s', '30 min', '2.5 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
