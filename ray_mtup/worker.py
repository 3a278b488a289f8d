"""The per-worker loop without Ray: ``torchrun --nproc_per_node N -m ray_mtup.worker --config run.yaml``.

Runs :func:`ray_mtup.training.train_loop` under a :class:`~ray_mtup.session.TorchrunSession`
and, on rank 0, writes the same run directory as a Ray single run (``config.yaml``,
``metrics.csv``, ``adapter/``, ``summary.json``) next to its ``checkpoint_<epoch>/``
directories. Nothing here imports Ray, so the loop can be measured on a machine without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .checkpointing import ADAPTER_FILE, recorded_memory_plan
from .config import DATA_DIR_ENV, TrainConfig, load_yaml, with_data_dir
from .devices import DEVICES, resolve_device
from .errors import RayMtupError, permanent_error
from .holdout import score_on_test
from .logs import setup_logging
from .outputs import best_epoch, with_test_score, write_run_outputs
from .session import TorchrunSession
from .training import train_loop

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_mtup.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a TrainConfig YAML (e.g. a run's config.yaml)")
    p.add_argument("--output", required=True, help="the run directory to write")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="gpu (one per process), cpu, or auto: the GPUs when there are any, else the CPU for the "
                        "tiny model and an error for a real model (pass --device cpu); it replaces the "
                        "config's use_gpu (default: %(default)s)")
    return p


def on_device(cfg: TrainConfig, device: str) -> TrainConfig:
    """``cfg`` with ``use_gpu`` as the launchers' one rule resolves ``device`` on this machine."""
    import torch

    where = resolve_device(device, cfg.model, torch.cuda.device_count(), where="on this machine")
    return cfg.replace(use_gpu=where == "gpu")


def corpus_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the corpus the launcher would take (:func:`ray_mtup.config.with_data_dir`);
    training on the shipped sample corpus because nothing names another is said out loud."""
    cfg = with_data_dir(cfg)
    if cfg.data_dir is None:
        logger.warning("data_dir is not set and $%s is unset: training on the small sample corpus shipped "
                       "with the package", DATA_DIR_ENV)
    return cfg


def run(cfg: TrainConfig, out_dir: Path) -> None:
    """Train ``cfg`` in this process group; rank 0 then writes the run directory."""
    session = TorchrunSession(out_dir)
    train_loop(cfg, session)
    if session.rank != 0:
        return
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    if history and history[-1].get("permanent_error"):  # ray_mtup.training.report_permanent_error
        raise permanent_error(history[-1]["permanent_error"], history[-1].get("error_message", ""))
    checkpoints = session.checkpoints()
    with_adapter = {int(p.name.rsplit("_", 1)[1]): p for p in checkpoints if (p / ADAPTER_FILE).is_file()}
    best = with_adapter[best_epoch(history, with_adapter)] if with_adapter else None
    plan = recorded_memory_plan(checkpoints[-1]) if checkpoints else None
    summary = write_run_outputs(out_dir, cfg, history, best, plan)
    if summary.adapter_dir is not None:
        with_test_score(summary, cfg, score_on_test(summary.adapter_dir, None, cfg.use_gpu))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(on_device(corpus_config(TrainConfig.from_dict(load_yaml(args.config))), args.device), Path(args.output))
    except RayMtupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
