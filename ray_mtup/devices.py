"""Devices: one rule for where a run trains, and how many GPUs each trial gets.

Every launcher (the search and the single run of ``run_tune.py``, the torchrun worker
``python -m ray_mtup.worker``, ``predict``) asks :func:`resolve_device` where to run, with
``--device auto|gpu|cpu``:

* ``cpu``: the CPU, whatever GPUs there are (fp32; slow for a real model);
* ``gpu``: the GPUs; an error when there are none (an explicit ``--gpus-per-trial N`` is
  taken as given: an autoscaling cluster may add the GPU nodes later);
* ``auto`` (the default): the GPUs when there are any; otherwise the CPU for the ``tiny``
  test model, and for a real model a :class:`~ray_mtup.errors.ConfigError` (exit 2) that says
  no GPU was found and how to go on (:data:`NO_GPU`): never days of silent fp32 training.

Before Ray Train starts, :func:`plan_trials` decides the GPUs per trial and the trials at a
time: with ``--gpus-per-trial auto`` (the default) the fewest GPUs on which the memory plan
(:mod:`ray_mtup.memory`) fits, planned at ``max_seq_len`` (no training example is longer),
and as many such trials side by side as the cluster holds. An explicit integer is never
changed. The decision (:class:`TrialPlan`) is printed in one line (:meth:`TrialPlan.line`),
written to summary.json, and handed to the trials as ``num_workers``, ``use_gpu`` and, when
it was ``auto``, ``zero_stage``; the workers plan the micro-batch again from the sequences
they really encoded (:func:`ray_mtup.memory.resolve_auto`).

The GPUs come from the Ray cluster (``ray.cluster_resources()``) or, before a local Ray
starts, from ``nvidia-smi`` (:func:`local_gpus`); ``--num-gpus`` and ``--device-memory``
plan for a machine one does not have (``--dry-run``).

>>> cluster = Cluster(num_gpus=4, device_memory=141e9, num_cpus=64, gpu_name="H200")
>>> plan = plan_trials(TrainConfig(model="qwen2.5-7b", per_device_batch_size="auto"), cluster)
>>> plan.gpus_per_trial, plan.concurrent_trials, plan.zero_stage
(1, 4, 2)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from . import memory
from .config import TrainConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
Device = Literal["auto", "gpu", "cpu"]
#: The model that runs on the CPU by default (a few million parameters).
CPU_MODEL = "tiny"
#: What a Tune trial's own function holds (== ray_mtup.search.TRIAL_DRIVER_CPU).
TRIAL_DRIVER_CPU = 0.01
NO_GPU = ("no GPU found {where} for model {model}: a model of this size trains for days on the CPU. "
          "To train on the CPU anyway, pass --device cpu; on an autoscaling cluster whose GPU nodes are not "
          "up yet, pass --gpus-per-trial N (GPUs per trial, e.g. 1).")


@dataclass(frozen=True)
class Cluster:
    """The GPUs (and CPUs) a run may use; ``device_memory`` is bytes per GPU (None: unknown)."""

    num_gpus: int
    device_memory: float | None = None
    num_cpus: float = 0.0
    gpu_name: str | None = None
    source: str = "given"  # where the figures came from: local (nvidia-smi), ray, given (flags)

    def describe(self) -> str:
        """``4 GPUs (H200, 141 GB each)``.

        >>> Cluster(1, 80e9, gpu_name="A100").describe(), Cluster(0, num_cpus=2).describe()
        ('1 GPU (A100, 80 GB each)', 'no GPU, 2 CPUs')
        """
        if not self.num_gpus:
            return f"no GPU, {self.num_cpus:g} CPUs"
        size = f"{self.device_memory / 1e9:.0f} GB each" if self.device_memory else "memory unknown"
        name = f"{self.gpu_name}, " if self.gpu_name else ""
        return f"{self.num_gpus} GPU{'s' if self.num_gpus != 1 else ''} ({name}{size})"


def resolve_device(requested: str, model: str, num_gpus: int, gpus_per_trial: int | str = "auto",
                   where: str = "in the Ray cluster") -> str:
    """``gpu`` or ``cpu``: the one rule of every launcher (see the module docstring).

    >>> resolve_device("auto", "qwen2.5-7b", 4), resolve_device("auto", "tiny", 0), resolve_device("cpu", "qwen2.5-7b", 4)
    ('gpu', 'cpu', 'cpu')
    >>> resolve_device("auto", "qwen2.5-7b", 0, gpus_per_trial=2), resolve_device("auto", "qwen2.5-7b", 4, gpus_per_trial=0)
    ('gpu', 'cpu')
    >>> resolve_device("auto", "qwen2.5-7b", 0)
    Traceback (most recent call last):
    ...
    ray_mtup.errors.ConfigError: device: no GPU found in the Ray cluster for model qwen2.5-7b: ...
    """
    if requested not in DEVICES:
        raise ConfigError("device", f"must be one of {list(DEVICES)}, got {requested!r}")
    explicit = gpus_per_trial if isinstance(gpus_per_trial, int) else None
    if requested == "cpu":
        if explicit:
            raise ConfigError("gpus_per_trial", f"--device cpu and --gpus-per-trial {explicit} contradict each other")
        return "cpu"
    if explicit == 0:  # --gpus-per-trial 0: the CPU, as it always meant
        if requested == "gpu":
            raise ConfigError("gpus_per_trial", "--device gpu and --gpus-per-trial 0 contradict each other")
        return "cpu"
    if num_gpus > 0 or explicit:
        return "gpu"
    if requested == "gpu":
        raise ConfigError("device", f"--device gpu, but no GPU found {where}; on an autoscaling cluster whose "
                                    "GPU nodes are not up yet, pass --gpus-per-trial N")
    if model == CPU_MODEL:
        return "cpu"
    raise ConfigError("device", NO_GPU.format(where=where, model=model))


@dataclass(frozen=True)
class TrialPlan:
    """What the launcher decided before Ray Train starts (printed once, kept in summary.json)."""

    device: str
    cluster: Cluster
    gpus_per_trial: int
    workers_per_trial: int
    concurrent_trials: int
    zero_stage: int | str
    micro_batch_size: int | str
    grad_accum: int | None
    global_batch_size: int
    seq_len: int | None = None
    memory_plan: memory.MemoryPlan | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def line(self) -> str:
        """The decision in one line.

        >>> TrialPlan("gpu", Cluster(4, 141e9, gpu_name="H200"), 1, 1, 4, 2, 8, 2, 16).line()
        '4 GPUs (H200, 141 GB each): 1 GPU per trial, 4 trials at a time, ZeRO-2, micro-batch 8 x accumulation 2'
        """
        if self.device == "cpu":
            head = (f"CPU ({self.cluster.describe()}): {self.workers_per_trial} worker(s) per trial, "
                    f"{self.concurrent_trials} trial(s) at a time")
        else:
            head = (f"{self.cluster.describe()}: {self.gpus_per_trial} GPU{'s' if self.gpus_per_trial != 1 else ''}"
                    f" per trial, {self.concurrent_trials} trial{'s' if self.concurrent_trials != 1 else ''} at a time")
        stage = f"ZeRO-{self.zero_stage}" if self.zero_stage != "auto" else "ZeRO stage planned by the workers"
        if self.grad_accum is not None:
            micro = f"micro-batch {self.micro_batch_size} x accumulation {self.grad_accum}"
        elif self.micro_batch_size == "auto":
            micro = "micro-batch planned by the workers"
        else:
            micro = f"micro-batch {self.micro_batch_size}"
        return f"{head}, {stage}, {micro}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (``--dry-run --json``, summary.json's ``launch``)."""
        return {
            "device": self.device, "num_gpus": self.cluster.num_gpus, "device_memory": self.cluster.device_memory,
            "gpu_name": self.cluster.gpu_name, "devices_from": self.cluster.source,
            "gpus_per_trial": self.gpus_per_trial, "workers_per_trial": self.workers_per_trial,
            "concurrent_trials": self.concurrent_trials, "zero_stage": self.zero_stage,
            "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
            "global_batch_size": self.global_batch_size, "seq_len": self.seq_len, "line": self.line(),
            "notes": list(self.notes),
            "explain": self.memory_plan.explain() if self.memory_plan is not None else None,
            "memory_plan": self.memory_plan.to_dict() if self.memory_plan is not None else None,
        }

    def overrides(self) -> dict[str, Any]:
        """The TrainConfig fields the decision sets (num_workers, use_gpu, zero_stage)."""
        out: dict[str, Any] = {"num_workers": self.workers_per_trial, "use_gpu": self.device == "gpu"}
        if self.device == "gpu" and self.zero_stage != "auto":
            out["zero_stage"] = self.zero_stage
        return out


