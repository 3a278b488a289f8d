"""Helpers of ``bench/gpu_check.sh`` (the one-shot GPU check): results file, wheels, the
random-init checkpoint and config of the loop steps, and the 7B projection.

    python bench/gpu_check.py check-wheels bench/wheels      # fails, naming them, if wheels are missing
    python bench/gpu_check.py wheels bench/wheels            # carried wheels this Python lacks
    python bench/gpu_check.py installed bench/wheels [W...]  # the install step's record (JSON line)
    python bench/gpu_check.py imports                        # the worker path imports (JSON line)
    python bench/gpu_check.py checkpoint --shape qwen2.5-1.5b --out DIR --device cuda
    python bench/gpu_check.py loop-config --checkpoint DIR --out run.yaml --device cuda [--set K=V ...]
    python bench/gpu_check.py loop-record RUN_DIR [--config run.yaml]   # the run's figures and options
    python bench/gpu_check.py record --results R --step NAME --stdout F --stderr F --rc N --started T --ended T
    python bench/gpu_check.py project --results R            # projection + targets into R

The results file is one JSON object keyed by step (``env``, ``install``, ``imports``,
``train``, ``generate``, ``checkpoint``, ``loop``, ``replica``, ``resume``, ``speedups``,
``projection``); each step holds the JSON lines its
commands printed (``records``), its exit code, start and end times and, when it failed, the
tail of its standard error (``error``). It is rewritten after every step, so a check cut
short keeps what it measured. Nothing here imports Ray, DeepSpeed or pydantic at module level:
``wheels`` and ``record`` run before those are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launched as a script: make the package and bench.common importable
    sys.path.insert(0, str(REPO))

#: What the projection assumes of a 7B full_training run on the VLSP corpus (docs/benchmarks.md):
#: training tokens per epoch, validation graphs generated per epoch, new tokens per graph.
TOKENS_PER_EPOCH_7B = 300_000
EVAL_GRAPHS = 184
EVAL_NEW_TOKENS = 128
PROJECTED_EPOCHS = 10
#: The targets: the planned DeepSpeed step at least as fast as plain peft, evaluation generation
#: 5x HF's default, 7B full_training within 15 minutes on one GPU.
TARGETS = {"train_planned_over_plain": 1.0, "generate_project_over_hf_default": 5.0, "projected_minutes_7b": 15.0}

#: Distributions bench/build_wheels.sh carries (its MANIFEST lists them with their pinned
#: versions); the install step fails, naming them, when any is absent.
REQUIRED_WHEELS = ("deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                   "typing-extensions", "hjson", "ninja", "py-cpuinfo", "msgpack", "einops", "nvidia-ml-py",
                   "penman", "smatch", "bm25s", "llguidance", "liger-kernel")
MANIFEST = "MANIFEST"

#: Modules the torchrun worker path needs (checked by ``imports``); Ray and MLflow must stay out.
WORKER_MODULES = ("torch", "transformers", "peft", "deepspeed", "pydantic", "penman", "smatch", "yaml",
                  "safetensors", "tokenizers", "filelock", "ray_mtup.worker", "ray_mtup.training",
                  "ray_mtup.holdout", "ray_mtup.predict")
OPTIONAL_MODULES = ("bm25s", "llguidance", "liger_kernel", "accelerate", "triton")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Written to a temporary name, then renamed: a killed check never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one per line in ``text`` (other lines are skipped).

    >>> json_lines('log line\\n{"bench": "train", "tokens_per_s": 12.5}\\n{bad\\n')
    [{'bench': 'train', 'tokens_per_s': 12.5}]
    """
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def step_entry(stdout: str, stderr: str, rc: int, started: float, ended: float) -> dict[str, Any]:
    """One step's entry of the results file.

    >>> e = step_entry('{"x": 1}', "Traceback...\\nValueError: boom", 1, 10.0, 12.5)
    >>> e["records"], e["rc"], e["seconds"], e["error"].splitlines()[-1]
    ([{'x': 1}], 1, 2.5, 'ValueError: boom')
    >>> "error" in step_entry("", "warnings only", 0, 0.0, 1.0)
    False
    """
    entry: dict[str, Any] = {
        "records": json_lines(stdout), "rc": rc, "seconds": round(ended - started, 1),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ended)),
    }
    if rc != 0:
        reason = {124: "timed out", 137: "killed (time limit or memory)"}.get(rc, f"exit code {rc}")
        entry["error"] = f"{reason}\n" + "\n".join(stderr.strip().splitlines()[-25:])
    return entry


