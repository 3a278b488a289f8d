"""cluster/: every YAML file is parsed and checked, and a smoke search is submitted to a real Ray head.

The unit tests check that the files agree with each other and with the project: one Ray version
(pyproject.toml's pin, the image tags, KubeRay's ``rayVersion``), runtime environments that leave out
outputs, virtual environments and caches, entrypoints that the project's own flag parser accepts, and
dashboards bound to loopback except where Kubernetes needs otherwise.

The integration test checks the suite's one smoke search (conftest.py's ``smoke_search``): submitted with
the README's command to the session's Ray head (``ray_cluster``: ``ray start --head`` on 127.0.0.1, every
port chosen free, its own temp dir, token authentication), it must succeed, from the uploaded working
directory, with the dashboard answering on loopback only. Teardown ends exactly the processes of that
head (its session id), never ``ray stop``: ``ray stop`` kills every Ray on the machine.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from conftest import RayCluster, SmokeSearch

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"

RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "excludes", "env_vars", "pip", "uv", "conda", "container",
                    "image_uri", "config", "nsight", "py_executable", "java_jars"}
REQUIRED_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
GPU_KEY = "nvidia.com/gpu"


# -- helpers --------------------------------------------------------------------------------------------

def pinned_ray_version() -> str:
    """The X.Y.Z of ``ray[...]==X.Y.Z`` in pyproject.toml."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"expected exactly one ray==X.Y.Z pin in pyproject.toml, got {deps}"
    return pins[0]


def project_dependencies() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CLUSTER_DIR / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{name}: expected a mapping at the top level"
    return data


def image_ray_version(image: str) -> str:
    """``rayproject/ray:2.60.0-py311-gpu`` -> ``2.60.0``."""
    match = re.fullmatch(r"[\w./-]*rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-[\w.-]+)?", image)
    assert match, f"image {image!r} is not a rayproject/ray:<version>-... image"
    return match.group(1)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every mapping entry, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key, value in walk(manifest) if key == "containers" for c in value]


def kuberay_cluster_spec(name: str) -> dict[str, Any]:
    data = load(name)
    return data["spec"]["rayClusterSpec"] if data["kind"] == "RayJob" else data["spec"]


