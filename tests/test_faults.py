"""Faults during training and during a search: no trial lost, no silent error.

Each fault is tested at the layer that shows it:

* the loop in this process (``run_loop``: :func:`ray_mtup.training.train_loop` under a
  :class:`~ray_mtup.session.TorchrunSession`, one worker, seconds), with the fault injected
  through ``TrainConfig.inject_fault``:

  - a NaN loss -> the run stops with "non-finite loss" and no adapter; ``run_single`` then
    fails naming the reason, and a search whose trials all diverged exits 1 without a best;
  - out of memory at a given micro-batch -> the run ends with that reason, and a restart does
    not run it again;
  - a full disk while a checkpoint is written -> the run ends with that reason, its previous
    checkpoint intact, nothing half-written left;
  - the latest checkpoint damaged (adapter truncated) before a worker dies -> the restarted loop
    falls back to the previous complete checkpoint and says so (``resume_note``);

* Ray Train (2 workers, ZeRO-3): a worker killed mid-run -> Ray Train restarts the worker group
  from the last checkpoint with the adapter it saved; every epoch reported once;
* Tune (``python run_tune.py`` on the session's Ray cluster): a search in which every trial
  stops with a reason (out of memory) finishes, and ``--resume`` does not run them again; the
  driver SIGKILLed mid-search (the plain command, with its own embedded Ray, killed with it) ->
  ``--resume --name`` finishes the search; finished trials are not run again;
* an unwritable storage path -> exit 2 naming storage_path, before Ray starts.

The reporting of a diverged search is also checked without Ray, on a stand-in for Tune's ResultGrid.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import session_processes

from ray_mtup.checkpointing import validate_checkpoint
from ray_mtup.search import SearchSpace

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # generous: other jobs share the 2 cores

# Fixed 3 epochs, no early stopping (grace period == max epochs), tiny trials: every trial
# reaches the epoch where the fault is injected.
NO_STOPPING_SPACE = """\
# Fault tests: every trial runs all 3 epochs.
num_samples: 2
grace_period: 3
reduction_factor: 2
seed: 0
params:
  learning_rate: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
  lora_r: {type: choice, values: [8, 16]}
  epochs: {type: choice, values: [3]}
overrides:
  tiny: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, vocab_size: 1000}
  per_device_batch_size: 8
  global_batch_size: 8
  max_new_tokens: 24
  eval_max_samples: 4
  cpus_per_worker: 0.95
"""


def _env() -> dict[str, str]:
    """The environment of a ``run_tune.py`` subprocess: this one's, so with the session cluster's
    ``RAY_ADDRESS`` (the ``ray_cluster`` fixture), without a storage default."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_MTUP_STORAGE"}
    env["RAY_DEDUP_LOGS"] = "0"  # every worker's log line reaches the driver's output
    return env


def _own_ray_env() -> dict[str, str]:
    """As :func:`_env`, but without the session cluster: ``run_tune.py`` starts its embedded Ray."""
    return {k: v for k, v in _env().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}


def run_tune(*args: str, timeout: int = TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run_tune.py", "--model", "tiny", *args], cwd=REPO,
                          env=env if env is not None else _env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _tail(proc: subprocess.CompletedProcess | str, n: int = 4000) -> str:
    text = proc if isinstance(proc, str) else proc.stdout + "\n--- stderr ---\n" + proc.stderr
    return text[-n:]


def read_results(exp: Path) -> list[dict[str, str]]:
    with (exp / "results.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def trial_dirs(exp: Path) -> dict[str, Path]:
    """trial id -> Tune's trial directory (``trial_function_<id>_<n>_<params>_<time>``)."""
    return {p.name.split("_")[2]: p for p in exp.glob("trial_function_*") if p.is_dir()}


def reported(trial_dir: Path) -> list[dict]:
    """Every result Tune recorded for a trial, in order (result.json is one JSON per line)."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest_state(exp: Path, trial_id: str) -> dict:
    """trainer_state.json of the trial's newest checkpoint."""
    ckpts = [p for p in (exp / "train_runs" / f"train_{trial_id}").glob("checkpoint_*") if p.is_dir()]
    assert ckpts, f"trial {trial_id} has no checkpoint"
    newest = max(ckpts, key=lambda p: json.loads((p / "trainer_state.json").read_text())["epoch"])
    return json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))


