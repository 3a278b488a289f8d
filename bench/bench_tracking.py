"""MLflow store: one epoch's metrics logged metric by metric vs in one batch, SQLite vs file store.

    python bench/bench_tracking.py [--metrics 40] [--epochs 3]

Ray's ``MLflowLoggerCallback`` logs a result metric by metric; in the SQLite store (the one
MLflow recommends, which ``ray_mtup.tracking`` uses) each is a committed transaction, so the
search's driver waits on every epoch result. ``ray_mtup.tracking`` logs each result in one
``log_batch`` call. Prints one JSON line per arm (the best of ``--epochs`` epochs, seconds) and
the ratios measured in the same process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit  # noqa: E402


def _arm(uri: str, root: Path, batched: bool, n_metrics: int, epochs: int) -> float:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    best = float("inf")
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        if batched:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(f"m{k}", 0.1 * k, now, epoch) for k in range(n_metrics)])
        else:
            for k in range(n_metrics):
                client.log_metric(run_id, f"m{k}", 0.1 * k, step=epoch)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=int, default=40, help="metrics per epoch result (a trial reports ~40)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the file store arm only
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, store, batched in [("sqlite_per_metric", "sqlite", False), ("sqlite_batch", "sqlite", True),
                                     ("file_per_metric", "file", False)]:
            root = Path(tmp) / name
            root.mkdir()
            uri = f"sqlite:///{root / 'mlflow.db'}" if store == "sqlite" else (root / "mlruns").as_uri()
            seconds[name] = _arm(uri, root, batched, args.metrics, args.epochs)
            emit({"bench": "tracking", "arm": name, "metrics": args.metrics, "best_epoch_s": round(seconds[name], 4)})
    emit({"bench": "tracking", "sqlite_per_metric_over_batch": round(seconds["sqlite_per_metric"] / seconds["sqlite_batch"], 1),
          "sqlite_batch_over_file_per_metric": round(seconds["sqlite_batch"] / seconds["file_per_metric"], 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
