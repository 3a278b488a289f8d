"""Fault injection for the fault tests (``TrainConfig.inject_fault``), outside the loop body.

The loop calls two hooks, :meth:`FaultInjector.loss` and :meth:`FaultInjector.before_micro_step`;
with ``inject_fault`` unset both do nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig

logger = logging.getLogger(__name__)


class FaultInjector:
    """Tests only (``TrainConfig.inject_fault``): NaN loss or a killed worker in a given epoch.

    A kill happens once per run: the last rank writes a marker file into the run's storage
    directory (``run_dir``) before exiting, and a retried or restarted run finds it and
    trains on.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int, run_dir: Path | None = None):
        self.kind, self.epoch = None, -1
        if cfg.inject_fault:
            kind, _, epoch = cfg.inject_fault.partition("@")
            self.kind, self.epoch = kind, int(epoch)
        if run_dir is not None:
            self.marker = run_dir / ".fault_injected"
        else:
            digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
            self.marker = Path(tempfile.gettempdir()) / f"ray_mtup_fault_{digest}"
        self.rank, self.world = rank, world

    def loss(self, loss: Any, epoch: int) -> Any:
        if self.kind == "nan_loss" and epoch == self.epoch:
            return loss * float("nan")
        return loss

    def before_micro_step(self, epoch: int, micro: int) -> None:
        if self.kind == "kill_worker" and epoch == self.epoch and micro == 1 and self.rank == self.world - 1:
            if not self.marker.exists():
                self.marker.write_text("killed\n")
                # Ray Train collects reports by polling the workers (every 2 s by default): wait
                # past that, so the previous epoch's report and checkpoint are registered.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2)) + 1)
                logger.error("inject_fault: killing rank %d in epoch %d", self.rank, epoch)
                os._exit(17)
