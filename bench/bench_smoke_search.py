"""Time the smoke search end to end: ``run_tune.py --model tiny --smoke-test`` (target ≤ 3 min on 2 cores).

Runs the real entry point in a subprocess (embedded local Ray, tiny model, sample corpus),
then prints one JSON line: wall time, trials, trials stopped early by ASHA, CPU-hours.

    python bench/bench_smoke_search.py [--storage-path DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage-path", help="where the search writes (default: a temporary directory)")
    args = parser.parse_args()
    storage = Path(args.storage_path or tempfile.mkdtemp(prefix="smoke_bench_"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "run_tune.py", "--model", "tiny", "--smoke-test",
                           "--storage-path", str(storage), "--name", "smoke_bench"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        return proc.returncode
    exp = storage / "smoke_bench"
    with (exp / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    print(json.dumps({
        "bench": "smoke_search",
        "wall_s": round(wall, 1),
        "target_s": 180,
        "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] == "True" for r in rows),
        "epochs_run": sum(int(r["epochs_run"]) for r in rows),
        "cpu_hours": round(summary["cost"]["total_cpu_hours"], 4),
        "asha_saved_cpu_hours": round(summary["cost"]["asha_saved_cpu_hours"], 4),
        "loadavg_1m": os.getloadavg()[0],
        "nproc": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