def check_consistent(exp: Path, n_trials: int) -> list[dict[str, str]]:
    """results.csv has every trial, all TERMINATED; summary.json's best is one of them."""
    rows = read_results(exp)
    assert len(rows) == n_trials, rows
    assert len({r["trial_id"] for r in rows}) == n_trials
    assert {r["status"] for r in rows} == {"TERMINATED"}, [(r["trial_id"], r["status"], r["stop_reason"]) for r in rows]
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_trials"] == n_trials and summary["n_errors"] == 0
    if summary.get("best_trial") is not None:
        assert summary["best_trial"] in {r["trial_id"] for r in rows}
    assert set(trial_dirs(exp)) == {r["trial_id"] for r in rows}
    return rows


# --- faults of the loop, in this process --------------------------------------------------------

#: A small tiny-model run on the shipped sample corpus: the loop's faults show in seconds.
LOOP = {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 1000},
        "max_samples": 60, "per_device_batch_size": 8, "global_batch_size": 8, "max_new_tokens": 24,
        "eval_max_samples": 4, "learning_rate": 1e-3, "lora.r": 8, "num_workers": 1}


def loop_cfg(**overrides):
    from ray_mtup.config import resolve_config

    return resolve_config("tiny", overrides={**LOOP, **overrides})


def _steps_increase(history: list[dict]) -> bool:
    steps = [m["global_step"] for m in history]
    return steps == sorted(set(steps))


def test_nan_loss_stops_the_run_with_reason_and_no_adapter(run_loop, tmp_path, monkeypatch):
    from ray.train import Checkpoint

    from ray_mtup import trial
    from ray_mtup.errors import TrainingError

    run = run_loop(loop_cfg(epochs=2, inject_fault="nan_loss@1"), tmp_path / "run")
    (epoch,) = run.reported  # the run stopped after epoch 1: epoch 2 never ran
    assert epoch["epoch"] == 1 and "non-finite loss at epoch 1" in epoch["stop_reason"], epoch
    assert (epoch["task2_f1"], epoch["validity"], epoch["objective"]) == (0.0, 0.0, -1.0)
    (checkpoint,) = run.checkpoints
    assert not (checkpoint / "adapter_model.safetensors").exists()  # the weights are unusable: none kept
    assert run.state()["stop_reason"] == epoch["stop_reason"]
    # the single run (Ray Train's result of it, here that checkpoint) fails, naming the reason
    result = SimpleNamespace(checkpoint=Checkpoint.from_directory(str(checkpoint)), error=None, metrics=epoch,
                             best_checkpoints=[(Checkpoint.from_directory(str(checkpoint)), epoch)])
    monkeypatch.setattr(trial, "build_trainer", lambda *a, **k: SimpleNamespace(fit=lambda: result))
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1"):
        trial.run_single(loop_cfg(), name="nan", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "out")


def test_search_whose_trials_all_diverged_exits_1_without_a_best(tmp_path, monkeypatch, capsys):
    """What ``run_tune.py`` says when every trial stopped on a NaN loss (the reporting of Tune's
    results, on a stand-in ResultGrid: see test_all_diverged_search_has_no_best)."""
    from ray_mtup import launcher, search
    from ray_mtup.reporting import write_search_results

    def diverged_search(cfg, space, settings):
        grid = [_fake_result("aaaa1111", 1, [NAN_EPOCH]), _fake_result("bbbb2222", 2, [NAN_EPOCH])]
        return write_search_results(grid, cfg, str(tmp_path / "nan"), space)

    monkeypatch.setattr(launcher, "start_ray", lambda address: None)
    monkeypatch.setattr(search, "run_search", diverged_search)
    code = launcher.main(["--model", "tiny", "--smoke-test", "--num-samples", "2", "--storage-path", str(tmp_path),
                          "--name", "nan", "--set", "inject_fault=nan_loss@1"])
    assert code == 1
    assert "no trial produced a usable result" in capsys.readouterr().err
    rows = read_results(tmp_path / "nan")
    assert [r["stopped_early"] for r in rows] == ["False", "False"] and {r["epochs_run"] for r in rows} == {"1"}
    assert not (tmp_path / "nan" / "best_config.yaml").exists()


