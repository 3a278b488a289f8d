"""Fault injection for the fault tests (``TrainConfig.inject_fault``); inert when unset.

A spec is ``KIND@EPOCH``, or ``oom@EPOCH:MICRO`` (MICRO: 0-based micro-batch within the epoch):

* ``nan_loss@E``: the loss of every micro-batch of epoch E becomes NaN;
* ``kill_worker@E``: the last rank's process exits in epoch E (once per run);
* ``oom@E:M``: the last rank raises ``torch.OutOfMemoryError`` before micro-batch M of epoch E;
* ``disk_full@E``: writing the epoch-E checkpoint fails with ENOSPC after the adapter is written;
* ``corrupt_adapter@E`` / ``drop_state@E``: in epoch E the last rank truncates the adapter
  (deletes the trainer state) of the run's newest stored checkpoint, then exits (once per run),
  so the restarted workers resume from a damaged checkpoint.

The spec is parsed and checked by :func:`ray_mtup.config.parse_fault`. The training loop
calls it only through :meth:`FaultInjector.loss`,
:meth:`FaultInjector.before_micro_step` and :meth:`FaultInjector.write_hook`. A fault that
happens once per run leaves a marker file in the run's storage directory, which a restarted
worker group finds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .checkpointing import ADAPTER_FILE, STATE_FILE, WriteHook
from .config import TrainConfig, parse_fault

logger = logging.getLogger(__name__)

#: The micro-batch (within the epoch) at which the once-per-run faults act.
ACTION_MICRO = 1


class FaultInjector:
    """Injects the configured fault on the given rank; ``run_dir`` holds the once-per-run marker."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, run_dir: Path | None = None):
        self.spec = parse_fault(cfg.inject_fault) if cfg.inject_fault else None
        self.rank, self.world = rank, world
        self.run_dir = run_dir
        if self.run_dir is not None:
            self.marker = self.run_dir / ".fault_injected"
        else:
            digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
            self.marker = Path(tempfile.gettempdir()) / f"ray_mtup_fault_{digest}"

    def _is(self, kind: str, epoch: int) -> bool:
        return self.spec is not None and self.spec.kind == kind and self.spec.epoch == epoch

    def loss(self, loss: Any, epoch: int) -> Any:
        """The loss, made NaN under ``nan_loss`` in its epoch."""
        return loss * float("nan") if self._is("nan_loss", epoch) else loss

    def before_micro_step(self, epoch: int, micro: int) -> None:
        """Before micro-batch ``micro`` (0-based) of ``epoch``: OOM, kill, corrupt-and-kill."""
        if self.spec is None or self.spec.epoch != epoch or self.rank != self.world - 1:
            return
        if self.spec.kind == "oom" and micro == self.spec.micro:
            import torch

            logger.error("inject_fault: out of memory on rank %d at micro-batch %d of epoch %d",
                         self.rank, micro, epoch)
            raise torch.OutOfMemoryError("CUDA out of memory (injected by inject_fault)")
        if micro != ACTION_MICRO or self.marker.exists() or self.spec.kind not in (
                "kill_worker", "corrupt_adapter", "drop_state"):
            return
        self.marker.write_text(f"{self.spec.kind}\n")
        # Ray Train collects reports by polling the workers (every 2 s by default): wait past
        # that, so the previous epoch's report and checkpoint are registered.
        time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1)
        if self.spec.kind != "kill_worker":
            self._damage_newest_checkpoint()
        logger.error("inject_fault: killing rank %d in epoch %d", self.rank, epoch)
        os._exit(17)

    def write_hook(self, epoch: int) -> WriteHook | None:
        """A hook for :func:`~ray_mtup.checkpointing.save_checkpoint`: ENOSPC under ``disk_full``."""
        if not self._is("disk_full", epoch):
            return None

        def fail(name: str) -> None:
            if name == STATE_FILE:  # the adapter is already (partly) written: a mid-save failure
                logger.error("inject_fault: disk full while writing %s in epoch %d", name, epoch)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

        return fail

    def _damage_newest_checkpoint(self) -> None:
        if self.run_dir is None:
            raise RuntimeError(f"inject_fault {self.spec.kind} needs a local storage path")
        found = [p for p in self.run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
        if not found:
            raise RuntimeError(f"inject_fault {self.spec.kind}: no checkpoint in {self.run_dir}")
        newest = max(found, key=lambda p: json.loads((p / STATE_FILE).read_text(encoding="utf-8"))["epoch"])
        if self.spec.kind == "corrupt_adapter":
            path = newest / ADAPTER_FILE
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path = newest / STATE_FILE
            path.unlink()
        logger.error("inject_fault: damaged %s", path)
