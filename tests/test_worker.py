"""The same per-worker loop under Ray Train and under torchrun alone (no Ray imported there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mtup.config import resolve_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _cfg(checkpoint: Path):
    return resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(checkpoint), "epochs": 1, "max_samples": 40, "num_workers": 2,
        "per_device_batch_size": "auto", "global_batch_size": 8, "learning_rate": 2e-3, "eval_max_samples": 2,
        "max_new_tokens": 16, "zero_stage": "auto", "cpus_per_worker": 1.0})


def test_torchrun_runs_the_loop_of_ray_train_with_equal_losses(qwen_like_checkpoint, ray_connected, tmp_path):
    from ray_mtup.trial import run_single

    cfg = _cfg(qwen_like_checkpoint)
    cfg.write_yaml(tmp_path / "run.yaml", "the equivalence test's run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ray_mtup.worker", "--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "torchrun"),
                "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "import ray" not in (REPO / "ray_mtup" / "worker.py").read_text()

    run_single(cfg, name="equiv", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "ray")

    by_launcher = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("torchrun", "ray")}
    for key in ("train_loss", "val_loss"):
        a, b = (by_launcher[name]["history"][0][key] for name in ("torchrun", "ray"))
        assert abs(a - b) <= 1e-5, (key, a, b)
    for name in ("torchrun", "ray"):  # the same run directory layout
        run = tmp_path / name
        assert {"config.yaml", "metrics.csv", "summary.json"} <= {p.name for p in run.iterdir()}
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        # "auto" resolved on the workers from this host's memory: the tiny shape fits at the largest
        # micro-batch (8 / 2 workers) under ZeRO-2
        assert by_launcher[name]["batch"] == {"global_batch_size": 8, "micro_batch_size": 4, "grad_accum": 1,
                                              "world_size": 2, "zero_stage": 2}
        plan = by_launcher[name]["memory_plan"]
        assert (plan["requested_zero_stage"], plan["requested_micro_batch"]) == ("auto", "auto")
        assert (plan["zero_stage"], plan["micro_batch_size"], plan["grad_accum"], plan["fits"]) == (2, 4, 1, True)
        assert plan["world_size"] == 2 and plan["model_shape"]["hidden_size"] == 64  # the checkpoint's config.json
        assert by_launcher[name]["config"]["zero_stage"] == "auto"  # config.yaml reruns plan again