def test_out_of_memory_ends_the_run_and_a_restart_does_not_retry_it(run_loop, tmp_path, caplog):
    from ray_mtup.outputs import best_epoch

    cfg = loop_cfg(epochs=2, inject_fault="oom@2:1")
    with caplog.at_level(logging.INFO):
        run = run_loop(cfg, tmp_path / "run")
    reason = "out of memory at micro-batch 1 of epoch 2"
    history = run.reported
    assert [m["epoch"] for m in history] == [1, 2] and [m["stop_reason"] for m in history] == ["", reason]
    assert best_epoch(history) == 1
    assert "inject_fault: out of memory" in caplog.text
    assert [validate_checkpoint(p)["epoch"] for p in run.checkpoints] == [1, 2]  # epoch 2: its state only
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_loop(cfg, tmp_path / "run")  # a restart (Ray Train's, or --resume's) finds the stop recorded
    assert "not resuming: the run stopped after epoch 2: " + reason in caplog.text
    assert "inject_fault: out of memory" not in caplog.text
    assert run.reported == history


def test_full_disk_ends_the_run_and_keeps_the_previous_checkpoint(run_loop, tmp_path, monkeypatch):
    from ray_mtup.outputs import best_epoch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the loop stages a checkpoint
    (tmp_path / "tmp").mkdir()
    run = run_loop(loop_cfg(epochs=2, inject_fault="disk_full@2"), tmp_path / "run")
    history = run.reported
    assert [m["epoch"] for m in history] == [1, 2]
    reason = history[-1]["stop_reason"]
    assert reason.startswith("disk full while writing the epoch-2 checkpoint") and "No space left on device" in reason
    assert best_epoch(history) == 1
    states = [validate_checkpoint(p) for p in run.checkpoints]  # each one complete and readable
    assert [s["epoch"] for s in states] == [1], states
    assert not [p for p in tmp_path.rglob("*.partial-*")], "a half-written checkpoint was left behind"


def test_damaged_checkpoint_falls_back_to_the_previous_one(run_loop, tmp_path, monkeypatch, caplog):
    """In epoch 3 the worker truncates the stored epoch-2 adapter and dies; the restarted loop
    finds its latest checkpoint damaged and resumes from epoch 1, saying so."""
    from ray_mtup import faults
    from ray_mtup.outputs import best_epoch

    class WorkerDied(Exception):
        pass

    def die(code):
        raise WorkerDied(code)

    monkeypatch.setattr(faults.os, "_exit", die)  # the process would end here; this test's process goes on
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0")  # no Ray Train poll to wait for
    cfg = loop_cfg(epochs=3, inject_fault="corrupt_adapter@3")
    with caplog.at_level(logging.INFO), pytest.raises(WorkerDied):
        run_loop(cfg, tmp_path / "run")
    assert caplog.text.count("inject_fault: damaged") == 1
    with caplog.at_level(logging.INFO):
        run = run_loop(cfg, tmp_path / "run")
    assert caplog.text.count("inject_fault: damaged") == 1  # once per run
    assert "the latest checkpoint is unusable" in caplog.text
    history = run.reported
    # epoch 2 ran again after the fallback; nothing else did, and the schedule went on
    assert [m["epoch"] for m in history] == [1, 2, 2, 3]
    note = history[2]["resume_note"]
    assert "adapter_model.safetensors" in note and "resumed from the epoch-1 checkpoint" in note, note
    assert history[3]["resume_note"] == "" and all(m["stop_reason"] == "" for m in history)
    state = run.state()
    assert [m["epoch"] for m in state["history"]] == [1, 2, 3] and state["resumed_from_epoch"] == 1
    assert _steps_increase(state["history"]), state["history"]
    # every checkpoint left is complete, the best epoch's among them
    states = {validate_checkpoint(p)["epoch"]: p for p in run.checkpoints}
    assert sorted(states) == [1, 2, 3]
    assert best_epoch(state["history"]) in states


# --- a search in which trials stop with a reason: Tune ---------------------------------------------

