"""What the per-worker loop knows of whoever launched it: a :class:`Session`.

The loop (:func:`ray_mtup.training.train_loop`) asks its session for its rank and world size,
the checkpoint to resume from, and hands it each epoch's metrics with an optional checkpoint
directory. Two implementations:

* :class:`RaySession`: a Ray Train worker (``ray.train.report`` / ``get_checkpoint``);
* :class:`TorchrunSession`: a process started by ``torchrun`` (``python -m ray_mtup.worker``).
  It imports nothing from Ray; rank 0 writes ``metrics.jsonl`` and ``checkpoint_<epoch>/``
  directories (written under a temporary name, then renamed) into the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

logger = logging.getLogger(__name__)
#: The module (under ``ray/train``) whose logger notes each ``ray.train.report``.
RAY_TRAIN_REPORT_LOG = "v2/_internal/execution/context.py"


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int

    def resume_from(self) -> contextlib.AbstractContextManager[list[Path]]:
        """Checkpoint directories to resume from, newest first (empty: a fresh start); the
        newest is the one to use, the others are the fallback when it is damaged."""

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        """One epoch's metrics, on every rank, the same number of times; the checkpoint on rank 0."""

    def run_dir(self) -> Path | None:
        """A local directory shared by the run's workers, when there is one (fault markers)."""


class RaySession:
    """The loop under Ray Train V2."""

    def __init__(self) -> None:
        import ray.train

        # Ray Train V2 logs every report, its metrics in full, at INFO under its module's file
        # name; the loop logs each epoch in one line of its own
        logging.getLogger(str(Path(ray.train.__file__).parent / RAY_TRAIN_REPORT_LOG)).setLevel(logging.WARNING)
        self._ctx = ray.train.get_context()
        self.rank = self._ctx.get_world_rank()
        self.world_size = self._ctx.get_world_size()
        self.local_rank = self._ctx.get_local_rank()

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[list[Path]]:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            yield []
            return
        with contextlib.ExitStack() as stack:
            yield [Path(stack.enter_context(c.as_directory())) for c in [latest, *self._earlier(latest)]]

    @staticmethod
    def _earlier(latest: Any) -> list[Any]:
        """The run's other kept checkpoints, newest epoch first."""
        import ray.train

        try:
            reported = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        except Exception as exc:  # noqa: BLE001 -- an alpha API of Ray Train: failing means "no fallback"
            logger.error("cannot list the run's earlier checkpoints: %s", exc)
            return []
        others = [r for r in reported if r.checkpoint.path != latest.path]
        others.sort(key=lambda r: -float((r.metrics or {}).get("epoch") or 0))
        return [r.checkpoint for r in others]

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)

    def run_dir(self) -> Path | None:
        try:  # Ray's StorageContext is a DeveloperAPI: tolerate its absence
            path = str(self._ctx.get_storage().experiment_fs_path)
        except AttributeError:
            return None
        return None if "://" in path else Path(path)


CHECKPOINT_PREFIX = "checkpoint_"
METRICS_FILE = "metrics.jsonl"


class TorchrunSession:
    """The loop under ``torchrun``: rank and world size from its environment, results in ``out_dir``."""

    def __init__(self, out_dir: str | Path):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (a renamed directory is complete)."""
        return sorted(p for p in self.out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and "." not in p.name)

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[list[Path]]:
        yield self.checkpoints()[::-1]

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        if self.rank != 0:
            return
        if checkpoint_dir is not None:
            target = self.out_dir / f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        with (self.out_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(metrics), ensure_ascii=False) + "\n")

    def run_dir(self) -> Path | None:
        return self.out_dir
