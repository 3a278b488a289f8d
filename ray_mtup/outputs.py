"""What a finished run leaves behind, however it was launched (Ray or torchrun):
``config.yaml``, ``metrics.csv``, ``adapter/`` (the best epoch's checkpoint) and ``summary.json``
(which holds the run's memory plan: the ZeRO stage and micro-batch its workers resolved, and
the arithmetic behind them, :class:`ray_mtup.memory.MemoryPlan`). With remote storage
(``--storage-path s3://...``) the run directory is written locally and then copied next to
the run's checkpoints (:func:`upload_results`), as a search's results are."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from . import objective
from .cards import figures_from_summary, write_card
from .config import TrainConfig
from .holdout import describe_corpus

logger = logging.getLogger(__name__)

EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "task1_f1", "task2_f1", "validity", "tokens_per_s",
                 "useful_token_fraction", "epoch_time_s", "eval_time_s")
#: How a run's batch was formed and sharded (every epoch's metrics carry these).
BATCH_KEYS = ("global_batch_size", "micro_batch_size", "grad_accum", "world_size", "zero_stage")


@dataclass(frozen=True)
class RunSummary:
    """What a finished single run leaves behind, as written to ``summary.json``."""

    run_dir: str
    history: list[dict[str, Any]]
    best_epoch: int
    best: dict[str, Any]
    final: dict[str, Any]
    adapter_dir: str | None
    test: dict[str, Any] = field(default_factory=dict)  # the chosen adapter on the held-out test set
    memory_plan: dict[str, Any] | None = None  # MemoryPlan.to_dict() of the workers (None: not recorded)
    launch: dict[str, Any] | None = None  # the launcher's device decision (ray_mtup.devices.TrialPlan.to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "best_epoch": self.best_epoch, "best": self.best,
                "final": self.final, "adapter_dir": self.adapter_dir, "epochs_run": len(self.history),
                "batch": {k: self.final.get(k) for k in BATCH_KEYS}, "memory_plan": self.memory_plan,
                "test": self.test, "launch": self.launch}


def best_epoch(history: Sequence[Mapping[str, Any]], among: Collection[int] | None = None) -> int:
    """The epoch with the best objective (Task 2 F1, ties by val_loss; the earliest among ties),
    optionally among the epochs that have a checkpoint.

    >>> best_epoch([{"epoch": 1, "objective": 0.2}, {"epoch": 2, "objective": 0.3}, {"epoch": 3, "objective": 0.3}])
    2
    >>> best_epoch([{"epoch": 1, "objective": 0.2}, {"epoch": 2, "objective": 0.3}], among={1})
    1
    """
    return int(objective.best_epoch([m for m in history if among is None or int(m["epoch"]) in among])["epoch"])


def format_epoch_table(history: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width per-epoch table for the terminal."""
    head = ["epoch", "loss", "val_loss", "T1 F1", "T2 F1", "valid", "tok/s", "useful", "train s", "eval s"]
    rows = [" ".join(f"{h:>9}" for h in head)]
    for m in history:
        cells = []
        for col in EPOCH_COLUMNS:
            v = m.get(col, float("nan"))
            cells.append(f"{v:>9d}" if isinstance(v, int) else f"{v:>9.4f}" if abs(v) < 100 else f"{v:>9.0f}")
        rows.append(" ".join(cells) + (f"  {m['stop_reason']}" if m.get("stop_reason") else ""))
    return "\n".join(rows)


def write_run_outputs(out_dir: Path, cfg: TrainConfig, history: Sequence[Mapping[str, Any]],
                      best_dir: Path | None, memory_plan: Mapping[str, Any] | None = None) -> RunSummary:
    """config.yaml, metrics.csv, adapter/ (a copy of ``best_dir``) and summary.json in ``out_dir``.

    ``cfg`` is the run's config as given (``auto`` stays ``auto`` in config.yaml, so a rerun
    plans again on its own devices); ``memory_plan`` is what the workers resolved it to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.write_yaml(out_dir / "config.yaml",
                   f"resolved config; rerun with: python run_tune.py --no-search --config {out_dir / 'config.yaml'}")
    columns = sorted({k for m in history for k in m})
    with (out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    adapter_dir = None
    if best_dir is not None:
        adapter = out_dir / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(best_dir, adapter)
        adapter_dir = str(adapter)
    chosen = best_epoch(history)
    best = dict(next(m for m in history if int(m["epoch"]) == chosen))
    summary = RunSummary(str(out_dir), list(history), chosen, best, dict(history[-1]), adapter_dir,
                         memory_plan=dict(memory_plan) if memory_plan is not None else None)
    _write_summary(summary, cfg)
    return summary


def with_test_score(summary: RunSummary, cfg: TrainConfig, test: dict[str, Any]) -> RunSummary:
    """``summary`` with its test figure (:func:`ray_mtup.holdout.score_on_test`), rewritten to disk."""
    summary = replace(summary, test=test)
    _write_summary(summary, cfg)
    if summary.adapter_dir is not None:  # the adapter's card, now with the test figure
        write_card(summary.adapter_dir, cfg, figures_from_summary(summary.to_dict()), "adapter")
    return summary


def with_launch(summary: RunSummary, cfg: TrainConfig, launch: dict[str, Any]) -> RunSummary:
    """``summary`` with the launcher's device decision, rewritten to disk."""
    summary = replace(summary, launch=launch)
    _write_summary(summary, cfg)
    return summary


def _write_summary(summary: RunSummary, cfg: TrainConfig) -> None:
    (Path(summary.run_dir) / "summary.json").write_text(json.dumps(
        {**summary.to_dict(), "corpus": describe_corpus(cfg), "config": cfg.to_dict(),
         "history": list(summary.history)}, indent=2,
        ensure_ascii=False), encoding="utf-8")


def upload_results(local_dir: Path, uri: str) -> bool:
    """Copy ``local_dir`` (a run's or a search's result files) to ``uri`` on remote storage
    (``s3://``, ``gs://``, ``file://``: any URI pyarrow opens), next to the checkpoints.

    A failure is logged, not raised (the results stay in ``local_dir``); returns whether the copy
    was made."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))
        pyarrow.fs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)
    except (OSError, ValueError) as exc:
        logger.error("could not copy the results to %s (%s); they are in %s", uri, exc, local_dir)
        return False
    logger.info("results copied to %s", uri)
    return True
