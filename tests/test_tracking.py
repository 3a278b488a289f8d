"""Tracking, progress, the rebuilt Optuna study and the sample corpus's grammar (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_mtup import corpus, progress, reporting, sample_corpus, study, tracking
from ray_mtup.config import SAMPLE_DATA_DIR, TrainConfig
from ray_mtup.errors import ConfigError
from ray_mtup.search import ParamSpec, SearchSettings, SearchSpace


def test_unknown_tracker_and_wandb_without_key_are_config_errors(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="tracker.*unknown tracker 'neptune'"):
        tracking.check_tracker("neptune")
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        SearchSettings(name="x", storage_path="runs", tracker="wandb")


def test_tracker_callbacks_are_rays_own(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    (mlflow_cb,) = tracking.tracker_callbacks("mlflow", tmp_path, "exp")
    assert isinstance(mlflow_cb, MLflowLoggerCallback)
    assert mlflow_cb.tracking_uri == (tmp_path / "mlruns").resolve().as_uri()
    assert mlflow_cb.experiment_name == "exp"
    assert isinstance(tracking.tracker_callbacks("tensorboard", tmp_path, "exp")[0], TBXLoggerCallback)
    assert tracking.tracker_callbacks("none", tmp_path, "exp") == []


class _Trial:
    def __init__(self, trial_id: str, epochs: int):
        self.trial_id, self.config = trial_id, {"epochs": epochs}


def test_epoch_progress_one_line_per_epoch_with_best_so_far():
    watcher = progress.EpochProgress(planned_epochs=3)
    a, b = _Trial("a1", 3), _Trial("b2", 2)
    for trial, epoch, f1 in [(a, 1, 0.2), (b, 1, 0.5), (a, 2, 0.3)]:
        watcher.on_trial_result(epoch, [a, b], trial, {"epoch": epoch, "task2_f1": f1})
    watcher.on_trial_result(3, [a, b], a, {"time_total_s": 1.0})  # not an epoch result: ignored
    assert watcher.lines == ["trial a1 epoch 1/3 task2_f1 0.2000 (best so far 0.2000)",
                              "trial b2 epoch 1/2 task2_f1 0.5000 (best so far 0.5000)",
                              "trial a1 epoch 2/3 task2_f1 0.3000 (best so far 0.5000)"]


def _record(trial_id: str, index: int, lr: float, r: int, f1s: list[float], epochs: int = 3):
    cfg = TrainConfig(learning_rate=lr, epochs=epochs)
    history = [{"epoch": e, "task2_f1": f, "objective": f - 1e-4, "val_loss": 1.0} for e, f in enumerate(f1s, 1)]
    return reporting.TrialRecord(trial_id, index, {"learning_rate": lr, "lora_r": r}, cfg, history,
                                 "TERMINATED", "", 10.0)


SPACE = SearchSpace("smoke.yaml", {"learning_rate": ParamSpec("learning_rate", "loguniform", 1e-4, 1e-2),
                                   "lora_r": ParamSpec("lora_r", "choice", values=(8, 16))})


def test_rebuilt_study_holds_every_scored_trial():
    diverged = reporting.TrialRecord("d", 4, {"learning_rate": 1e-2, "lora_r": 8}, TrainConfig(),
                                     [{"epoch": 1, "task2_f1": 0.0, "objective": -1.0}], "TERMINATED", "", 1.0)
    records = [_record("a", 1, 1e-3, 8, [0.1, 0.3, 0.4]), _record("b", 2, 3e-4, 16, [0.05]), diverged]
    s = study.rebuild_study(records, SPACE)
    assert [t.user_attrs["trial_id"] for t in s.trials] == ["a", "b"]
    assert s.best_trial.params == {"learning_rate": 1e-3, "lora_r": 8}
    assert s.trials[0].intermediate_values == {1: 0.1, 2: 0.3, 3: 0.4}


def test_study_plots_written_and_importances_skipped_with_one_trial(tmp_path, caplog):
    records = [_record("a", 1, 1e-3, 8, [0.1, 0.3]), _record("b", 2, 3e-4, 16, [0.05]),
               _record("c", 3, 5e-3, 8, [0.2, 0.25])]
    paths = study.write_study_plots(records, SPACE, tmp_path)
    assert sorted(Path(p).name for p in paths) == sorted(study.STUDY_PLOTS)
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
    one = tmp_path / "one"
    one.mkdir()
    with caplog.at_level("INFO", logger="ray_mtup.study"):
        paths = study.write_study_plots(records[:1], SPACE, one)
    assert sorted(Path(p).name for p in paths) == ["optuna_history.png", "optuna_slice.png"]
    assert "need >= 2 complete trials" in caplog.text


def test_f1_plot_with_asha_marker_and_baseline(tmp_path):
    stopped = _record("s", 2, 3e-4, 16, [0.05], epochs=3)  # 1 of 3 epochs, no error: stopped by ASHA
    assert stopped.stopped_early
    paths = reporting.plot([_record("a", 1, 1e-3, 8, [0.1, 0.3, 0.4]), stopped], tmp_path, baseline_f1=0.12)
    assert [Path(p).name for p in paths] == ["f1_per_epoch.png", "f1_vs_lr.png"]


def test_shipped_sample_file_is_hand_written_head_plus_the_grammar():
    examples = corpus.read_amr_file(SAMPLE_DATA_DIR / "train_amr_1.txt")
    generated = sample_corpus.grammar_pairs()
    assert len(examples) == sample_corpus.HANDWRITTEN_BLOCKS + len(generated)
    tail = examples[sample_corpus.HANDWRITTEN_BLOCKS:]
    assert [(e.sentence, e.amr) for e in tail] == generated


def test_baseline_is_the_most_frequent_training_graph_scored_on_the_eval_subset():
    cfg = TrainConfig(eval_max_samples=12)
    base = reporting.most_frequent_graph_baseline(cfg)
    assert base["n_sentences"] == 12 and base["train_count"] >= 1
    assert 0.0 < base["task2_f1"] < 0.5  # a constant answer fits few of the varied structures
