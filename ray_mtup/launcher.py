"""What ``run_tune.py`` runs: flags -> validated config -> Ray -> a search or a single run.

Before Ray starts, the devices are decided once (:mod:`ray_mtup.devices`: ``--device``,
``--gpus-per-trial auto``, the memory plan) and printed in one line; ``--dry-run`` prints the
decision and the memory plan and exits. Every user mistake (bad flag value, unknown model,
missing ``--model-path``, a model whose config and tokenizer do not resolve, a real model with no
GPU and no ``--device cpu``, bad search space, unwritable storage, a trial that cannot fit on the
cluster) is reported as ``error: <field>: <message>`` with exit code 2 before any trial starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import search, trial
from .config import (
    DATA_DIR_ENV,
    MAX_FAILURES,
    PACKAGE_DIR,
    PRESETS,
    SEARCH_SPACES,
    TrainConfig,
    check_lora_targets,
    packaged_names,
    packaged_yaml,
    resolve_config,
    with_data_dir,
)
from .dataset import corpus_splits, to_mtup
from .devices import DEVICES, Cluster, TrialPlan, local_gpus, plan_trials, probe_gpu_memory, ray_gpus
from .errors import ConfigError, ModelError, RayMtupError
from .holdout import describe, describe_corpus, format_interval, format_test_line
from .logs import quiet_ray_driver, ray_worker_setup, setup_logging
from .modeling import check_model_files
from .models import MODELS, model_kind, model_shape
from .outputs import format_epoch_table
from .reporting import local_results_dir
from .tracking import DEFAULT_TRACKER, TRACKERS, check_tracker, record_single_run, tracker_location

logger = logging.getLogger(__name__)

SMOKE_SPACE = "smoke"
DEFAULT_SPACE = "default"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_tune.py",
        description="Tune LoRA fine-tuning of a causal LM (Qwen2.5, Qwen3, Llama, Gemma, ...) into a Vietnamese AMR parser (MTUP prompts) with Ray "
                    "Tune (Optuna TPE + ASHA) over Ray Train + DeepSpeed trials; objective: validation "
                    "corpus SMATCH F1 of Task 2. With --no-search, one run of a documented preset.")
    p.add_argument("--model", default=None,
                   help=f"a registry name ({', '.join(sorted(MODELS))}), a hub id (Qwen/Qwen3-8B) or a local "
                        "checkpoint directory (default: the --config file's model, else tiny)")
    p.add_argument("--model-path", help="the model's weights stored apart: a model directory or a single .gguf file")
    p.add_argument("--data-dir", help="corpus directory with train_amr_1.txt and train_amr_2.txt "
                                      f"(default: ${DATA_DIR_ENV}, else the small sample corpus shipped "
                                      "with the package)")
    p.add_argument("--search-space",
                   help=f"a search space shipped with the package ({', '.join(packaged_names(SEARCH_SPACES))}) "
                        f"or a YAML path (default: {DEFAULT_SPACE}; {SMOKE_SPACE} with --smoke-test)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the search space's)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where trials train: gpu, cpu, or auto (the GPUs when the cluster has any; the CPU for "
                        "the tiny model; a real model without a GPU is an error naming --device cpu) "
                        "(default: %(default)s)")
    p.add_argument("--gpus-per-trial", type=_int_or_auto, default="auto",
                   help="GPUs per trial, one per Ray Train worker, or auto: the fewest GPUs on which the memory "
                        "plan fits, with as many trials side by side as the cluster holds (0: CPU only) "
                        "(default: %(default)s)")
    p.add_argument("--workers-per-trial", type=int,
                   help="Ray Train workers per trial (default: the GPUs per trial, or 1)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (fractions allowed)")
    p.add_argument("--zero-stage", type=_stage_flag,
                   help="DeepSpeed ZeRO stage: 2, 3 (spreads 7B over GPUs) or auto (2 when the model, its "
                        "optimizer state and the micro-batch fit one device, else 3; the default)")
    p.add_argument("--storage-path", default=os.environ.get("RAY_MTUP_STORAGE", "runs"),
                   help="where trials keep checkpoints and results: a local path, NFS, or s3:// "
                        "(multi-node clusters need shared storage; default: %(default)s)")
    p.add_argument("--name", help="experiment name (default: <model>-<time>); --resume needs it")
    p.add_argument("--resume", action="store_true", help="resume the interrupted experiment --name")
    p.add_argument("--max-failures", type=int, default=MAX_FAILURES,
                   help="retries of a failed trial or run (default: %(default)s)")
    p.add_argument("--tracker", choices=TRACKERS, default=DEFAULT_TRACKER,
                   help="experiment tracker of a search's trials or of the --no-search run: an MLflow store in "
                        "the experiment directory, TensorBoard, Weights & Biases (needs WANDB_API_KEY) or none "
                        "(default: %(default)s)")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="also score the ensemble of the K best trials (per sentence, the graph they agree on "
                        "most) on the validation and test splits, in the leaderboard and summary.json "
                        "(docs/ensemble.md)")
    p.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="checkpoints each trial keeps: its N best epochs by the objective, and its latest "
                        "(adapter, tokenizer, state; no optimizer state). Disk budget: docs/ensemble.md "
                        "(default: 2)")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"a few tiny trials with short epochs, for CPU (the {SMOKE_SPACE} search space)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS; without it an embedded local Ray starts)")
    p.add_argument("--preset", help=f"a documented preset shipped with the package "
                                    f"({', '.join(packaged_names(PRESETS))}) or a preset YAML path")
    p.add_argument("--no-search", action="store_true",
                   help="run one training of the preset/config, no search (single-preset reproduction)")
    p.add_argument("--test-file", help="a gold file in the corpus format (e.g. the public-test gold) that replaces "
                                       "the held-out test split: the chosen adapter is scored once on it")
    p.add_argument("--config", help="a config YAML (e.g. a search's best_config.yaml) for --no-search")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set eval_max_samples=50 --set lora.r=16")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the config, the devices, GPUs per trial, trials at a time, ZeRO stage, micro-batch "
                        "and the memory plan, print them and exit without training")
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    p.add_argument("--num-gpus", type=int, help="with --dry-run: plan for a cluster of N GPUs (default: the GPUs found)")
    p.add_argument("--device-memory", type=float, metavar="BYTES",
                   help="memory per GPU in bytes, e.g. 141e9 (default: what the GPUs report)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


#: Flags that only a search reads (argparse dest -> flag): with --no-search each is an error.
SEARCH_ONLY_FLAGS = {"search_space": "--search-space", "num_samples": "--num-samples", "resume": "--resume",
                     "smoke_test": "--smoke-test", "ensemble": "--ensemble",
                     "keep_checkpoints": "--keep-checkpoints"}


def check_single_run_flags(args: argparse.Namespace) -> None:
    """With ``--no-search``, a flag only a search reads is a ConfigError naming it (none is
    ignored in silence).

    >>> check_single_run_flags(build_parser().parse_args(["--no-search", "--num-samples", "4"]))
    Traceback (most recent call last):
    ...
    ray_mtup.errors.ConfigError: --num-samples: applies to a search only, not to a --no-search run; drop it or drop --no-search
    """
    given = [flag for dest, flag in SEARCH_ONLY_FLAGS.items() if getattr(args, dest) not in (None, False)]
    if given:
        raise ConfigError(", ".join(given), f"appl{'ies' if len(given) == 1 else 'y'} to a search only, not to a "
                                            "--no-search run; drop it or drop --no-search")


def _int_or_auto(value: str) -> int | str:
    """``--gpus-per-trial``: an integer >= 0, or ``auto``.

    >>> _int_or_auto("2"), _int_or_auto("auto")
    (2, 'auto')
    """
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or auto, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or auto, got {value!r}")
    return number


def _stage_flag(value: str) -> int | str:
    """``--zero-stage``: an integer, or the word as given (the config names a bad one).

    >>> _stage_flag("3"), _stage_flag("auto")
    (3, 'auto')
    """
    return int(value) if value.strip().lstrip("-").isdigit() else value


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key or "--set", f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(key, f"{value!r} is not a valid YAML value ({problem})") from None
    return out


def _absolute(path: str | None) -> str | None:
    return None if path is None or "://" in path else str(Path(path).resolve())


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the flags set explicitly (``--set`` and the resource flags)."""
    overrides: dict[str, Any] = {
        # absolute: Ray workers (and a later `predict`) may not share the driver's directory
        "model_path": _absolute(args.model_path),
        "data_dir": _absolute(args.data_dir),  # else $RAY_MTUP_DATA_DIR: config.with_data_dir
        "test_file": _absolute(args.test_file),
        "zero_stage": args.zero_stage,
        "cpus_per_worker": args.cpus_per_worker,
    }
    if args.workers_per_trial:
        overrides["num_workers"] = args.workers_per_trial
    overrides.update(_parse_set(args.set))
    return {k: v for k, v in overrides.items() if v is not None}