def uploaded_files(runtime_env: dict[str, Any]) -> list[str]:
    """Files ``--working-dir .`` would upload, by Ray's own directory walk (without .gitignore's help)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[str] = []

    def collect(path: Path) -> None:
        if path.is_file():
            files.append(path.relative_to(REPO_ROOT).as_posix())

    excludes = [_get_excludes(REPO_ROOT, runtime_env.get("excludes", []))]
    _dir_travel(REPO_ROOT, excludes, collect, include_gitignore=False)
    return files


# -- every YAML in cluster/ -----------------------------------------------------------------------------

CLUSTER_YAMLS = sorted(p.name for p in CLUSTER_DIR.glob("*.yaml"))
CHECKED_YAMLS = {"runtime_env.yaml", "runtime_env.pip.yaml", "cluster.yaml", "rayjob.yaml", "raycluster.yaml",
                 "pvc.yaml", "serviceaccount.yaml", "copy-pod.yaml"}


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_every_cluster_yaml_parses_starts_with_its_command_and_is_checked(name: str) -> None:
    text = (CLUSTER_DIR / name).read_text(encoding="utf-8")
    assert isinstance(yaml.safe_load(text), dict)
    assert text.startswith("#"), f"{name} should start with a comment giving the command that uses it"
    assert name in CHECKED_YAMLS, f"{name} is new: add its checks to tests/test_cluster.py"


def test_all_checked_yamls_exist() -> None:
    assert set(CLUSTER_YAMLS) == CHECKED_YAMLS


# -- runtime environments -------------------------------------------------------------------------------

def test_runtime_env_installs_nothing_at_job_time_and_sets_the_run_environment() -> None:
    env = load("runtime_env.yaml")
    assert set(env) <= RUNTIME_ENV_KEYS, f"unknown runtime_env keys {set(env) - RUNTIME_ENV_KEYS}"
    # The file the README's submit command uses (and the integration test): nothing to install.
    assert not {"pip", "uv", "conda", "container", "image_uri"} & set(env)
    assert "working_dir" not in env, "--working-dir on the command line supplies it"
    env_vars = env["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), \
        "Ray requires string env_vars values (quote them)"
    assert REQUIRED_ENV_VARS.items() <= env_vars.items()
    assert "HF_HUB_OFFLINE" not in env_vars, "offline mode only where the weights are already on every node"


def test_runtime_env_excludes_outputs_virtualenvs_caches_and_git() -> None:
    env = load("runtime_env.yaml")
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO_ROOT, env["excludes"])
    for directory in ("runs", ".venv", "venv", ".git", ".pytest_cache", ".hypothesis", "outputs",
                      "ray_mtup/__pycache__"):
        assert excluded(REPO_ROOT / directory), f"{directory}/ is uploaded (a directory is dropped as a whole)"
    for kept in ("run_tune.py", "ray_mtup/launcher.py", "search_spaces/smoke.yaml", "cluster/runtime_env.yaml",
                 "ray_mtup/sample_data/train_amr_1.txt"):
        assert not excluded(REPO_ROOT / kept), f"{kept} would not be uploaded"


def test_working_dir_upload_is_small_and_holds_the_package() -> None:
    files = uploaded_files(load("runtime_env.yaml"))
    assert "run_tune.py" in files and "ray_mtup/launcher.py" in files and "search_spaces/smoke.yaml" in files
    bad = [f for f in files if f.split("/")[0] in {".venv", ".git", "runs", ".hypothesis", ".pytest_cache"}
           or "__pycache__" in f]
    assert not bad, f"would upload {bad[:5]}"
    size = sum((REPO_ROOT / f).stat().st_size for f in files)
    assert size < 20 * 2**20, f"working_dir upload of {size / 2**20:.1f} MiB (cap 500 MiB; expected a few MiB)"


def test_pip_variant_is_the_base_file_plus_the_project_dependencies() -> None:
    base, pip_env = load("runtime_env.yaml"), load("runtime_env.pip.yaml")
    assert {k: v for k, v in pip_env.items() if k != "pip"} == base, "the variant must not drift from the base"
    packages = pip_env["pip"]["packages"]
    # Ray comes from the image (its tag equals the pin); installing it again in the job's env breaks it.
    expected = [d for d in project_dependencies() if not re.match(r"ray\b", d)]
    assert packages == expected, "runtime_env.pip.yaml's packages must equal pyproject.toml's dependencies"
    assert pip_env["pip"].get("pip_check") is False


# -- Ray cluster launcher -------------------------------------------------------------------------------

def test_cluster_launcher_config() -> None:
    cfg = load("cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "auth", "docker", "available_node_types",
                "head_node_type", "file_mounts", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, f"cluster.yaml: missing {key}"
    assert image_ray_version(cfg["docker"]["image"]) == pinned_ray_version()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 8 for t in workers), "GPU worker nodes (8 GPUs each)"
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0, "no trials on the head"
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*torch==", c))
    project_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e \.", c))
    assert torch_at < project_at, "torch (CUDA build) first, then the project"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (CLUSTER_DIR / "cluster.yaml").read_text(), "dashboard stays on loopback (ssh tunnel)"
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    assert {".venv", "runs", ".git"} <= {p.strip("/") for p in cfg.get("rsync_exclude", [])}


# -- KubeRay --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_versions_gpus_and_tolerations(name: str) -> None:
    data = load(name)
    assert data["apiVersion"] == "ray.io/v1"
    assert data["kind"] == {"rayjob.yaml": "RayJob", "raycluster.yaml": "RayCluster"}[name]
    spec = kuberay_cluster_spec(name)
    pin = pinned_ray_version()
    assert str(spec["rayVersion"]) == pin
    images = [c["image"] for c in containers(spec)]
    assert images and all(image_ray_version(i) == pin for i in images), images
    head_rs = spec["headGroupSpec"]["rayStartParams"]
    assert head_rs.get("num-cpus") == "0", "the head schedules no trials"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        requests = pod["containers"][0]["resources"]["requests"]
        assert int(limits[GPU_KEY]) == 8 and str(requests[GPU_KEY]) == str(limits[GPU_KEY])
        assert any(t.get("key") == GPU_KEY and t.get("effect") == "NoSchedule" for t in pod["tolerations"])
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"]), "/dev/shm for NCCL"


def test_rayjob_runs_a_7b_search_and_deletes_its_cluster() -> None:
    from ray_mtup.devices import Cluster
    from ray_mtup.launcher import build_parser, config_from_args, plan_launch

    job = load("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "run_tune.py"]
    args = build_parser().parse_args(argv[2:])  # the project's own parser accepts the entrypoint
    # no GPU layout pinned: the launcher plans it from the cluster's GPUs (80 GB each here)
    assert (args.model, args.gpus_per_trial, args.zero_stage, args.device) == ("qwen2.5-7b", "auto", None, "auto")
    assert args.storage_path.startswith("s3://"), "multi-node needs shared storage"
    cfg = config_from_args(args)
    launch = plan_launch(args, cfg, Cluster(32, 80e9, num_cpus=4 * 180.0))
    assert (launch.gpus_per_trial, launch.concurrent_trials, launch.zero_stage) == (1, 32, 2)
    assert cfg.replace(**launch.overrides()).num_workers == 1
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert load("runtime_env.yaml")["env_vars"].items() <= runtime_env["env_vars"].items()
    assert runtime_env["pip"] == load("runtime_env.pip.yaml")["pip"], "the stock image lacks the dependencies"
    assert "://" in runtime_env["working_dir"], "a RayJob's working_dir must be a remote URI"


def test_gpu_node_counts_are_fixed_before_the_search_starts() -> None:
    # run_tune.py sizes max_concurrent_trials from the resources present at start and refuses to start
    # without a GPU, so a cluster that would autoscale up from zero GPU nodes never gets used.
    cfg = load("cluster.yaml")
    for name, node_type in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert node_type["min_workers"] == node_type["max_workers"] > 0
    for name in ("rayjob.yaml", "raycluster.yaml"):
        spec = kuberay_cluster_spec(name)
        assert not spec.get("enableInTreeAutoscaling", False)
        for group in spec["workerGroupSpecs"]:
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] > 0


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_a_gpu_worker_pod_holds_eight_7b_trials(name: str) -> None:
    from ray_mtup.config import resolve_config
    from ray_mtup.devices import Cluster, plan_trials
    from ray_mtup.search import max_concurrent_trials

    cfg = resolve_config("qwen2.5-7b")
    for group in kuberay_cluster_spec(name)["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod = {"CPU": float(limits["cpu"]), "GPU": float(limits[GPU_KEY])}
        launch = plan_trials(cfg, Cluster(int(pod["GPU"]), 80e9, pod["CPU"]))  # H100 80 GB
        assert (launch.gpus_per_trial, launch.concurrent_trials) == (1, 8)
        assert max_concurrent_trials(pod, cfg.replace(**launch.overrides())) == 8  # what the search then allows


def test_dashboard_binds_all_interfaces_only_in_kubernetes_with_a_warning() -> None:
    for name in CLUSTER_YAMLS:
        if "0.0.0.0" in (CLUSTER_DIR / name).read_text():
            assert name in {"rayjob.yaml", "raycluster.yaml"}, f"{name} binds to 0.0.0.0"
            head = kuberay_cluster_spec(name)["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", "never expose the dashboard publicly"
    readme = (CLUSTER_DIR / "README.md").read_text()
    assert "0.0.0.0" in readme and re.search(r"firewall", readme, re.I) and "port-forward" in readme


def test_readme_documents_the_tested_submit_command() -> None:
    readme = (CLUSTER_DIR / "README.md").read_text()
    assert "--working-dir . --runtime-env cluster/runtime_env.yaml" in readme
    assert "s3://" in readme and "GPU-hours" in readme


# -- Kubernetes objects the KubeRay manifests need, and the guide that creates them ------------------

KUBERAY = ("rayjob.yaml", "raycluster.yaml")


def pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec of a manifest (a Pod's spec, or each ``template.spec`` inside it)."""
    specs = [v["spec"] for k, v in walk(manifest) if k in ("template", "submitterPodTemplate")]
    return specs + ([manifest["spec"]] if manifest.get("kind") == "Pod" else [])


