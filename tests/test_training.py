"""The training core on CPU, on the path of the headline command: a checkpoint directory laid
out like Qwen2.5-Instruct's, loaded as ``--model qwen2.5-1.5b --model-path DIR``, through
DeepSpeed ZeRO-2 and ZeRO-3 on 2 Ray Train workers (gloo).

Integration tests: Ray Train runs on the session's Ray cluster, on a real corpus subset (skipped,
saying so, when ../shared/data/vlsp2025 is absent). A killed rank's resume and a NaN loss are in
test_faults.py (Ray Train and the loop).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_mtup import corpus
from ray_mtup.config import resolve_config

pytestmark = pytest.mark.integration

SMALL = {
    "max_samples": 120,
    "epochs": 3,
    "learning_rate": 2e-3,
    "per_device_batch_size": 8,
    "global_batch_size": 16,
    "eval_max_samples": 8,
    "max_new_tokens": 48,
    "num_workers": 2,
    "cpus_per_worker": 1.0,
}


@pytest.fixture(scope="module")
def qwen_cfg(vlsp_dir, qwen_like_checkpoint):
    """``--model qwen2.5-1.5b --model-path <Qwen-like checkpoint>`` on a VLSP subset."""

    def make(**overrides):
        return resolve_config("qwen2.5-1.5b", overrides={
            **SMALL, "model_path": str(qwen_like_checkpoint), "data_dir": str(vlsp_dir), **overrides})

    return make


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def trained(qwen_cfg, ray_connected, tmp_path_factory):
    """``trained(stage)``: a 3-epoch run of 2 workers at that ZeRO stage (each run once per module)."""
    from ray_mtup.trial import run_single

    runs = {}

    def run(stage: int):
        if stage not in runs:
            root = tmp_path_factory.mktemp(f"zero{stage}")
            summary = run_single(qwen_cfg(zero_stage=stage), name=f"zero{stage}", storage_path=str(root / "storage"),
                                 output_dir=root / "run")
            runs[stage] = (summary, root / "run")
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_and_reports_every_epoch(stage, trained):
    summary, run_dir = trained(stage)
    history = summary.history
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for m in history:  # SMATCH and validity reported every epoch, as fractions
        for key in ("task1_f1", "task2_f1", "task2_f1_official", "validity", "val_loss", "useful_token_fraction",
                    "hit_token_limit"):
            assert key in m
        assert 0.0 <= m["task2_f1"] <= 1.0 and 0.0 <= m["validity"] <= 1.0
        assert m["n_eval"] == 8
        assert m["useful_token_fraction"] > 0.5  # dynamic padding, not pad-to-2048
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["epochs_run"] == 3
    assert written["batch"] == {"global_batch_size": 16, "micro_batch_size": 8, "grad_accum": 1, "world_size": 2,
                                "zero_stage": stage}
    plan = written["memory_plan"]  # an explicit stage and micro-batch are kept, and the plan says so
    assert (plan["requested_zero_stage"], plan["zero_stage"], plan["micro_batch_size"]) == (stage, stage, 8)
    # the chosen adapter scored once on the held-out test split (10% of 120 graphs, both files)
    test = written["test"]
    assert test == summary.test and test["n_graphs"] == 12 and test["scoring_mode"] == "normalised"
    assert test["ci95"][0] <= test["task2_f1"] <= test["ci95"][1]
    assert set(test["task2_f1_official"]) == {"space", "_"}


@pytest.mark.parametrize("stage", [2, 3])
def test_saved_adapter_holds_full_gathered_tensors(stage, trained, qwen_like_checkpoint):
    """Under ZeRO-3 each rank holds a slice of every weight: the saved adapter must be whole."""
    from safetensors.torch import load_file

    _, run_dir = trained(stage)
    adapter = run_dir / "adapter"
    assert not list(adapter.glob("*.bin"))  # no pickled weights
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    hidden = json.loads((qwen_like_checkpoint / "config.json").read_text())["hidden_size"]
    q_a = [w for n, w in weights.items() if "q_proj.lora_A" in n]
    q_b = [w for n, w in weights.items() if "q_proj.lora_B" in n]
    assert q_a and all(tuple(w.shape) == (64, hidden) for w in q_a)  # r = 64, the documented rank
    assert all(w.numel() > 0 for w in weights.values())
    assert any(float(w.abs().sum()) > 0 for w in q_b)  # B starts at zero: training moved it
    state = json.loads((adapter / "trainer_state.json").read_text())
    assert state["base_source"] == str(qwen_like_checkpoint)


def test_predict_from_the_zero3_run(trained, vlsp_dir, tmp_path):
    from ray_mtup import amr
    from ray_mtup.predict import FALLBACK_GRAPH, predict_file

    _, run_dir = trained(3)
    sentences = tmp_path / "in.txt"
    lines = [line for line in (vlsp_dir / "public_test.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()][:6]
    sentences.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = predict_file(run_dir, sentences, tmp_path / "out.txt", batch_size=4, max_new_tokens=32,
                          device="cpu")
    assert report.n_sentences == 6
    assert report.n_task2 + report.n_task1_fallback + report.n_minimal == 6
    parsed = corpus.read_amr_file(tmp_path / "out.txt")  # every output is a decodable graph
    assert [e.sentence for e in parsed] == [" ".join(s.split()) for s in lines]
    for ex in parsed:
        assert amr.repair(ex.amr).valid
    assert report.n_minimal == sum(e.amr.strip() == FALLBACK_GRAPH for e in parsed)
