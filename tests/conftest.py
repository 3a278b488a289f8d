"""Shared test fixtures: the tiny hand-written corpus, the (optional) VLSP corpus, one Ray cluster
for the whole run, the training loop in-process, and the smoke search run once.

Fixtures for tests that need more than a pure function (reuse them rather than start another Ray,
another torchrun or another search: each costs tens of seconds of the suite's budget):

* ``ray_cluster`` (session): a ``ray start --head`` cluster; ``run_tune.py`` subprocesses that inherit
  ``os.environ`` connect to it. Tests that use it are checked afterwards: no actor and no placement
  group may be left on it.
* ``ray_connected`` (session): this process connected to that cluster (Ray Train / Tune in-process).
* ``run_loop`` (function): :func:`ray_mtup.training.train_loop` in this process, one worker, under a
  :class:`~ray_mtup.session.TorchrunSession` (faults of the loop, numerics).
* ``smoke_search`` (session): ``run_tune.py --model tiny --smoke-test`` submitted once as a Ray job;
  test_cluster.py checks the submission, test_search.py what the search wrote.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from ray_mtup.config import corpus_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


def card_dir(name: str) -> Path:
    """The folder of a released model's config.json written from its card: the registry's own
    (ray_mtup/model_configs/), else the tests' (fixtures/configs/: models outside the registry)."""
    from ray_mtup.models import MODEL_CONFIGS

    return MODEL_CONFIGS / name if (MODEL_CONFIGS / name).is_dir() else FIXTURES_DIR / "configs" / name

#: Malformed corpus fixtures in fixtures/bad/: (file, 1-based line of the error, reason).
MALFORMED_CORPORA = [
    ("bad_utf8.txt", 3, "not valid UTF-8"),
    ("empty.txt", 1, "empty file"),
    ("no_snt.txt", 5, "graph without a preceding #::snt"),
    ("unbalanced.txt", 6, "unbalanced parentheses"),
    ("snt_without_graph.txt", 5, "#::snt line without a graph"),
    ("sentence_only.txt", 1, "sentence-only file"),
]


def _vlsp_dir() -> Path:
    """RAY_MTUP_DATA_DIR if set, else ../shared/data/vlsp2025 next to the repository."""
    return corpus_dir(None, default=REPO_ROOT.parent / "shared/data/vlsp2025")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: mini_amr.txt, mini_sentences.txt and bad/ (one malformed case each)."""
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def vlsp_dir() -> Path:
    """The VLSP 2025 corpus directory; skips the test when it is absent."""
    path = _vlsp_dir()
    if not (path / "train_amr_1.txt").is_file():
        pytest.skip(f"VLSP corpus not found at {path} (set RAY_MTUP_DATA_DIR)")
    return path


#: A small shape for checkpoints written by tests (the tiny model's architecture, fewer weights).
SMALL_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 800}


@pytest.fixture(scope="session")
def qwen_like_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory laid out like Qwen2.5-Instruct's (Qwen2 architecture, safetensors,
    byte-level BPE with <|endoftext|>/<|im_end|> and a chat template, generation_config.json with
    Qwen's sampling defaults), written by the project's own writer from the shipped sample corpus."""
    from ray_mtup.config import SAMPLE_DATA_DIR, TinyModelSettings
    from ray_mtup.corpus import load_corpus
    from ray_mtup.dataset import to_mtup, tokenizer_texts
    from ray_mtup.modeling import write_tiny_checkpoint

    texts = tokenizer_texts(to_mtup(load_corpus(SAMPLE_DATA_DIR)))
    return write_tiny_checkpoint(TinyModelSettings(**SMALL_TINY), 0, texts,
                                 cache_dir=tmp_path_factory.mktemp("checkpoints"))


# --- one Ray cluster for the whole test run ---------------------------------------------------------------
#
# As Ray's own suite does (``ray_start_regular_shared``), every test that needs Ray shares one cluster,
# started once, on first use, by ``ray start --head`` (the way a user's cluster runs; test_cluster.py
# submits a job to it). In-process tests connect with :func:`ray_connected`; ``run_tune.py`` subprocesses
# find it through ``RAY_ADDRESS`` (and the head's auth token), which the fixture exports to this process's
# environment, so every subprocess started with ``env={**os.environ, ...}`` inherits them.