# --- environment and wheels ------------------------------------------------------------------


def gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def versions(names: Sequence[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def env_record(shape: str, device: str, caps: Sequence[str] = ()) -> dict[str, Any]:
    import platform

    step_caps = {k: int(v) for k, _, v in (c.partition("=") for c in caps)}
    return {"started": now(), "shape": shape, "device": device, "gpu": gpu_name(),
            "caps_s": step_caps, "caps_total_s": sum(step_caps.values()),
            "python": platform.python_version(), "host_cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            **versions(("torch", "transformers", "peft", "accelerate", "triton", "deepspeed", "pydantic"))}


def _canonical(name: str) -> str:
    """A distribution name in canonical form (PEP 503).

    >>> _canonical("Py_CPUInfo"), _canonical("pydantic_core")
    ('py-cpuinfo', 'pydantic-core')
    """
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def read_manifest(folder: Path) -> dict[str, str]:
    """``{distribution: version}`` from the folder's MANIFEST (``name==version`` per line)."""
    out = {}
    for line in (folder / MANIFEST).read_text(encoding="utf-8").splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            out[_canonical(name)] = version.strip()
    return out


def missing_wheels(folder: Path) -> list[str]:
    """What the carried wheels folder lacks, one message each (empty: complete).

    Complete means: the folder and its MANIFEST exist, every MANIFEST entry has its wheel file,
    and every distribution of :data:`REQUIRED_WHEELS` is in the MANIFEST.
    """
    if not folder.is_dir():
        return [f"{folder} is missing: run `bash bench/build_wheels.sh` where the package registry is "
                f"reachable, and carry {folder} with the tree"]
    if not (folder / MANIFEST).is_file():
        return [f"{folder / MANIFEST} is missing: {folder} was not filled by bench/build_wheels.sh"]
    manifest = read_manifest(folder)
    present: dict[str, str] = {}
    for wheel in folder.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        present[_canonical(name)] = version
    problems = [f"{name}=={version}: no wheel in {folder}" for name, version in sorted(manifest.items())
                if present.get(name) != version]
    problems += [f"{name}: not in {folder / MANIFEST}" for name in REQUIRED_WHEELS if name not in manifest]
    return problems


def installed_record(folder: Path, installed: Sequence[str]) -> dict[str, Any]:
    """The install step's record: the manifest's pins, what was installed, what the image had."""
    manifest = read_manifest(folder)
    names = {Path(w).name for w in installed}
    return {"bench": "install", "manifest": manifest, "installed": sorted(names),
            "already_present": sorted(n for n in manifest if not any(_canonical(w.split("-")[0]) == n for w in names))}


def wheels_to_install(folder: Path) -> list[Path]:
    """The carried wheels whose distribution this Python lacks, or has at an older version,
    and whose tags it supports (a wheel for another platform is skipped with a note)."""
    from importlib import metadata

    try:
        from packaging.tags import sys_tags
        from packaging.utils import canonicalize_name, parse_wheel_filename
        from packaging.version import Version
    except ImportError:  # a bare venv: pip's own copy
        from pip._vendor.packaging.tags import sys_tags  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

    supported = set(sys_tags())
    chosen = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & supported:
            print(f"skipping {wheel.name}: not for this Python/platform", file=sys.stderr)
            continue
        try:
            installed = Version(metadata.version(canonicalize_name(name)))
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed < version:
            chosen.append(wheel)
    return chosen


def imports_record() -> dict[str, Any]:
    """Import the worker path; fails (ImportError) when a needed module is missing."""
    import importlib

    t0 = time.perf_counter()
    for name in WORKER_MODULES:
        importlib.import_module(name)
    optional = {}
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
            optional[name] = True
        except Exception as exc:  # noqa: BLE001  (an optional speed-up: record why it is off)
            optional[name] = f"{type(exc).__name__}: {exc}"[:200]
    loaded = {m.split(".")[0] for m in sys.modules}
    import torch

    return {"bench": "imports", "seconds": round(time.perf_counter() - t0, 1),
            "cuda": torch.cuda.is_available(), "optional": optional,
            "ray_imported": "ray" in loaded, "mlflow_imported": "mlflow" in loaded,
            **versions(("torch", "transformers", "peft", "deepspeed", "pydantic", "penman", "smatch"))}


# --- the loop step ---------------------------------------------------------------------------

#: The loop step's run: one short epoch of the real loop (few optimiser steps, a handful of
#: evaluation rows, a small test split). Options of issue 13's other parts are added with
#: ``--set`` by gpu_check.sh (its ``LOOP_SET`` block), not here.
LOOP_OVERRIDES: dict[str, Any] = {
    "epochs": 1, "max_samples": 120, "per_device_batch_size": 4, "global_batch_size": 16,
    "max_steps_per_epoch": 4, "eval_max_samples": 8, "eval_batch_size": 8, "max_new_tokens": 64,
    "max_seq_len": 512, "num_workers": 1,
}


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, VALUE read as YAML (the launcher's ``--set``).

    >>> parse_set(["zero_stage=3", "lora.r=16", "packing=true"])
    {'zero_stage': 3, 'lora.r': 16, 'packing': True}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings (``lora.r`` -> ``{"lora": {"r": ...}}``).

    >>> nest({"lora.r": 16, "epochs": 1})
    {'lora': {'r': 16}, 'epochs': 1}
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def loop_config(checkpoint: Path, device: str, sets: Sequence[str]) -> Any:
    """The TrainConfig of the loop step: Qwen2.5-1.5B's documented optimum on ``checkpoint``,
    the sample corpus, bf16 on GPU."""
    from ray_mtup.config import resolve_config

    overrides = {**LOOP_OVERRIDES, "model_path": str(checkpoint.resolve()), "use_gpu": device == "cuda",
                 "cpus_per_worker": 1.0 if device == "cuda" else float(max(1, os.cpu_count() or 1))}
    return resolve_config("qwen2.5-1.5b", overrides=nest({**overrides, **parse_set(sets)}))


def write_checkpoint(shape: str, out: Path, device: str, seed: int = 42) -> dict[str, Any]:
    """A random-init checkpoint of ``shape`` (a Qwen2.5 name, or ``tiny``) with the project's
    small BPE trained on the sample corpus (:func:`ray_mtup.modeling.write_random_checkpoint`)."""
    import torch

    from bench.common import QWEN25_DIMS, qwen25_config
    from ray_mtup.config import TinyModelSettings, TrainConfig
    from ray_mtup.dataset import load_examples, tokenizer_texts
    from ray_mtup.modeling import write_random_checkpoint

    t0 = time.perf_counter()
    train, _, _ = load_examples(TrainConfig())
    tiny = TinyModelSettings()
    if shape in QWEN25_DIMS:
        c = qwen25_config(shape)
        dims = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                    num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                    max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                    rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings)
    else:
        dims = dict(hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                    num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
                    num_key_value_heads=max(1, tiny.num_heads // 2), max_position_embeddings=4096,
                    tie_word_embeddings=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    write_random_checkpoint(out, tokenizer_texts(train), tiny.vocab_size, seed, dims, device=device, dtype=dtype)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"bench": "checkpoint", "shape": shape, "dtype": str(dtype).removeprefix("torch."),
            "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}


#: The options a loop run asks for, recorded beside what the run resolved them to.
REQUESTED_OPTIONS = ("zero_stage", "per_device_batch_size", "global_batch_size", "packing", "liger_kernel",
                     "eval_generation", "gradient_checkpointing", "epochs")


def loop_record(run_dir: Path, config: Path | None = None) -> dict[str, Any]:
    """The figures of a loop run directory: every key of the last epoch's metrics (the resolved
    stage, micro-batch, accumulation, packing, Liger, evaluation path and attention among them),
    what the config asked for, the memory plan, the epochs this invocation trained (a resumed
    run starts after its checkpoint) and the test figure."""
    import yaml

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = history[-1]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    test = summary.get("test") or {}
    requested = {}
    if config is not None and config.is_file():
        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        requested = {k: cfg.get(k) for k in REQUESTED_OPTIONS}
    plan = summary.get("memory_plan") or {}
    checkpoints = sorted(run_dir.glob("checkpoint_*/trainer_state.json"))
    state = json.loads(checkpoints[-1].read_text(encoding="utf-8")) if checkpoints else {}
    return {"bench": "loop", **last, "requested": requested,
            "epochs_recorded": [h.get("epoch") for h in history],
            "resumed_from_epoch": state.get("resumed_from_epoch"),
            "memory_plan": {k: plan.get(k) for k in ("zero_stage", "micro_batch_size", "grad_accum", "fits",
                                                     "seq_len", "gradient_checkpointing")} if plan else None,
            "test_time_s": test.get("time_s"), "test_graphs": test.get("n_graphs"), "test_error": test.get("error"),
            "adapter_written": (run_dir / "adapter" / "adapter_model.safetensors").is_file()}


# --- projection ------------------------------------------------------------------------------


def _find(results: dict[str, Any], step: str, bench: str, variant: str | None = None) -> dict[str, Any]:
    for record in (results.get(step) or {}).get("records", []):
        if record.get("bench") == bench and (variant is None or record.get("variant") == variant):
            return record
    return {}


def projection(results: dict[str, Any]) -> dict[str, Any]:
    """The 7B full_training projection and the targets, from the measured figures.

    Per epoch: ``TOKENS_PER_EPOCH_7B`` at the planned DeepSpeed step's training tokens/s (the
    train step's ``micro_auto`` variant), plus the evaluation generation's seconds for
    ``EVAL_GRAPHS`` graphs (the generate step's ``project`` variant, scaled from the prompts it
    ran; its new tokens per graph are those of real completions); times ``PROJECTED_EPOCHS``.
    ``arithmetic`` spells it out. Only a 7B-shaped check measures the 7B figure (``shape``).

    >>> r = {"env": {"shape": "gpu"},
    ...      "train": {"records": [{"bench": "train_micro_batch", "variant": "micro_auto", "tokens_per_s": 2000.0,
    ...                             "zero_stage": 2, "micro": 8, "accum": 2},
    ...                            {"bench": "micro_batch_ratio", "planned_over_plain": 1.1}]},
    ...      "generate": {"records": [{"bench": "generate", "variant": "project", "seconds": 23.0, "prompts": 184,
    ...                                "new_tokens": 23552, "new_tokens_per_s": 1024.0},
    ...                               {"bench": "generate_ratio", "project_over_hf_default": 6.0}]}}
    >>> p = projection(r)
    >>> p["minutes"], p["targets_met"]
    (28.83, {'train_planned_over_plain': True, 'generate_project_over_hf_default': True, 'projected_minutes_7b': False})
    >>> p["arithmetic"]
    '10 epochs x (300000 tokens / 2000.0 tokens/s = 150.0 s + 184 graphs x 23.0 s / 184 graphs = 23.0 s) = 1730.0 s = 28.83 min'
    """
    train = _find(results, "train", "train_micro_batch", "micro_auto")
    ratio = _find(results, "train", "micro_batch_ratio")
    gen = _find(results, "generate", "generate", "project")
    gen_ratio = _find(results, "generate", "generate_ratio")
    out: dict[str, Any] = {
        "shape": (results.get("env") or {}).get("shape"), "epochs": PROJECTED_EPOCHS,
        "tokens_per_epoch": TOKENS_PER_EPOCH_7B, "eval_graphs": EVAL_GRAPHS,
        "train_tokens_per_s_planned": train.get("tokens_per_s"),
        "train_plan": {k: train.get(k) for k in ("zero_stage", "micro", "accum", "gradient_checkpointing")},
        "generate_new_tokens_per_s": gen.get("new_tokens_per_s"),
        "note": "padding, validation loss, checkpoints and the test scoring are left out; "
                "a figure from a shape other than 7B is not the 7B projection",
    }
    if train.get("tokens_per_s") and gen.get("seconds") and gen.get("prompts"):
        train_s = TOKENS_PER_EPOCH_7B / train["tokens_per_s"]
        eval_s = EVAL_GRAPHS * gen["seconds"] / gen["prompts"]
        total = PROJECTED_EPOCHS * (train_s + eval_s)
        out.update(train_s_per_epoch=round(train_s, 1), eval_s_per_epoch=round(eval_s, 1),
                   minutes=round(total / 60, 2),
                   arithmetic=(f"{PROJECTED_EPOCHS} epochs x ({TOKENS_PER_EPOCH_7B} tokens / {train['tokens_per_s']} "
                               f"tokens/s = {train_s:.1f} s + {EVAL_GRAPHS} graphs x {gen['seconds']} s / "
                               f"{gen['prompts']} graphs = {eval_s:.1f} s) = {total:.1f} s = {total / 60:.2f} min"))
    measured = {"train_planned_over_plain": ratio.get("planned_over_plain"),
                "generate_project_over_hf_default": gen_ratio.get("project_over_hf_default"),
                "projected_minutes_7b": out.get("minutes")}
    out["targets"] = TARGETS
    out["measured"] = measured
    out["targets_met"] = {k: (None if v is None else (v <= TARGETS[k] if k == "projected_minutes_7b" else v >= TARGETS[k]))
                          for k, v in measured.items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--shape", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--caps", nargs="*", default=[], metavar="STEP=SECONDS")
    p = sub.add_parser("wheels")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("check-wheels")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("installed")
    p.add_argument("folder", type=Path)
    p.add_argument("wheels", nargs="*")
    sub.add_parser("imports")
    p = sub.add_parser("checkpoint")
    p.add_argument("--shape", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("loop-config")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("loop-record")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config", type=Path, default=None)
    p = sub.add_parser("record")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--step", required=True)
    p.add_argument("--stdout", type=Path, required=True)
    p.add_argument("--stderr", type=Path, required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--started", type=float, required=True)
    p.add_argument("--ended", type=float, required=True)
    p = sub.add_parser("project")
    p.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "env":
        write_results(args.results, {"env": env_record(args.shape, args.device, args.caps)})
    elif args.command == "check-wheels":
        problems = missing_wheels(args.folder)
        for problem in problems:
            print(f"missing wheel: {problem}", file=sys.stderr)
        return 1 if problems else 0
    elif args.command == "installed":
        print(json.dumps(installed_record(args.folder, args.wheels)), flush=True)
    elif args.command == "wheels":
        print("\n".join(str(w) for w in wheels_to_install(args.folder)))
    elif args.command == "imports":
        print(json.dumps(imports_record()), flush=True)
    elif args.command == "checkpoint":
        print(json.dumps(write_checkpoint(args.shape, args.out, args.device)), flush=True)
    elif args.command == "loop-config":
        loop_config(args.checkpoint, args.device, args.set).write_yaml(args.out, "the GPU check's loop step")
    elif args.command == "loop-record":
        print(json.dumps(loop_record(args.run_dir, args.config), default=str), flush=True)
    elif args.command == "record":
        read = lambda p: p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""  # noqa: E731
        results = read_results(args.results)
        results[args.step] = step_entry(read(args.stdout), read(args.stderr), args.rc, args.started, args.ended)
        write_results(args.results, results)
    elif args.command == "project":
        results = read_results(args.results)
        results["projection"] = projection(results)
        results.setdefault("env", {})["ended"] = now()
        write_results(args.results, results)
        print(json.dumps({"bench": "gpu_check_projection", **results["projection"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
