"""Faults during a search: no trial lost, no silent error.

Each test runs ``python run_tune.py`` as a subprocess (its own embedded Ray, storage under
``tmp_path``) with a fault injected through ``TrainConfig.inject_fault`` or from outside:

* a training worker killed mid-trial -> Ray Train restarts the worker group from the last
  checkpoint; the trial's history goes on (no epoch run twice, none missing);
* the driver SIGKILLed mid-search -> ``--resume --name`` finishes the search; trials that had
  finished are not run again;
* a NaN loss -> the trial stops with "non-finite loss" in results.csv, the search goes on;
* the stored latest checkpoint damaged (adapter truncated) before a worker dies -> the restarted
  workers fall back to the previous complete checkpoint and say so (``resume_note``);
* a full disk while a checkpoint is written -> the trial ends with that reason, its previous
  checkpoint intact, and the search goes on;
* out of memory at a given micro-batch -> the trial ends with that reason, and ``--resume``
  does not run it again;
* an unwritable storage path -> exit 2 naming storage_path, before Ray starts.

Those are slow (minutes on 2 CPU cores) and marked ``integration``; the reporting of a
diverged search is also checked without Ray, on a stand-in for Tune's ResultGrid.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

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
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_MTUP_STORAGE")}
    env["RAY_DEDUP_LOGS"] = "0"  # every worker's log line reaches the driver's output
    return env


def run_tune(*args: str, timeout: int = TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run_tune.py", "--model", "tiny", *args], cwd=REPO,
                          env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
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


# --- a worker killed mid-trial -----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("workers", [2, 1])
def test_killed_worker_resumes_from_checkpoint(tmp_path, workers):
    space = tmp_path / "space.yaml"
    space.write_text(NO_STOPPING_SPACE, encoding="utf-8")
    # Ray Train's controller collects a worker's report (and registers its checkpoint) when it
    # polls the workers, every 2 s by default; a worker killed before that poll loses the report
    # and the restarted group re-runs the epoch. A tiny epoch ends well within 2 s, so poll every
    # 0.1 s and give the model steps slower than that: the kill then follows a registered checkpoint,
    # as it would after a real (minutes-long) epoch.
    proc = run_tune("--search-space", str(space), "--storage-path", str(tmp_path), "--name", "kill",
                    "--workers-per-trial", str(workers), "--set", f"global_batch_size={8 * workers}",
                    "--set", "inject_fault=kill_worker@2",
                    "--set", "tiny.hidden_size=256", "--set", "tiny.intermediate_size=688",
                    env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})
    exp = tmp_path / "kill"
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout + proc.stderr
    # the fault really happened, once per trial, on the last rank, in epoch 2
    assert out.count(f"inject_fault: killing rank {workers - 1} in epoch 2") == 2, _tail(proc)
    rows = check_consistent(exp, 2)
    for row in rows:
        assert row["epochs_run"] == "3" and row["stop_reason"] == "", row
        tid = row["trial_id"]
        epochs = [r["epoch"] for r in reported(trial_dirs(exp)[tid])]
        assert epochs == [1, 2, 3], f"trial {tid} reported epochs {epochs}"  # epoch 2 once, epoch 1 not re-run
        state = latest_state(exp, tid)
        assert [m["epoch"] for m in state["history"]] == [1, 2, 3]
        steps = [m["global_step"] for m in state["history"]]
        assert steps == sorted(set(steps)), f"trial {tid}: steps {steps} (schedule restarted?)"
        if "resumed_from_epoch" in state:  # recorded by training.py since the resume bookkeeping
            assert state["resumed_from_epoch"] == 1
    # the restarted worker group started at epoch 2, from the epoch-1 checkpoint
    assert out.count("epochs 2..3") >= 2, _tail(proc)


# --- a damaged checkpoint, a full disk, an out-of-memory trial ---------------------------------

# Two epochs, no early stopping: the fault is in the last one.
TWO_EPOCH_SPACE = NO_STOPPING_SPACE.replace("grace_period: 3", "grace_period: 2").replace("values: [3]", "values: [2]")


def checkpoint_states(exp: Path, trial_id: str, skip: Path | None = None) -> dict[Path, dict]:
    """Every stored checkpoint of a trial (but ``skip``) -> its validated trainer state (raises if one is damaged)."""
    run = exp / "train_runs" / f"train_{trial_id}"
    return {p: validate_checkpoint(p) for p in sorted(run.glob("checkpoint_*")) if p.is_dir() and p != skip}


@pytest.mark.integration
def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(NO_STOPPING_SPACE, encoding="utf-8")
    # In epoch 3 the last rank truncates the stored epoch-2 adapter, then dies: the restarted
    # workers find Ray Train's latest checkpoint damaged and must resume from epoch 1.
    # (Poll interval and model size as in the kill test: the kill follows a registered checkpoint.)
    proc = run_tune("--search-space", str(space), "--storage-path", str(tmp_path), "--name", "corrupt",
                    "--set", "inject_fault=corrupt_adapter@3",
                    "--set", "tiny.hidden_size=256", "--set", "tiny.intermediate_size=688",
                    env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})
    exp = tmp_path / "corrupt"
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout + proc.stderr
    assert out.count("inject_fault: damaged") == 2, _tail(proc)
    assert out.count("the latest checkpoint is unusable") >= 2, _tail(proc)
    rows = check_consistent(exp, 2)
    for row in rows:
        tid = row["trial_id"]
        assert row["epochs_run"] == "3" and row["stop_reason"] == "", row
        assert "adapter_model.safetensors" in row["resume_note"], row
        assert "resumed from the epoch-1 checkpoint" in row["resume_note"], row
        # epoch 2 ran again after the fallback; nothing else did, and the schedule went on
        assert [r["epoch"] for r in reported(trial_dirs(exp)[tid])] == [1, 2, 2, 3]
        state = latest_state(exp, tid)
        assert [m["epoch"] for m in state["history"]] == [1, 2, 3] and state["resumed_from_epoch"] == 1
        steps = [m["global_step"] for m in state["history"]]
        assert steps == sorted(set(steps)), f"trial {tid}: steps {steps}"
        # every checkpoint left is complete but the damaged one (Ray Train may still keep it among
        # the best), and the best epoch's checkpoint is a complete one
        damaged = Path(row["resume_note"].split("(", 1)[1].split(": ", 1)[0]).parent
        assert checkpoint_states(exp, tid, skip=damaged)
        assert Path(row["checkpoint_path"]) != damaged
        validate_checkpoint(row["checkpoint_path"])


@pytest.mark.integration
def test_full_disk_ends_the_trial_and_keeps_the_previous_checkpoint(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TWO_EPOCH_SPACE.replace("num_samples: 2", "num_samples: 3"), encoding="utf-8")
    proc = run_tune("--search-space", str(space), "--storage-path", str(tmp_path), "--name", "full",
                    "--set", "inject_fault=disk_full@2")
    exp = tmp_path / "full"
    assert proc.returncode == 0, _tail(proc)  # epoch 1 of every trial is usable
    rows = check_consistent(exp, 3)  # the third trial ran after the first two ended: the search went on
    for row in rows:
        assert row["stop_reason"].startswith("disk full while writing the epoch-2 checkpoint"), row
        assert "No space left on device" in row["stop_reason"], row
        assert (row["epochs_run"], row["best_epoch"]) == ("2", "1"), row
        states = checkpoint_states(exp, row["trial_id"])  # each one complete and readable
        assert [s["epoch"] for s in states.values()] == [1], states
    assert not [p for p in exp.rglob("*.partial-*")], "a half-written checkpoint was left behind"
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    assert summary["best_trial"] in {r["trial_id"] for r in rows} and summary["best_metrics"]["epoch"] == 1


@pytest.mark.integration
def test_out_of_memory_ends_the_trial_and_resume_does_not_retry_it(tmp_path):
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


# --- a NaN loss --------------------------------------------------------------------------------


@pytest.mark.integration
def test_nan_loss_stops_trial_with_reason(tmp_path):
    proc = run_tune("--smoke-test", "--num-samples", "2", "--storage-path", str(tmp_path), "--name", "nan",
                    "--set", "inject_fault=nan_loss@1")
    exp = tmp_path / "nan"
    # Every trial diverged: no trial is an error (each ended cleanly, with its reason), but the
    # search has no usable result, so the command fails (exit 1) and names no best trial.
    assert proc.returncode == 1, _tail(proc)
    assert "no trial produced a usable result" in proc.stderr
    rows = check_consistent(exp, 2)
    for row in rows:
        assert "non-finite loss at epoch 1" in row["stop_reason"], row
        assert row["epochs_run"] == "1" and row["stopped_early"] == "False"
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    assert summary.get("best_trial") is None
    assert not (exp / "best_config.yaml").exists()


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
    assert time.monotonic() - t0 < 120


# --- the driver killed mid-search --------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the driver and the embedded Ray it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3]: session id; fields[0]: state
            pids.append(int(stat.parent.name))
    return pids


def _finished_trials(exp: Path) -> dict[str, list[dict]]:
    return {tid: res for tid, d in trial_dirs(exp).items() if (res := reported(d)) and res[-1].get("done")}


def _snapshot(exp: Path, tid: str) -> dict:
    run = exp / "train_runs" / f"train_{tid}"
    return {
        "results": (trial_dirs(exp)[tid] / "result.json").read_text(encoding="utf-8"),
        "checkpoints": {p.name: p.stat().st_mtime_ns for p in run.glob("checkpoint_*") if p.is_dir()},
    }


@pytest.mark.integration
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(NO_STOPPING_SPACE.replace("num_samples: 2", "num_samples: 4"), encoding="utf-8")
    args = ["--search-space", str(space), "--storage-path", str(tmp_path), "--name", "drv"]
    exp = tmp_path / "drv"
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen([sys.executable, "run_tune.py", "--model", "tiny", *args], cwd=REPO, env=_env(),
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
        time.sleep(3)  # let Tune record the trial as TERMINATED in its experiment state
        os.killpg(sid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        log.close()
        # the embedded Ray (GCS, raylet, workers) lives in the driver's session: nothing may survive it
        deadline = time.monotonic() + 60
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(1)
        left = _session_pids(sid)
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

    proc = run_tune(*args, "--resume")
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
