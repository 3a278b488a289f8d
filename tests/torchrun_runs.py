"""Several runs of the per-worker loop in one torchrun launch (the suite's ``torchrun_runs`` fixture).

    torchrun --standalone --nproc_per_node 2 tests/torchrun_runs.py CONFIG OUT [CONFIG OUT ...]

Each pair is ``python -m ray_mtup.worker --config CONFIG --output OUT --device cpu`` (its ``main``), run in turn
in the same process group: torch, transformers and DeepSpeed are imported and the group is formed
once for all of them.
"""

from __future__ import annotations

import gc
import sys

from ray_mtup import worker


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    for config, out in zip(argv[::2], argv[1::2]):
        code = worker.main(["--config", config, "--output", out, "--device", "cpu"])
        if code:
            return code
        gc.collect()  # the engine (and under ZeRO-3 its HfDeepSpeedConfig) goes before the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
