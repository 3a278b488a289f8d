"""The training core on CPU: tiny Qwen2, 2 Ray Train workers, gloo, DeepSpeed ZeRO-2 and ZeRO-3.

Integration tests: each starts Ray Train runs on a real corpus subset (skipped, saying so,
when ../shared/data/vlsp2025 is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_mtup import corpus
from ray_mtup.config import resolve_config
from ray_mtup.errors import TrainingError

pytestmark = pytest.mark.integration

SMALL = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 800},
    "max_samples": 120,
    "epochs": 3,
    "learning_rate": 2e-3,
    "per_device_batch_size": 8,
    "grad_accum": 1,
    "eval_max_samples": 8,
    "max_new_tokens": 48,
    "num_workers": 2,
    "cpus_per_worker": 1.0,
}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


def _cfg(vlsp_dir: Path, **overrides):
    return resolve_config("tiny", overrides={**SMALL, "data_dir": str(vlsp_dir), **overrides})


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_and_reports_every_epoch(stage, vlsp_dir, ray_local, tmp_path):
    from ray_mtup.trial import run_single

    cfg = _cfg(vlsp_dir, zero_stage=stage)
    summary = run_single(cfg, name=f"zero{stage}", storage_path=str(tmp_path / "storage"),
                         output_dir=tmp_path / "run")
    history = summary.history
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for m in history:  # SMATCH and validity reported every epoch, as fractions
        for key in ("task1_f1", "task2_f1", "task2_f1_official", "validity", "val_loss", "useful_token_fraction"):
            assert key in m
        assert 0.0 <= m["task2_f1"] <= 1.0 and 0.0 <= m["validity"] <= 1.0
        assert m["n_eval"] == 8
        assert m["useful_token_fraction"] > 0.5  # dynamic padding, not pad-to-2048
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert not list(adapter.glob("*.bin"))  # no pickled weights
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_run"] == 3


def test_resume_continues_at_next_epoch_with_saved_adapter(vlsp_dir, ray_local, tmp_path):
    from ray_mtup.trial import build_trainer, read_checkpoint_state

    storage = str(tmp_path / "storage")
    # Run 1 dies in epoch 2 (after epoch 1's checkpoint) and is not retried.
    crashing = _cfg(vlsp_dir, inject_fault="kill_worker@2")
    with pytest.raises(Exception):
        build_trainer(crashing, name="resume", storage_path=storage, max_failures=0).fit()
    checkpoints = _checkpoints(tmp_path / "storage" / "resume")
    assert len(checkpoints) == 1
    first = _state(checkpoints[0])
    assert first["epoch"] == 1
    # Run 2: same run name and storage, so the trainer restores from that checkpoint.
    result = build_trainer(crashing, name="resume", storage_path=storage, max_failures=0).fit()
    state = read_checkpoint_state(result.checkpoint)
    assert [m["epoch"] for m in state["history"]] == [1, 2, 3]
    assert state["history"][0] == first["history"][0]  # epoch 1 was not re-run
    assert state["resumed_from_epoch"] in (1, 2)
    resumed = [s for s in map(_state, _checkpoints(tmp_path / "storage" / "resume"))
               if s["epoch"] == 2]
    assert resumed and resumed[0]["resumed_from_epoch"] == 1
    assert resumed[0]["resumed_adapter_digest"] == first["adapter_digest"]  # the saved adapter was loaded


def test_saved_adapter_predicts_valid_graphs(vlsp_dir, ray_local, tmp_path):
    from ray_mtup.predict import FALLBACK_GRAPH, predict_file
    from ray_mtup.trial import run_single

    cfg = _cfg(vlsp_dir, epochs=1, num_workers=1)
    summary = run_single(cfg, name="pred", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "run")
    # the chosen adapter scored once on the held-out test split (10% of 120 graphs, both files)
    test = json.loads((tmp_path / "run" / "summary.json").read_text())["test"]
    assert test == summary.test and test["n_graphs"] == 12 and test["scoring_mode"] == "normalised"
    assert test["ci95"][0] <= test["task2_f1"] <= test["ci95"][1]
    assert set(test["task2_f1_official"]) == {"space", "_"}
    sentences = tmp_path / "in.txt"
    lines = [line for line in (vlsp_dir / "public_test.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()][:6]
    sentences.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = predict_file(tmp_path / "run", sentences, tmp_path / "out.txt", batch_size=4, max_new_tokens=32)
    assert report.n_sentences == 6
    assert report.n_task2 + report.n_task1_fallback + report.n_minimal == 6
    parsed = corpus.read_amr_file(tmp_path / "out.txt")  # every output is a decodable graph
    assert [e.sentence for e in parsed] == [" ".join(s.split()) for s in lines]
    from ray_mtup import amr

    for ex in parsed:
        assert amr.repair(ex.amr).valid
    assert report.n_minimal == sum(e.amr.strip() == FALLBACK_GRAPH for e in parsed)


def test_non_finite_loss_stops_with_reason(vlsp_dir, ray_local, tmp_path):
    from ray_mtup.trial import run_single

    cfg = _cfg(vlsp_dir, epochs=2, num_workers=1, inject_fault="nan_loss@1")
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1"):
        run_single(cfg, name="nan", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "run")