RAY_BIN = Path(sys.executable).parent / "ray"
#: Environment of every Ray worker on the test cluster (the launcher's embedded Ray and
#: cluster/runtime_env.yaml set the same).
CLUSTER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}


@dataclass(frozen=True)
class RayCluster:
    """The session's Ray head: ``gcs_address`` for ``ray.init``/``RAY_ADDRESS``, ``dashboard`` (http URL)
    for job submission, ``headers`` (the auth token) for :class:`ray.job_submission.JobSubmissionClient`,
    ``env`` for the ``ray`` CLI, ``temp_dir`` the head's session files."""

    gcs_address: str
    dashboard: str
    headers: dict[str, str]
    env: dict[str, str]
    temp_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(width: int) -> int:
    """The first port of ``width`` consecutive free ports (for Ray's worker ports)."""
    for _ in range(50):
        base = 20000 + (uuid.uuid4().int % 2000) * 20
        try:
            for port in range(base, base + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    pytest.fail("no free range of worker ports")


def session_processes(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (everything ``ray start`` spawned stays in it)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is already dead
            pids.append(int(stat.parent.name))
    return pids


def stop_session(proc: subprocess.Popen, grace_s: float = 10.0) -> list[int]:
    """What ``ray stop`` does (SIGTERM, then SIGKILL after a grace period), but only to the processes
    of ``proc``'s session (``ray stop`` would end every Ray on the machine). Returns the survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 20.0)):
        deadline = time.time() + wait_s
        for pid in session_processes(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return session_processes(proc.pid)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """One Ray head for the whole run: 127.0.0.1, every port free, its own short temp dir, as many
    CPUs as the machine, Ray's token authentication, the dashboard on loopback. Exports
    ``RAY_ADDRESS``, ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` to ``os.environ`` for the session, so
    ``run_tune.py`` subprocesses connect to it instead of starting their own Ray. Teardown ends
    exactly the head's processes (its session id), also when a test failed."""
    if not RAY_BIN.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    if sys.platform != "linux":
        pytest.skip("teardown reads /proc")
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.job_submission import JobSubmissionClient

    temp_dir = Path(tempfile.mkdtemp(prefix="rmt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    dashboard_port, gcs_port = free_port(), free_port()
    worker_base = free_port_range(100)
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", str(worker_base),
           "--max-worker-port", str(worker_base + 99), "--num-cpus", str(os.cpu_count() or 2), "--num-gpus", "0",
           "--object-store-memory", str(400 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    # Ray 2.60 enables token authentication by default; this head gets its own token, handed to its
    # clients through the environment (never written to ~/.ray, which other Ray runs on the machine share).
    token = secrets.token_hex(32)
    gcs_address = f"127.0.0.1:{gcs_port}"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth, **CLUSTER_ENV, PATH=f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # Ray processes that look their cluster up by themselves (Train V2's PlacementGroupCleaner) would find
    # every Ray on this machine and give up; RAY_ADDRESS, inherited from the raylet, names this one.
    env["RAY_ADDRESS"] = gcs_address
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env["RAY_API_SERVER_ADDRESS"] = dashboard  # the `ray job` CLI: the dashboard itself, no look-up through GCS
    log_path = temp_dir / "ray_start.log"
    headers = {"Authorization": f"Bearer {token}"}
    with log_path.open("wb") as log, pytest.MonkeyPatch.context() as mp:
        for key, value in auth.items():
            mp.setenv(key, value)
        reset_auth_token_state()  # Ray read its auth settings when imported (as Ray's own tests do)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    JobSubmissionClient(dashboard, headers=headers)  # checks the job server's version
                    break
                except ConnectionError:
                    pass
                if time.time() > deadline:
                    pytest.fail(f"dashboard not up after 180 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            mp.setenv("RAY_ADDRESS", gcs_address)
            yield RayCluster(gcs_address, dashboard, headers, env, temp_dir)
        finally:
            _disconnect()
            left = stop_session(proc)
            mp.undo()
            reset_auth_token_state()
            subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
    assert not left, f"Ray processes of the test cluster survived teardown: {left}"


def _disconnect() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_connected(ray_cluster: RayCluster) -> Any:
    """The ``ray`` module, this process connected (once) to the session's cluster as a driver: for
    tests that call Ray Train or Tune in-process (:func:`ray_mtup.trial.run_single`, ``build_trainer``)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, log_to_driver=True)
    return ray


#: Detached actors Ray keeps for the cluster's lifetime by design, created by the first run that needs
#: them (Ray Train's state actor, Ray Data's autoscaling coordinator): not left behind by a test.
CLUSTER_SINGLETONS = {"TrainStateActor", "_AutoscalingCoordinatorActor"}


#: Ray Train V2's per-run actors that a finished in-process ``TorchTrainer.fit()`` keeps alive while
#: the driver (this pytest process) still holds a handle: they hold no resources and end with the
#: driver, so they are not counted as left behind (their placement groups still are).
DRIVER_RUN_ACTORS = {"TrainController", "DatasetManager"}


def leftovers() -> tuple[dict[str, str], dict[str, str]]:
    """(live actors, placement groups not removed) on the session's cluster, id -> description."""
    import ray

    actors = {actor_id: f"{a.get('Name') or actor_id[:8]} (class {a['ActorClassName']}, job {a['JobID']}, {a['State']})"
              for actor_id, a in ray._private.state.actors().items()
              if a["State"] != "DEAD" and a["ActorClassName"] not in CLUSTER_SINGLETONS | DRIVER_RUN_ACTORS}
    groups = {pg_id: f"{pg_id[:8]} ({pg['strategy']}, {pg['state']})"
              for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    return actors, groups


@pytest.fixture(autouse=True)
def _nothing_left_on_the_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the session's Ray cluster: no actor and no placement group that the
    test created is left behind (waits up to 60 s for Ray's own clean-up of ended jobs and trials).
    What was there before the test is not its doing: one leak fails one test, not every later one."""
    before: tuple[set[str], set[str]] = (set(), set())
    if "ray_cluster" in request.fixturenames:
        request.getfixturevalue("ray_connected")
        actors, groups = leftovers()
        before = (set(actors), set(groups))
    yield
    if "ray_cluster" not in request.fixturenames:
        return

    def new() -> tuple[list[str], list[str]]:
        actors, groups = leftovers()
        return ([d for i, d in actors.items() if i not in before[0]],
                [d for i, d in groups.items() if i not in before[1]])

    deadline = time.monotonic() + 60
    while (left := new()) != ([], []) and time.monotonic() < deadline:
        gc.collect()  # Ray ends this process's actors (a finished TorchTrainer's controller) once their handles go
        time.sleep(1)
    actors, groups = left
    assert not actors and not groups, f"left on the Ray cluster: actors {actors}, placement groups {groups}"


# --- the training loop in this process --------------------------------------------------------------------

#: The rendezvous port of this process's one-rank process group (created once, on first use).
_LOOP_PORT = free_port()


@dataclass
class LoopRun:
    """What :func:`ray_mtup.training.train_loop` left in ``out_dir`` under a TorchrunSession."""

    out_dir: Path

    @property
    def reported(self) -> list[dict[str, Any]]:
        """Every epoch's metrics, in the order the loop reported them (``metrics.jsonl``)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @property
    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        from ray_mtup.session import TorchrunSession

        return TorchrunSession(self.out_dir).checkpoints()

    def state(self, checkpoint: Path | None = None) -> dict[str, Any]:
        """trainer_state.json of ``checkpoint`` (default: the newest)."""
        return json.loads(((checkpoint or self.checkpoints[-1]) / "trainer_state.json").read_text(encoding="utf-8"))


@pytest.fixture
def run_loop() -> Any:
    """``run_loop(cfg, out_dir) -> LoopRun``: the per-worker loop in this process, as rank 0 of a
    one-rank gloo group (``torchrun --nproc_per_node 1`` without the launch), so a loop behaviour
    (a NaN loss, out of memory, a full disk, resuming) is tested in seconds. Calling it again on the
    same ``out_dir`` resumes from the checkpoints there. ``cfg.num_workers`` must be 1."""
    import torch

    def run(cfg: Any, out_dir: Path) -> LoopRun:
        from ray_mtup.session import TorchrunSession
        from ray_mtup.training import train_loop

        assert cfg.num_workers == 1, "the loop runs in this process: one worker"
        threads = torch.get_num_threads()  # the loop sets it from cpus_per_worker
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_LOOP_PORT)}.items():
                mp.setenv(key, value)
            try:
                train_loop(cfg, TorchrunSession(out_dir))
            finally:
                torch.set_num_threads(threads)
        return LoopRun(Path(out_dir))

    return run


# --- the smoke search, once -------------------------------------------------------------------------------

JOB_TIMEOUT_S = 900


@dataclass(frozen=True)
class SmokeSearch:
    """``run_tune.py --model tiny --smoke-test --name smoke --ensemble 3`` submitted as a job to the session's cluster
    with the README's command: its ``job_id``, final ``status``, ``logs`` (the driver's stdout and
    stderr), ``seconds`` to finish, and ``exp``, the experiment directory it wrote."""

    job_id: str
    status: Any
    logs: str
    seconds: float
    exp: Path


@pytest.fixture(scope="session")
def smoke_search(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> SmokeSearch:
    """The demo search, run once for the whole suite: test_cluster.py checks the submission, test_search.py
    what the search wrote (``smoke_search.exp``); with ``--ensemble 3`` its summary scores the ensemble of
    the 3 best trials (test_ensemble.py reads it, and reuses the parses it wrote)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage = tmp_path_factory.mktemp("smoke_storage")
    job_id = f"ray-mtup-test-{uuid.uuid4().hex[:8]}"
    submit = [str(RAY_BIN), "job", "submit", "--address", ray_cluster.dashboard, "--submission-id", job_id,
              "--no-wait", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
              "python", "run_tune.py", "--model", "tiny", "--smoke-test", "--storage-path", str(storage),
              "--name", "smoke", "--ensemble", "3"]
    t0 = time.time()
    out = subprocess.run(submit, cwd=REPO_ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    client = JobSubmissionClient(ray_cluster.dashboard, headers=ray_cluster.headers)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        if time.time() - t0 > JOB_TIMEOUT_S:
            client.stop_job(job_id)
            pytest.fail(f"job still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(2)
    seconds = time.time() - t0
    print(f"job {job_id} {status} after {seconds:.0f} s")
    return SmokeSearch(job_id, status, client.get_job_logs(job_id), seconds, storage / "smoke")


# --- the runs several tests compare, in one torchrun launch -----------------------------------------------

def torchrun_configs(checkpoint: Path) -> dict[str, Any]:
    """The 2-worker runs of ``torchrun_runs``, by name (``--model qwen2.5-1.5b --model-path`` the
    Qwen-like checkpoint, the shipped sample corpus, a few steps):

    * ``equiv``: ZeRO and micro-batch ``auto``; test_worker.py compares it with the same config under Ray Train;
    * ``padded`` / ``packed``: ZeRO-2, one optimizer step, without and with packing (test_packing.py);
    * ``replica`` / ``synced``: ZeRO-3, 2 epochs of one step, each evaluation path (test_eval_replica.py).
    """
    from ray_mtup.config import resolve_config

    def qwen(**overrides: Any) -> Any:
        return resolve_config("qwen2.5-1.5b", overrides={"model_path": str(checkpoint), "max_samples": 40,
                                                         "num_workers": 2, "cpus_per_worker": 1.0, **overrides})

    padded = qwen(epochs=1, max_steps_per_epoch=1, per_device_batch_size=4, global_batch_size=8,
                  learning_rate=2e-3, eval_max_samples=2, max_new_tokens=8, zero_stage=2, **{"lora.dropout": 0.0})
    zero3 = qwen(epochs=2, per_device_batch_size=4, global_batch_size=8, max_steps_per_epoch=1, learning_rate=1e-2,
                 eval_max_samples=5, eval_batch_size=2, max_new_tokens=16, zero_stage=3, test_split=0.0)
    return {
        "equiv": qwen(epochs=1, per_device_batch_size="auto", global_batch_size=8, learning_rate=2e-3,
                      eval_max_samples=2, max_new_tokens=16, zero_stage="auto"),
        "padded": padded,
        "packed": padded.replace(packing=True, liger_kernel=True),
        "replica": zero3.replace(eval_generation="replica"),
        "synced": zero3.replace(eval_generation="synced"),
    }


# --------------------------------------------------------------------------- other architectures

#: Chat templates shortened from the released ones (no tools, no system-prompt defaults).
QWEN3_CHAT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _families() -> dict:
    from ray_mtup.modeling import CheckpointFamily

    return {
        # Qwen3 (hybrid thinking): Qwen's tokens plus the think tags, tied embeddings as in 1.7B/4B,
        # head_dim 32 != hidden / heads, q/k norms.
        "qwen3": (CheckpointFamily(
            "Qwen3Config", "Qwen3ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
            eos="<|im_end|>", pad="<|endoftext|>", bos="<|endoftext|>", chat_template=QWEN3_CHAT,
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            generation={"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
            tokenizer_bos=False, config_pad=False),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=4096)),
        # Llama 3.1 Instruct: <|eot_id|> ends a turn, no pad token (the tokenizer falls back), untied.
        "llama": (CheckpointFamily(
            "LlamaConfig", "LlamaForCausalLM",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>", chat_template=LLAMA3_CHAT,
            generation_eos=("<|end_of_text|>", "<|eot_id|>"), generation={"do_sample": True, "temperature": 0.6,
                                                                          "top_p": 0.9}),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096)),
        # Gemma 3 (text): <end_of_turn> ends a turn but <eos> is the tokenizer's EOS; sliding-window
        # layers, four norms a layer, tied embeddings.
        "gemma3": (CheckpointFamily(
            "Gemma3TextConfig", "Gemma3ForCausalLM", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
            eos="<eos>", pad="<pad>", bos="<bos>", chat_template=GEMMA3_CHAT, generation_eos=("<eos>", "<end_of_turn>"),
            generation={"do_sample": True, "top_k": 64, "top_p": 0.95}),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=4096)),
    }


@pytest.fixture(scope="session")
def torchrun_runs(qwen_like_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> run directory of each of :func:`torchrun_configs`, trained once for the suite by one
    ``torchrun --nproc_per_node 2 tests/torchrun_runs.py`` launch (2 CPU processes, gloo); each directory
    is what ``torchrun -m ray_mtup.worker`` writes (config.yaml, metrics.jsonl, checkpoint_<epoch>/,
    adapter/, summary.json). The configs are in ``<run>.yaml`` beside each run."""
    root = tmp_path_factory.mktemp("torchrun")
    args: list[str] = []
    for name, cfg in torchrun_configs(qwen_like_checkpoint).items():
        cfg.write_yaml(root / f"{name}.yaml", f"the suite's torchrun run {name}")
        args += [str(root / f"{name}.yaml"), str(root / name)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("torchrun_runs.py")), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: root / name for name in torchrun_configs(qwen_like_checkpoint)}


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-init checkpoints of the Qwen3, Llama 3.1 and Gemma 3 architectures (transformers'
    config classes, tiny shapes), each with a BPE tokenizer trained on the sample corpus and its
    family's special tokens, chat template and generation_config.json, written by the same writer
    as the tiny model (ray_mtup.modeling.write_random_checkpoint)."""
    from ray_mtup.config import SAMPLE_DATA_DIR
    from ray_mtup.corpus import load_corpus
    from ray_mtup.dataset import tokenizer_texts, to_mtup
    from ray_mtup.modeling import write_random_checkpoint

    texts = tokenizer_texts(to_mtup(load_corpus(SAMPLE_DATA_DIR)))
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (family, shape) in _families().items():
        write_random_checkpoint(root / name, texts, 800, 0, shape, family=family)
        out[name] = root / name
    return out