def config_from_args(args: argparse.Namespace, space_overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The run's TrainConfig from flags, resolved and validated once (no Ray needed).

    ``space_overrides``: a search space's ``overrides:``, the layer just below the flags
    (see :func:`ray_mtup.config.resolve_config` for the whole order).
    """
    # a checkpoint directory by its absolute path: Ray workers (and a later `predict`) may not share ours
    model = _absolute(args.model) if args.model and model_kind(args.model) == "directory" else args.model
    cfg = with_data_dir(resolve_config(model, preset=args.preset, config_file=args.config,
                                       space_overrides=space_overrides, overrides=flag_overrides(args)))
    check_model(cfg)
    return cfg


def check_model(cfg: TrainConfig) -> None:
    """For a hub id or a checkpoint directory, read its config.json (no weights) before Ray
    starts: a model that cannot be read, or LoRA targets that are not its linear layers, is a
    ConfigError (a registry model's targets are checked by the config itself)."""
    if cfg.model in MODELS:
        return
    try:
        shape = model_shape(cfg.model, cfg.model_path)
    except ModelError as exc:
        raise ConfigError("model_path" if cfg.model_path else "model", str(exc)) from None
    check_lora_targets(cfg.lora.target_modules, tuple(shape.linear_shapes()), cfg.model)


def check_corpus(cfg: TrainConfig) -> None:
    """Read, split and normalise the corpus in the driver, so that a bad file is reported
    (``CorpusError`` naming file and line) before Ray starts, not as a worker traceback."""
    train, val, test = corpus_splits(cfg)  # read once; to_mtup normalises every graph
    logger.info("corpus: %d training and %d validation graphs; %d test graphs in the %s", len(to_mtup(train)),
                len(to_mtup(val)), len(test), describe(cfg))


#: Run in every process of the embedded Ray (it imports ray_mtup through PYTHONPATH).
RAY_WORKER_SETUP = f"{ray_worker_setup.__module__}.{ray_worker_setup.__name__}"
#: Environment of every Ray process of a run (cluster/runtime_env.yaml sets the same).
RUNTIME_ENV_VARS = {
    "TOKENIZERS_PARALLELISM": "false",
    # Starting a worker imports torch, transformers and deepspeed: on a busy node that can take
    # longer than Ray Train's 60 s default, which then fails the trial for no real reason.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
}


def start_ray(address: str | None) -> None:
    """Connect to ``address``, or start an embedded local Ray with its dashboard on loopback."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard must run: without it a trial that ASHA stops leaks its placement group.
    pythonpath = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")) if p)
    # Ray Train's PlacementGroupCleaner finds "the" cluster through RAY_ADDRESS or, without it, by
    # looking for GCS processes; with another Ray running on the host it fails and a finished
    # trial's placement group leaks, starving every later trial. So the GCS gets a known port
    # and every Ray process gets RAY_ADDRESS pointing at this instance.
    gcs_address = f"127.0.0.1:{_free_port()}"
    env_vars = {"PYTHONPATH": pythonpath, **RUNTIME_ENV_VARS, "RAY_ADDRESS": gcs_address}
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = gcs_address.rsplit(":", 1)[1]
    os.environ["RAY_ADDRESS"] = gcs_address  # inherited by the raylet, so by every worker it starts
    try:
        # address="local": always a new instance, never a `ray start` cluster found in /tmp/ray
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env_vars, "worker_process_setup_hook": RAY_WORKER_SETUP})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        quiet_ray_driver()
    try:
        return _main(args)
    except RayMtupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    storage = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    if args.no_search:
        check_single_run_flags(args)
        check_tracker(args.tracker)
    if args.num_gpus is not None and not args.dry_run:
        raise ConfigError("num_gpus", "--num-gpus plans for a machine you do not have: only with --dry-run")
    if args.json and not args.dry_run:
        raise ConfigError("json", "--json goes with --dry-run")
    # the resource flags first: GPUs that cannot be split over the workers is the error to report
    if isinstance(args.gpus_per_trial, int) and args.workers_per_trial:
        search.check_gpu_split(args.gpus_per_trial, args.workers_per_trial)
    space = None
    if not args.no_search:
        space = search.load_search_space(
            packaged_yaml(SEARCH_SPACES, args.search_space or (SMOKE_SPACE if args.smoke_test else DEFAULT_SPACE)))
    if args.resume and not args.name:
        raise ConfigError("name", "--resume needs the --name of the experiment to resume")
    # the one resolved base; a search's trials add their sampled values
    cfg = config_from_args(args, space.overrides if space is not None else None)
    settings = None if space is None else search.SearchSettings(  # validated before anything starts
        name=_name(args, cfg), storage_path=storage, max_failures=args.max_failures, num_samples=args.num_samples,
        resume=args.resume, tracker=args.tracker, ensemble=args.ensemble,
        **({} if args.keep_checkpoints is None else {"keep_checkpoints": args.keep_checkpoints}))
    remote = bool(args.address) and not args.dry_run and args.num_gpus is None
    launch = None if remote else plan_launch(args, cfg, given_cluster(args))
    if args.dry_run:
        return print_dry_run(args, cfg, launch)
    if launch is not None:
        print(launch.line(), flush=True)
    check_model_files(cfg)  # the model's config and tokenizer resolve, before Ray starts
    search.check_storage(storage)
    check_corpus(cfg)
    start_ray(args.address)
    if launch is None:  # a running cluster: its GPUs are known once connected
        launch = plan_launch(args, cfg, cluster_devices(args))
        print(launch.line(), flush=True)
    cfg = cfg.replace(**launch.overrides())
    if args.no_search:
        return _single(args, cfg, storage, launch)
    settings = dataclasses.replace(settings, workers_per_trial=cfg.num_workers, gpus_per_trial=launch.gpus_per_trial,
                                   launch=launch.to_dict())
    return _search(args, cfg, space, settings)


def given_cluster(args: argparse.Namespace) -> Cluster:
    """The devices to plan for before Ray starts: the flags' (``--num-gpus``), else this machine's."""
    if args.num_gpus is not None:
        if args.num_gpus and args.device_memory is None:
            raise ConfigError("device_memory", "--num-gpus needs --device-memory BYTES (memory per GPU, e.g. 80e9)")
        return Cluster(args.num_gpus, args.device_memory, source="given")
    found = local_gpus()
    if args.device_memory is not None:
        found = Cluster(found.num_gpus, args.device_memory, found.num_cpus, found.gpu_name, found.source)
    return found


def cluster_devices(args: argparse.Namespace) -> Cluster:
    """The connected Ray cluster's GPUs; their memory from ``--device-memory`` or a one-GPU probe."""
    found = ray_gpus(_cluster_resources(), args.device_memory)
    if found.num_gpus and found.device_memory is None and args.gpus_per_trial == "auto":
        found = Cluster(found.num_gpus, probe_gpu_memory(), found.num_cpus, found.gpu_name, found.source)
    return found


def plan_launch(args: argparse.Namespace, cfg: TrainConfig, cluster: Cluster) -> TrialPlan:
    """GPUs per trial, trials at a time, ZeRO stage and micro-batch (:func:`ray_mtup.devices.plan_trials`)."""
    return plan_trials(cfg, cluster, args.gpus_per_trial, args.workers_per_trial, args.device)


def print_dry_run(args: argparse.Namespace, cfg: TrainConfig, launch: TrialPlan | None) -> int:
    """``--dry-run``: the decision, the memory plan and the config the run would use; exit 0."""
    if launch is None:  # pragma: no cover - remote clusters are planned with --num-gpus
        raise ConfigError("address", "a dry run plans for this machine or --num-gpus/--device-memory")
    resolved = cfg.replace(**launch.overrides())
    if args.json:
        print(json.dumps({**launch.to_dict(), "model": cfg.model, "config": resolved.to_dict()}, indent=2))
        return 0
    print(launch.line())
    if launch.memory_plan is not None:
        print(launch.memory_plan.explain())
    for note in launch.notes:
        print(f"note: {note}")
    print("config:")
    import yaml

    print(yaml.safe_dump(resolved.to_dict(), sort_keys=False, allow_unicode=True).rstrip())
    return 0


def _single(args: argparse.Namespace, cfg: TrainConfig, storage: str, launch: TrialPlan) -> int:
    name = _name(args, cfg)
    search.check_resources(_cluster_resources(), cfg, driver_cpu=0.0)
    t0 = time.time()
    out_dir = local_results_dir(f"{storage.rstrip('/')}/{name}")
    summary = trial.run_single(cfg, name=name, storage_path=storage, output_dir=out_dir,
                               max_failures=args.max_failures, launch=launch.to_dict())
    record_single_run(args.tracker, out_dir, name, cfg.to_dict(), summary.history, summary.test)
    print(format_epoch_table(summary.history))
    best = summary.best
    print(f"best epoch {summary.best_epoch}: Task 1 F1 {best['task1_f1']:.4f}, Task 2 F1 {best['task2_f1']:.4f}, "
          f"validity {best['validity']:.3f} (SMATCH mode {best['scoring_mode']}); "
          f"{time.time() - t0:.0f} s; run directory {summary.run_dir}")
    print(format_test_line(best["task2_f1"], summary.test))
    print(f"corpus:  {describe_corpus(cfg)}\ntracker: {tracker_location(args.tracker, out_dir)}")
    if "://" in storage:
        print(f"results: {storage.rstrip('/')}/{name} (config.yaml, metrics.csv, adapter/, summary.json; "
              f"a copy of {summary.run_dir})")
    return 0


def _search(args: argparse.Namespace, cfg: TrainConfig, space: Any, settings: Any) -> int:
    t0 = time.time()
    summary = search.run_search(cfg, space, settings)
    best = summary.get("best_metrics") or {}
    noise = summary.get("noise", {})
    baseline = (summary.get("baseline") or {}).get("task2_f1", float("nan"))
    print(f"search {settings.name}: {summary['n_trials']} trials in {time.time() - t0:.0f} s; best "
          f"{summary.get('best_trial')} validation Task 2 F1 {best.get('task2_f1', float('nan')):.4f} "
          f"(95% CI {format_interval(noise.get('ci95'))}); most-frequent-graph baseline {baseline:.4f}")
    if "test" in summary:
        print(format_test_line(best.get("task2_f1"), summary["test"]))
    print(closing_note(summary, args.tracker, describe_corpus(cfg)))
    if summary["n_errors"]:
        print(f"error: {summary['n_errors']} of {summary['n_trials']} trials failed; see results.csv",
              file=sys.stderr)
        return 1
    if summary.get("best_trial") is None:
        print(f"error: no trial produced a usable result (every one of the {summary['n_trials']} stopped "
              "before a finite-loss epoch); see stop_reason in results.csv", file=sys.stderr)
        return 1
    return 0


def _name(args: argparse.Namespace, cfg: TrainConfig) -> str:
    """``--name``, else the model's last path part (a hub id's or a directory's) and the time."""
    return args.name or f"{Path(cfg.model.rstrip('/')).name.lower()}-{time.strftime('%Y%m%d-%H%M%S')}"


def closing_note(summary: Mapping[str, Any], tracker: str, corpus: str) -> str:
    """The corpus a search used (:func:`ray_mtup.holdout.describe_corpus`), and where its
    results, plots and tracker store are (the last lines a user sees)."""
    results = local_results_dir(summary["experiment_dir"])
    plots = ", ".join(Path(p).name for p in summary.get("plots", [])) or "none"
    return (f"corpus:  {corpus}\n"
            f"results: {summary['experiment_dir']} (results.csv, summary.json, best_config.yaml, "
            f"test_predictions.jsonl)\n"
            f"plots:   {plots} in {results}\n"
            f"tracker: {tracker_location(tracker, results)}")


def _cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()