def test_volume_claim_is_shared_read_write_by_every_node() -> None:
    pvc = load("pvc.yaml")
    assert (pvc["apiVersion"], pvc["kind"], pvc["metadata"]["name"]) == ("v1", "PersistentVolumeClaim",
                                                                         "ray-mtup-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "the head and 4 GPU pods on different nodes mount it"
    assert re.fullmatch(r"\d+[GT]i", pvc["spec"]["resources"]["requests"]["storage"])
    assert pvc["spec"].get("storageClassName"), "ReadWriteMany needs a class that offers it (EFS, NFS)"


def test_service_account_carries_the_s3_role() -> None:
    sa = load("serviceaccount.yaml")
    assert (sa["apiVersion"], sa["kind"], sa["metadata"]["name"]) == ("v1", "ServiceAccount", "ray-mtup")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_copy_pod_mounts_the_volume_where_the_clusters_read_the_corpus() -> None:
    pod = load("copy-pod.yaml")
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("busybox:"), "kubectl cp needs tar in the pod"
    assert container["resources"]["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert {claims[n]: path for n, path in mounts.items()} == {"ray-mtup-shared": "/mnt/shared"}
    # the corpus lands where the RayJob's entrypoint reads it
    data_dir = shlex.split(load("rayjob.yaml")["spec"]["entrypoint"])
    data_dir = data_dir[data_dir.index("--data-dir") + 1]
    assert f"kubectl cp ../shared/data/vlsp2025 {pod['metadata']['name']}:{data_dir}" in (
        CLUSTER_DIR / "README.md").read_text()
    assert data_dir.startswith("/mnt/shared/")


@pytest.mark.parametrize("name", [*KUBERAY, "copy-pod.yaml"])
def test_manifests_use_the_claim_account_and_secret_that_exist(name: str) -> None:
    claim, account = load("pvc.yaml")["metadata"]["name"], load("serviceaccount.yaml")["metadata"]["name"]
    readme = (CLUSTER_DIR / "README.md").read_text()
    secret = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", readme)
    assert secret, "the guide creates the token Secret"
    specs = pod_specs(load(name))
    assert specs
    for spec in specs:
        assert spec["serviceAccountName"] == account
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims <= {claim}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] == "shared":
                    assert mount["mountPath"] == "/mnt/shared"
            if name in KUBERAY:  # every Ray container authenticates with the token from the Secret
                env = {e["name"]: e for e in container["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == secret.groups()
    if name in KUBERAY:
        assert any(spec.get("volumes") for spec in specs)
        for file in ("pvc.yaml", "serviceaccount.yaml"):
            assert file in (CLUSTER_DIR / name).read_text(), f"{name}'s header should point at {file}"
    if name == "rayjob.yaml":  # the submitter pod talks to the head too
        assert load(name)["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]


def test_guide_creates_every_object_and_reads_the_token_back() -> None:
    readme = (CLUSTER_DIR / "README.md").read_text()
    for file in ("serviceaccount.yaml", "pvc.yaml", "copy-pod.yaml", "raycluster.yaml"):
        assert f"-f cluster/{file}" in readme, f"the guide never applies {file}"
    assert "base64 -d" in readme and "jsonpath='{.data.auth_token}'" in readme and "RAY_AUTH_TOKEN=" in readme
    assert "temporary directory" not in readme.replace("\n", " "), "results are copied to the storage path"
    assert "aws s3 sync s3://YOUR-BUCKET/ray_mtup/" in readme


# -- the Dockerfile is runtime_env.pip.yaml baked into the image -------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (CLUSTER_DIR / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_runtime_env_packages_on_the_pinned_ray_image() -> None:
    instructions = dockerfile_instructions()
    (base,) = [args for word, args in instructions if word == "FROM"]
    assert image_ray_version(base) == pinned_ray_version()
    assert base in {c["image"] for c in containers(load("raycluster.yaml"))}, "the manifests' base image"
    installs = [shlex.split(args) for word, args in instructions if word == "RUN" and "pip install" in args]
    assert len(installs) == 1
    packages = [a for a in installs[0][installs[0].index("install") + 1:] if not a.startswith("-")]
    assert packages == load("runtime_env.pip.yaml")["pip"]["packages"]
    assert not any(re.match(r"ray\b", p) for p in packages), "Ray comes from the base image"
    env = {}
    for word, args in instructions:
        if word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    assert env == load("runtime_env.yaml")["env_vars"]


def test_readme_names_every_file_here() -> None:
    readme = (CLUSTER_DIR / "README.md").read_text()
    for path in CLUSTER_DIR.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"cluster/README.md does not describe {path.name}"


# -- results copied to remote storage (a run's as a search's) ----------------------------------------------

def test_upload_results_copies_a_run_directory_to_a_storage_uri(tmp_path: Path) -> None:
    from ray_mtup.outputs import upload_results

    run = tmp_path / "runs" / "exp"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text('{"best_epoch": 1}')
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert upload_results(run, f"file://{tmp_path}/bucket/ray_mtup/exp/") is True
    copied = tmp_path / "bucket" / "ray_mtup" / "exp"
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*")) == [
        "adapter", "adapter/adapter_config.json", "summary.json"]
    assert json.loads((copied / "summary.json").read_text()) == {"best_epoch": 1}


def test_a_failed_upload_is_logged_and_keeps_the_local_results(tmp_path: Path, caplog) -> None:
    from ray_mtup.outputs import upload_results

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert upload_results(run, f"file://{blocker}/exp") is False
    assert (run / "summary.json").is_file()
    assert f"could not copy the results to file://{blocker}/exp" in caplog.text and str(run) in caplog.text


# -- the session's Ray head on loopback, the smoke search submitted to it -----------------------------------

@pytest.mark.integration
def test_smoke_search_submitted_as_a_job_succeeds(ray_cluster: RayCluster, smoke_search: SmokeSearch) -> None:
    """The suite's one smoke search is this job (conftest.py's ``smoke_search``): submitted with the
    README's command to the session's ``ray start --head`` cluster; test_search.py reads what it wrote."""
    from ray_mtup.config import TrainConfig, load_yaml

    logs = smoke_search.logs
    assert smoke_search.status == "SUCCEEDED", logs[-6000:]

    # The job server answered on loopback only (Ray's GCS and raylet listen on every interface, behind
    # Ray's token authentication; the dashboard is the only HTTP entry point and it stays on 127.0.0.1).
    from ray._private.services import get_node_ip_address

    address = ray_cluster.dashboard
    with pytest.raises(urllib.error.HTTPError) as refused:  # and only with the token
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    outside_ip, port = get_node_ip_address(), int(address.rsplit(":", 1)[1])
    if not outside_ip.startswith("127."):
        with pytest.raises(OSError), socket.create_connection((outside_ip, port), timeout=5):
            pass

    # It ran on the submitted-to cluster, from the uploaded working dir (without .venv/.git/runs).
    assert "Connecting to existing Ray cluster" in logs, logs[-3000:]
    # Its output is the run's own (ray_mtup.logs.quiet_ray_driver): no Tune table, none of the lines
    # that Ray, DeepSpeed and transformers print in every run, while the workers' own lines arrive.
    from ray_mtup.logs import RAY_NOISE

    assert "Configuration for experiment" not in logs and "tensorboard --logdir" not in logs
    assert not [line for line in logs.splitlines() if any(re.search(p, line) for p in RAY_NOISE)]
    assert not re.search(r"(generate|SMATCH|Loading weights): +\d+%", logs)  # progress bars: on a terminal only
    assert re.search(r"\(RayTrainWorker pid=\d+[^)]*\).*ray_mtup\.training: epoch 1:", logs), logs[-3000:]
    upload_root = ray_cluster.temp_dir / "session_latest/runtime_resources/working_dir_files"
    uploads = [p for p in upload_root.iterdir() if p.is_dir()]
    assert len(uploads) == 1, uploads
    shipped = {p.name for p in uploads[0].iterdir()}
    assert {"run_tune.py", "ray_mtup"} <= shipped and (uploads[0] / "search_spaces" / "smoke.yaml").is_file()
    assert not {".venv", ".git", "runs"} & shipped

    out_dir = smoke_search.exp
    rows = (out_dir / "results.csv").read_text().strip().splitlines()
    from ray_mtup.search import load_search_space

    n_trials = load_search_space(REPO_ROOT / "search_spaces" / "smoke.yaml").num_samples
    assert len(rows) == 1 + n_trials, f"expected the {n_trials} trials of smoke.yaml, got {rows}"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n_trials"] == n_trials and summary["n_errors"] == 0
    assert summary["best_trial"] in "\n".join(rows[1:])
    best = TrainConfig.from_dict(load_yaml(out_dir / "best_config.yaml"))
    assert best.model == "tiny"