# Two epochs, no early stopping: the fault is in the last one.
TWO_EPOCH_SPACE = NO_STOPPING_SPACE.replace("grace_period: 3", "grace_period: 2").replace("values: [3]", "values: [2]")


@pytest.mark.integration
def test_out_of_memory_ends_the_trial_and_resume_does_not_retry_it(ray_cluster, tmp_path):
    """The one search in which trials stop with a reason: the search finishes, the leaderboard
    says why, and ``--resume`` does not run them again (the loop's side: see
    test_out_of_memory_ends_the_run_and_a_restart_does_not_retry_it)."""
    space = tmp_path / "space.yaml"
    space.write_text(TWO_EPOCH_SPACE, encoding="utf-8")
    args = ["--search-space", str(space), "--storage-path", str(tmp_path), "--name", "oom"]
    proc = run_tune(*args, "--set", "inject_fault=oom@2:1")
    exp = tmp_path / "oom"
    assert proc.returncode == 0, _tail(proc)
    reason = "out of memory at micro-batch 1 of epoch 2"
    rows = check_consistent(exp, 2)
    for row in rows:
        assert row["stop_reason"] == reason and (row["epochs_run"], row["best_epoch"]) == ("2", "1"), row
        # the leaderboard printed at the end shows it
        assert [line for line in proc.stdout.splitlines() if line.startswith(row["trial_id"]) and reason in line]
    before = {tid: (d / "result.json").read_text(encoding="utf-8") for tid, d in trial_dirs(exp).items()}
    # --resume restores the finished search: the trials that ended out of memory are not run again
    again = run_tune(*args, "--set", "inject_fault=oom@2:1", "--resume")
    assert again.returncode == 0, _tail(again)
    assert "inject_fault: out of memory" not in again.stdout + again.stderr, _tail(again)
    assert {tid: (d / "result.json").read_text(encoding="utf-8") for tid, d in trial_dirs(exp).items()} == before
    assert [r["stop_reason"] for r in check_consistent(exp, 2)] == [reason, reason]


# --- a worker killed mid-run: Ray Train -------------------------------------------------------------


@pytest.mark.integration
def test_killed_worker_resumes_from_its_checkpoint_with_the_saved_adapter(ray_connected, qwen_like_checkpoint,
                                                                          tmp_path):
    """One of 2 ZeRO-3 ranks dies in epoch 2: Ray Train restarts the worker group, which resumes
    after epoch 1 with the adapter it saved (same digest); every epoch is reported once."""
    from ray_mtup.config import resolve_config
    from ray_mtup.trial import build_trainer, read_checkpoint_state

    cfg = resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(qwen_like_checkpoint), "epochs": 3, "max_samples": 40, "num_workers": 2,
        "per_device_batch_size": 4, "global_batch_size": 8, "learning_rate": 2e-3, "eval_max_samples": 4,
        "max_new_tokens": 16, "zero_stage": 3, "cpus_per_worker": 1.0, "inject_fault": "kill_worker@2"})
    storage = tmp_path / "storage"
    result = build_trainer(cfg, name="kill", storage_path=str(storage), max_failures=1, keep_checkpoints=3).fit()
    assert result.error is None, result.error
    # the fault really happened, once, on the last rank
    assert (storage / "kill" / ".fault_injected").read_text().strip() == "kill_worker"
    state = read_checkpoint_state(result.checkpoint)
    assert [m["epoch"] for m in state["history"]] == [1, 2, 3]  # each epoch once
    assert _steps_increase(state["history"]), state["history"]  # the schedule did not restart
    by_epoch = {}
    for checkpoint, metrics in result.best_checkpoints:  # every reported epoch (3 kept)
        assert int(metrics["epoch"]) not in by_epoch, "an epoch was reported twice"
        by_epoch[int(metrics["epoch"])] = read_checkpoint_state(checkpoint)
    assert sorted(by_epoch) == [1, 2, 3]
    first, resumed = by_epoch[1], by_epoch[2]
    assert first["resumed_from_epoch"] == 0
    assert resumed["resumed_from_epoch"] == 1  # the restarted group started at epoch 2
    assert resumed["resumed_adapter_digest"] == first["adapter_digest"]  # the saved adapter was loaded
    assert state["history"][0] == first["history"][0]  # epoch 1 was not re-run

