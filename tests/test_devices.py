"""Devices: GPUs per trial from the cluster and the memory plan, one device rule, the dry run,
the preflight of the model's files, and errors that are not retried (ray_mtup.devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mtup import launcher
from ray_mtup.config import TrainConfig, resolve_config
from ray_mtup.devices import Cluster, plan_trials
from ray_mtup.errors import ModelError
from ray_mtup.models import MODEL_CONFIGS

REPO = Path(__file__).resolve().parents[1]
H200 = 141e9

#: Qwen2.5-7B-Instruct by its config.json (ray_mtup/model_configs, from the model card): its shape
#: without the hub; a 7.6B model without a documented optimum derives 1e-4 and 15 epochs, as documented.
SEVEN = str(MODEL_CONFIGS / "qwen2.5-7b")


class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    """launcher.start_ray raises: reaching it means every check before Ray passed. The plain command
    on this machine: no RAY_ADDRESS (the suite's shared cluster exports one)."""
    def tripwire(address):
        raise RayStarted(address)

    monkeypatch.setattr(launcher, "start_ray", tripwire)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _main(argv, capsys):
    try:
        code = launcher.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_simulated_4_gpu_node_runs_one_7b_trial_per_gpu_or_spans_gpus_when_they_are_small():
    cfg = resolve_config(SEVEN)
    big = plan_trials(cfg, Cluster(4, H200, num_cpus=64.0, gpu_name="H200"))
    assert (big.device, big.gpus_per_trial, big.concurrent_trials, big.zero_stage) == ("gpu", 1, 4, 2)
    assert big.line().startswith("4 GPUs (H200, 141 GB each): 1 GPU per trial, 4 trials at a time, ZeRO-2")
    small = plan_trials(cfg.replace(gradient_checkpointing=True), Cluster(4, 24e9, num_cpus=64.0))
    assert small.gpus_per_trial > 1 and small.zero_stage == 3 and small.memory_plan.fits
    assert small.concurrent_trials == 4 // small.gpus_per_trial
    # an explicit integer is never changed
    pinned = plan_trials(cfg, Cluster(4, H200, num_cpus=64.0), gpus_per_trial=4)
    assert (pinned.gpus_per_trial, pinned.workers_per_trial, pinned.concurrent_trials) == (4, 4, 1)


def test_a_running_cluster_declaring_4_gpus_is_planned_from_its_resources(monkeypatch):
    # what ray.cluster_resources() says of a node started with num_gpus=4 (Ray accepts it on any host)
    monkeypatch.setattr(launcher, "_cluster_resources",
                        lambda: {"CPU": 16.0, "GPU": 4.0, "memory": 1e11, "accelerator_type:H200": 1.0})
    args = launcher.build_parser().parse_args(["--model", SEVEN, "--device-memory", "141e9"])
    cluster = launcher.cluster_devices(args)
    launch = launcher.plan_launch(args, launcher.config_from_args(args), cluster)
    assert launch.line().startswith("4 GPUs (H200, 141 GB each): 1 GPU per trial, 4 trials at a time, ZeRO-2")
    # the memory unknown and no --device-memory: a one-GPU task reads it
    monkeypatch.setattr(launcher, "probe_gpu_memory", lambda: 24e9)
    args = launcher.build_parser().parse_args(["--model", SEVEN, "--set", "gradient_checkpointing=true"])
    launch = launcher.plan_launch(args, launcher.config_from_args(args), launcher.cluster_devices(args))
    assert launch.gpus_per_trial > 1 and launch.zero_stage == 3


def test_the_trainer_of_the_decision_asks_for_one_gpu_per_worker():
    from ray_mtup.trial import build_trainer

    cfg = resolve_config(SEVEN)
    launch = plan_trials(cfg, Cluster(4, 24e9, num_cpus=64.0), gpus_per_trial=2)
    trainer = build_trainer(cfg.replace(**launch.overrides()), name="t", storage_path="/tmp/unused")
    scaling = trainer.scaling_config
    assert scaling.use_gpu and scaling.num_workers == 2 and scaling.resources_per_worker["GPU"] == 1


def test_dry_run_json_prints_the_plan_without_starting_ray(capsys, no_ray):
    code, out, err = _main(["--model", SEVEN, "--dry-run", "--json", "--num-gpus", "4",
                            "--device-memory", "141e9"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert {k: plan[k] for k in ("device", "gpus_per_trial", "concurrent_trials", "zero_stage")} == {
        "device": "gpu", "gpus_per_trial": 1, "concurrent_trials": 4, "zero_stage": 2}
    assert plan["micro_batch_size"] * plan["grad_accum"] == plan["global_batch_size"] == 16
    assert plan["explain"].startswith("memory plan: ZeRO-2") and plan["config"]["use_gpu"] is True
    code, out, _ = _main(["--model", "tiny", "--smoke-test", "--dry-run", "--num-gpus", "0"], capsys)
    assert code == 0 and out.startswith("CPU (no GPU")


def test_a_real_model_without_a_gpu_exits_2_before_ray_starts(monkeypatch, capsys, no_ray, tmp_path):
    monkeypatch.setattr(launcher, "local_gpus", lambda: Cluster(0, num_cpus=2.0, source="local"))
    code, _, err = _main(["--model", "qwen2.5-7b", "--storage-path", str(tmp_path)], capsys)
    assert code == 2
    assert "no GPU found on this machine" in err and "--device cpu" in err and "--gpus-per-trial N" in err
    assert not list(tmp_path.iterdir())  # nothing written
    # the tiny model runs on the CPU as before: every check passes and Ray is next
    with pytest.raises(RayStarted):
        launcher.main(["--model", "tiny", "--smoke-test", "--storage-path", str(tmp_path)])


def test_without_the_hub_a_real_model_on_the_cpu_exits_2_naming_the_id(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache"),
           "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "run_tune.py"), "--model", "qwen2.5-7b", "--no-search",
                           "--device", "cpu", "--storage-path", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Qwen/Qwen2.5-7B-Instruct" in done.stderr and "--model-path" in done.stderr
    assert "HF_HUB_OFFLINE" in done.stderr and "ray" not in done.stderr.lower().replace("ray_mtup", "")


class RecordingSession:
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint_dir):
        self.reports.append((dict(metrics), checkpoint_dir))

    def run_dir(self):
        return None


def test_a_model_error_in_a_worker_ends_the_run_without_a_retry(tmp_path, monkeypatch):
    from ray_mtup import trial
    from ray_mtup.training import train_loop

    (tmp_path / "weights").mkdir()  # a directory with no config, no tokenizer: fails every time
    cfg = TrainConfig(model="qwen2.5-1.5b", model_path=str(tmp_path / "weights"), max_samples=20)
    session = RecordingSession()
    train_loop(cfg, session)  # returns: Ray Train sees no crashed worker, so nothing to retry
    [(metrics, checkpoint)] = session.reports
    assert checkpoint is None and metrics["permanent_error"] == "ModelError"
    assert "cannot load the tokenizer" in metrics["stop_reason"]

    class Result:  # what TorchTrainer.fit returns for that run
        checkpoint, error, best_checkpoints = None, None, []
        metrics = session.reports[0][0]

    monkeypatch.setattr(trial, "build_trainer", lambda *a, **k: type("T", (), {"fit": lambda self: Result()})())
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        trial.run_single(cfg, name="r", storage_path=str(tmp_path), output_dir=tmp_path / "out")


@pytest.mark.integration
def test_adapter_dtypes_are_equal_under_zero2_and_zero3_and_zero3_with_checkpointing_steps(qwen_like_checkpoint):
    """Two workers on DeepSpeed's CPU accelerator, bf16: the adapter computes in bf16 with an fp32
    master copy under both stages, and ZeRO-3 with LoRA and non-reentrant gradient checkpointing
    takes optimizer steps (DeepSpeed >= 0.19.3; before, its backward raised a CheckpointError)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "zero_step.py"), str(qwen_like_checkpoint)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for stage in ("2", "3"):
        assert result[stage]["trainable"] == ["torch.bfloat16"], result
        assert result[stage]["master"] == ["torch.float32"], result
    assert result["3"]["losses"][1] < result["3"]["losses"][0]  # the step with checkpointing changed the adapter


def test_the_decision_is_written_to_the_runs_summary(tmp_path):
    from ray_mtup.outputs import with_launch, write_run_outputs

    cfg = resolve_config(SEVEN)
    launch = plan_trials(cfg, Cluster(4, H200, num_cpus=64.0, gpu_name="H200"))
    history = [{"epoch": 1, "task2_f1": 0.1, "val_loss": 2.0, "objective": 0.1}]
    summary = with_launch(write_run_outputs(tmp_path, cfg, history, None), cfg, launch.to_dict())
    written = json.loads((tmp_path / "summary.json").read_text())["launch"]
    assert written == summary.launch and written["line"] == launch.line() and written["gpus_per_trial"] == 1
