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
    assert isinstance(mlflow_cb, MLflowLoggerCallback)  # Ray's, logging each result as one batch
    assert mlflow_cb.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert mlflow_cb.experiment_name == "exp"
    assert isinstance(tracking.tracker_callbacks("tensorboard", tmp_path, "exp")[0], TBXLoggerCallback)
    assert tracking.tracker_callbacks("none", tmp_path, "exp") == []


def test_mlflow_store_is_sqlite_in_the_experiment_directory(tmp_path, monkeypatch):
    """MLflow's client opens the store as it is (no MLFLOW_ALLOW_FILE_STORE); the database and the
    artifact root are inside the experiment directory, nothing lands in the current one."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "exp"
    (callback,) = tracking.tracker_callbacks("mlflow", exp, "smoke")
    client = MlflowClient(tracking_uri=tracking.mlflow_uri(exp))
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.artifact_location == (exp / "mlartifacts").resolve().as_uri()
    # the callback as Tune drives it: one run per trial, every number of a result at its epoch
    trial = _Trial("a1", 3)
    callback.setup()
    callback.log_trial_start(trial)
    for epoch, f1 in [(1, 0.25), (2, 0.5)]:
        callback.log_trial_result(epoch, trial, {"training_iteration": epoch, "task2_f1": f1, "packing": False,
                                                 "eval_generation": "plain", "batch": {"world_size": 1}})
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["epochs"] == "3"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "task2_f1")] == [(1, 0.25), (2, 0.5)]
    assert run.data.metrics["batch/world_size"] == 1.0 and "eval_generation" not in run.data.metrics
    tracking.tracker_callbacks("mlflow", exp, "smoke")  # a resumed search finds its experiment
    assert client.get_experiment_by_name("smoke").experiment_id == experiment.experiment_id
    assert [p.name for p in tmp_path.iterdir()] == ["exp"] and (exp / "mlflow.db").is_file()
    assert tracking.tracker_location("mlflow", exp) == f"mlflow ui --backend-store-uri {tracking.mlflow_uri(exp)}"


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
    with caplog.at_level("INFO"):
        paths = study.write_study_plots(records, SPACE, tmp_path)
    assert "categorical units" not in caplog.text  # matplotlib's note on Optuna's choice axes stays quiet
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


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trial_progress_one_line_per_ended_trial_with_best_and_time_left():
    clock = _Clock()
    watcher = progress.TrialProgress(num_samples=4, clock=clock)
    watcher.setup(num_samples=4)
    a, b, c = _Trial("a1", 3), _Trial("b2", 3), _Trial("c3", 3)
    watcher.on_trial_result(1, [a, b], a, {"epoch": 1, "task2_f1": 0.25})
    watcher.on_trial_result(1, [a, b], b, {"epoch": 1, "task2_f1": 0.4})
    clock.now += 600  # the first trial ends 10 min in: 3 more at that pace
    watcher.on_trial_complete(2, [a, b], a)
    watcher.on_trial_result(3, [b, c], c, {"epoch": 1, "task2_f1": float("nan")})  # not a best
    clock.now += 600
    watcher.on_trial_error(4, [b, c], c)
    assert watcher.lines == [
        "trial a1 finished: 1 of 4 trials done; best task2_f1 so far 0.4000; about 30 min left at the current pace",
        "trial c3 failed: 2 of 4 trials done; best task2_f1 so far 0.4000; about 20 min left at the current pace"]


def test_single_run_is_one_mlflow_run_with_its_config_epochs_and_test_figure(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the SQLite store needs no setting
    cfg = TrainConfig(epochs=2, learning_rate=3e-4)
    history = [{"epoch": 1, "task2_f1": 0.1, "val_loss": 2.0, "scoring_mode": "normalised"},
               {"epoch": 2, "task2_f1": 0.3, "val_loss": 1.5, "stop_reason": ""}]
    test = {"task2_f1": 0.25, "ci95": [0.2, 0.3], "validity": 0.9, "submitted": {"task2_f1": 0.27}}
    tracking.record_single_run("mlflow", tmp_path, "single", cfg.to_dict(), history, test)
    client = MlflowClient(tracking_uri=tracking.mlflow_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert run.info.run_name == "single" and run.info.status == "FINISHED"
    assert float(run.data.params["learning_rate"]) == 3e-4 and run.data.params["lora.r"] == str(cfg.lora.r)
    steps = [(int(m.step), m.value) for m in client.get_metric_history(run.info.run_id, "task2_f1")]
    assert sorted(steps) == [(1, 0.1), (2, 0.3)]
    assert run.data.metrics["test_task2_f1"] == 0.25 and run.data.metrics["test_submitted_task2_f1"] == 0.27


def test_single_run_tensorboard_and_none(tmp_path):
    history = [{"epoch": 1, "task2_f1": 0.1}]
    tracking.record_single_run("tensorboard", tmp_path / "tb", "single", {"epochs": 1}, history, {})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    tracking.record_single_run("none", tmp_path / "none", "single", {"epochs": 1}, history, {})
    assert not (tmp_path / "none").exists()


def test_closing_summary_names_the_corpus():
    from ray_mtup.holdout import describe_corpus
    from ray_mtup.launcher import closing_note

    summary = {"experiment_dir": "/runs/exp", "plots": []}
    sample = closing_note(summary, "none", describe_corpus(TrainConfig()))
    assert sample.splitlines()[0].startswith("corpus:  the sample corpus")
    assert "say nothing about Vietnamese AMR" in sample
    real = closing_note(summary, "none", describe_corpus(TrainConfig(data_dir="/data/vlsp2025")))
    assert real.splitlines()[0] == "corpus:  /data/vlsp2025" and "Vietnamese AMR" not in real