def _fake_result(trial_id: str, index: int, history: list[dict]) -> SimpleNamespace:
    import pandas as pd

    return SimpleNamespace(config={"learning_rate": 1e-3, "lora_r": 8}, metrics={**history[-1], "trial_id": trial_id},
                           metrics_dataframe=pd.DataFrame(history), error=None,
                           path=f"/x/trial_function_{trial_id}_{index}_lr=0.001_2026")


NAN_EPOCH = {"epoch": 1, "train_loss": float("nan"), "val_loss": float("nan"), "task2_f1": 0.0,
             "task1_f1": 0.0, "validity": 0.0, "objective": -1.0, "stop_reason": "non-finite loss at epoch 1, step 1"}


def test_all_diverged_search_has_no_best(tmp_path):
    from ray_mtup.config import TrainConfig
    from ray_mtup.reporting import write_search_results

    grid = [_fake_result("aaaa1111", 1, [NAN_EPOCH]), _fake_result("bbbb2222", 2, [NAN_EPOCH])]
    summary = write_search_results(grid, TrainConfig(), str(tmp_path), SearchSpace("space.yaml", {}))
    assert (summary["n_trials"], summary["n_errors"], summary.get("best_trial")) == (2, 0, None)
    rows = read_results(tmp_path)
    assert [r["stop_reason"] for r in rows] == ["non-finite loss at epoch 1, step 1"] * 2
    assert {r["status"] for r in rows} == {"TERMINATED"}
    assert not (tmp_path / "best_config.yaml").exists()


def test_diverged_trial_is_not_the_best(tmp_path):
    from ray_mtup.config import TrainConfig
    from ray_mtup.reporting import write_search_results

    ok = {**NAN_EPOCH, "train_loss": 6.9, "val_loss": 7.0, "objective": -0.0007, "stop_reason": ""}
    grid = [_fake_result("aaaa1111", 1, [NAN_EPOCH]), _fake_result("bbbb2222", 2, [ok, {**NAN_EPOCH, "epoch": 2}])]
    summary = write_search_results(grid, TrainConfig(), str(tmp_path), SearchSpace("space.yaml", {}))
    # the second trial diverged in epoch 2, but its epoch 1 is usable
    assert summary["best_trial"] == "bbbb2222" and summary["best_metrics"]["epoch"] == 1


def test_leaderboard_uses_tunes_trial_ids_creation_order_and_the_objective(tmp_path, capsys):
    from ray_mtup.config import TrainConfig
    from ray_mtup.reporting import write_search_results

    tied = {"epoch": 1, "train_loss": 1.0, "task2_f1": 0.5, "task1_f1": 0.5, "validity": 1.0, "stop_reason": ""}
    first = {**tied, "val_loss": 2.0, "objective": 0.5 - 2e-4}
    second = {**tied, "val_loss": 1.0, "objective": 0.5 - 1e-4}  # same F1, lower loss: the better one
    grid = [_fake_result("first111", 1, [first]), _fake_result("second22", 2, [second])]
    for result in grid:
        result.path = "/x/a_directory_name_tune_may_change"
    summary = write_search_results(grid, TrainConfig(), str(tmp_path), SearchSpace("space.yaml", {}))
    rows = read_results(tmp_path)
    assert [(r["trial_id"], r["trial_index"]) for r in rows] == [("first111", "1"), ("second22", "2")]
    assert summary["best_trial"] == "second22" and summary["documented_optimum_trial"] == "first111"
    board = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("first", "second"))]
    assert board == ["second22", "first111"]  # best first, by the objective


# --- unwritable storage ------------------------------------------------------------------------


@pytest.mark.integration
def test_unwritable_storage_fails_fast(tmp_path):
    (tmp_path / "a_file").write_text("not a directory\n")
    storage = tmp_path / "a_file" / "runs"
    t0 = time.monotonic()
    proc = run_tune("--smoke-test", "--storage-path", str(storage), timeout=300)
    assert proc.returncode == 2, _tail(proc)
    assert proc.stderr.startswith("error: storage_path: ") and str(storage) in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert "Connecting to existing Ray cluster" not in proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 120


