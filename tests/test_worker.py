"""The same per-worker loop under Ray Train and under torchrun alone (no Ray imported there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import torchrun_configs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_torchrun_runs_the_loop_of_ray_train_with_equal_losses(qwen_like_checkpoint, torchrun_runs, ray_connected,
                                                               tmp_path):
    from ray_mtup.trial import run_single

    cfg = torchrun_configs(qwen_like_checkpoint)["equiv"]  # trained under torchrun by the fixture
    assert "import ray" not in (REPO / "ray_mtup" / "worker.py").read_text()
    run_single(cfg, name="equiv", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "ray")
    runs = {"torchrun": torchrun_runs["equiv"], "ray": tmp_path / "ray"}

    by_launcher = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    for key in ("train_loss", "val_loss"):
        a, b = (by_launcher[name]["history"][0][key] for name in ("torchrun", "ray"))
        assert abs(a - b) <= 1e-5, (key, a, b)
    for name in ("torchrun", "ray"):  # the same run directory layout
        run = runs[name]
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