def concurrent_trials(cluster: Cluster, gpus: int, workers: int, cpus_per_worker: float,
                      driver_cpu: float = TRIAL_DRIVER_CPU) -> int:
    """Trials that fit side by side: by GPUs (with ``gpus``), and by CPUs when they are known.

    >>> concurrent_trials(Cluster(8, num_cpus=64), 1, 1, 1.0), concurrent_trials(Cluster(8, num_cpus=4), 1, 1, 1.0)
    (8, 3)
    >>> concurrent_trials(Cluster(0, num_cpus=2), 0, 1, 0.9)
    2
    """
    fit = math.inf
    if cluster.num_cpus:
        fit = math.floor(cluster.num_cpus / (workers * cpus_per_worker + driver_cpu) + 1e-9)
    if gpus:
        fit = min(fit, cluster.num_gpus // gpus)
    return int(fit) if fit != math.inf else 1


def gpu_counts(num_gpus: int, global_batch_size: int) -> list[int]:
    """GPUs per trial to try, fewest first: the powers of two up to the cluster's GPUs (at least
    one) that divide the global batch.

    >>> gpu_counts(4, 16), gpu_counts(8, 12), gpu_counts(0, 16)
    ([1, 2, 4], [1, 2, 4], [1])
    """
    counts, g = [], 1
    while g <= max(num_gpus, 1):
        if global_batch_size % g == 0:
            counts.append(g)
        g *= 2
    return counts


def plan_trials(cfg: TrainConfig, cluster: Cluster, gpus_per_trial: int | str = "auto",
                workers_per_trial: int | None = None, device: str = "auto",
                shape: memory.ModelShape | None = None, seq_len: int | None = None) -> TrialPlan:
    """The decision for ``cfg`` on ``cluster`` (see the module docstring); ``shape``: the model's
    (default: :func:`ray_mtup.memory.model_shape` of ``cfg``), ``seq_len``: the sequence length
    to plan at (default: ``cfg.max_seq_len``)."""
    where = "on this machine" if cluster.source == "local" else (
        "in the Ray cluster" if cluster.source == "ray" else "(--num-gpus 0)")
    chosen = resolve_device(device, cfg.model, cluster.num_gpus, gpus_per_trial, where)
    if chosen == "cpu":
        workers = workers_per_trial or cfg.num_workers
        return TrialPlan("cpu", cluster, 0, workers, concurrent_trials(cluster, 0, workers, cfg.cpus_per_worker),
                         cfg.zero_stage, cfg.per_device_batch_size, None, cfg.global_batch_size)
    seq_len = seq_len or cfg.max_seq_len
    notes: list[str] = []
    if cluster.device_memory is None:
        if gpus_per_trial == "auto":
            raise ConfigError("device_memory", f"the GPUs' memory is unknown ({cluster.describe()}); pass "
                                               "--device-memory BYTES (e.g. 80e9) or --gpus-per-trial N")
        g = int(gpus_per_trial)
        workers = workers_per_trial or g
        notes.append("device memory unknown: the workers plan the ZeRO stage and micro-batch")
        return TrialPlan("gpu", cluster, g, workers, concurrent_trials(cluster, g, workers, cfg.cpus_per_worker),
                         cfg.zero_stage, cfg.per_device_batch_size, None, cfg.global_batch_size, seq_len,
                         notes=tuple(notes))
    shape = shape or memory.model_shape(cfg.model, cfg.model_path)
    if gpus_per_trial == "auto":
        counts = [workers_per_trial] if workers_per_trial else gpu_counts(cluster.num_gpus, cfg.global_batch_size)
    else:
        counts = [int(gpus_per_trial)]
    plan, g, workers = None, counts[0], workers_per_trial or counts[0]
    for g in counts:
        workers = workers_per_trial or g
        plan = memory.plan_for_config(cfg.replace(num_workers=workers), shape, world=workers,
                                      free_bytes=cluster.device_memory, total_bytes=cluster.device_memory,
                                      on_gpu=True, seq_len=seq_len)
        if plan.fits:
            break
    if plan is None:  # no count divides the global batch
        raise ConfigError("global_batch_size", f"{cfg.global_batch_size} cannot be split over 1, 2, 4... GPUs")
    if not plan.fits:
        notes.append(f"the memory plan does not fit on {g} GPU(s) of {cluster.device_memory / 1e9:.0f} GB: "
                     "expect out of memory (see the plan's notes)")
    if cluster.num_gpus and g > cluster.num_gpus:
        notes.append(f"a trial needs {g} GPUs, the cluster has {cluster.num_gpus} now")
    return TrialPlan("gpu", cluster, g, workers, concurrent_trials(cluster, g, workers, cfg.cpus_per_worker),
                     plan.zero_stage, plan.micro_batch_size, plan.grad_accum, cfg.global_batch_size, seq_len,
                     plan, tuple(notes))


# --------------------------------------------------------------------------- finding the GPUs


def local_gpus() -> Cluster:
    """This machine's GPUs from ``nvidia-smi`` (no CUDA context is created in this process,
    which would hold memory on GPU 0 for the whole run), limited to ``CUDA_VISIBLE_DEVICES``."""
    cpus = float(os.cpu_count() or 1)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return Cluster(0, num_cpus=cpus, source="local")
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed (%s): no GPU assumed", exc)
        return Cluster(0, num_cpus=cpus, source="local")
    rows = [line.rsplit(",", 1) for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        rows = rows[:len([v for v in visible.split(",") if v.strip()])]
    if not rows:
        return Cluster(0, num_cpus=cpus, source="local")
    memory_mib = min(float(r[1]) for r in rows)
    return Cluster(len(rows), memory_mib * 2**20, cpus, rows[0][0].strip().removeprefix("NVIDIA "), "local")


def ray_gpus(resources: Mapping[str, float], device_memory: float | None = None) -> Cluster:
    """The cluster's GPUs from ``ray.cluster_resources()``; the GPU model from Ray's
    ``accelerator_type:*`` resource. The memory per GPU is ``device_memory`` or, without it,
    what :func:`probe_gpu_memory` reads on a GPU node.

    >>> ray_gpus({"CPU": 64.0, "GPU": 4.0, "accelerator_type:H200": 1.0}, 141e9).describe()
    '4 GPUs (H200, 141 GB each)'
    """
    name = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None)
    return Cluster(int(resources.get("GPU", 0)), device_memory, float(resources.get("CPU", 0.0)), name, "ray")


def probe_gpu_memory(timeout_s: float = 120.0) -> float | None:
    """Total memory of one of the cluster's GPUs (bytes), read by a one-GPU Ray task; None when
    no GPU node answers within ``timeout_s`` (an autoscaling cluster before its GPU nodes are up)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def _total() -> float:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)

    ref = _total.remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None