# --- the driver killed mid-search --------------------------------------------------------------


def _finished_trials(exp: Path) -> dict[str, list[dict]]:
    return {tid: res for tid, d in trial_dirs(exp).items() if (res := reported(d)) and res[-1].get("done")}


def _recorded_terminated(exp: Path) -> set[str]:
    """Trials that Tune's saved experiment state (what ``--resume`` reads) records as TERMINATED."""
    done = set()
    for path in exp.glob("experiment_state-*.json"):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["trial_data"]
        except (OSError, ValueError, KeyError):  # being rewritten
            continue
        for entry in entries:
            try:
                state = json.loads(entry[0])
            except (ValueError, TypeError, IndexError):
                continue
            if state.get("status") == "TERMINATED":
                done.add(state.get("trial_id"))
    return done


def _snapshot(exp: Path, tid: str) -> dict:
    run = exp / "train_runs" / f"train_{tid}"
    return {
        "results": (trial_dirs(exp)[tid] / "result.json").read_text(encoding="utf-8"),
        "checkpoints": {p.name: p.stat().st_mtime_ns for p in run.glob("checkpoint_*") if p.is_dir()},
    }


@pytest.mark.integration
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    """The user's plain command: ``run_tune.py`` with its own embedded Ray (no ``RAY_ADDRESS``), killed
    with everything it started, then ``--resume``. This test keeps its own Ray on purpose: what it
    checks is that the embedded Ray dies with the driver's session and that the search resumes."""
    space = tmp_path / "space.yaml"
    space.write_text(NO_STOPPING_SPACE.replace("num_samples: 2", "num_samples: 4"), encoding="utf-8")
    args = ["--search-space", str(space), "--storage-path", str(tmp_path), "--name", "drv"]
    exp = tmp_path / "drv"
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen([sys.executable, "run_tune.py", "--model", "tiny", *args], cwd=REPO, env=_own_ray_env(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sid = driver.pid
    try:
        deadline = time.monotonic() + TIMEOUT_S
        finished: dict[str, list[dict]] = {}
        while time.monotonic() < deadline and driver.poll() is None:
            finished = _finished_trials(exp) if exp.is_dir() else {}
            if finished:
                break
            time.sleep(1)
        assert finished, f"no trial finished before the kill (driver rc {driver.poll()}):\n" + _tail(
            (tmp_path / "first.log").read_text())
        # wait until Tune's saved experiment state records a finished trial as TERMINATED
        while time.monotonic() < deadline and driver.poll() is None and not (_recorded_terminated(exp) & set(finished)):
            time.sleep(0.5)
        assert _recorded_terminated(exp) & set(finished), _tail((tmp_path / "first.log").read_text())
        os.killpg(sid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        log.close()
        # the embedded Ray (GCS, raylet, workers) lives in the driver's session: nothing may survive it
        deadline = time.monotonic() + 60
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(1)
        left = session_processes(sid)
        for pid in left:  # our own processes only: clean up before failing
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"processes of the killed driver's session survived: {left}"
    assert not (exp / "results.csv").exists(), "the first run must have been interrupted"

    finished = _finished_trials(exp)
    before = {tid: _snapshot(exp, tid) for tid in finished}
    assert before and all(len(s["checkpoints"]) >= 1 for s in before.values())

    proc = run_tune(*args, "--resume", env=_own_ray_env())
    assert proc.returncode == 0, _tail(proc)
    rows = check_consistent(exp, 4)
    for tid, snap in before.items():
        assert _snapshot(exp, tid) == snap, f"finished trial {tid} was run again"
    for row in rows:
        tid = row["trial_id"]
        assert row["epochs_run"] == "3", row
        epochs = [m["epoch"] for m in latest_state(exp, tid)["history"]]
        assert epochs == [1, 2, 3], f"trial {tid}: checkpoint history {epochs}"
        reported_epochs = [r["epoch"] for r in reported(trial_dirs(exp)[tid])]
        assert sorted(set(reported_epochs)) == [1, 2, 3], f"trial {tid} reported {reported_epochs}"
