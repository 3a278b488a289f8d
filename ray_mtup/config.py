"""Frozen configuration models (pydantic v2): the one home of every default.

A run is described by a :class:`TrainConfig`. pydantic coerces and validates every value
(types, bounds, the project's own checks); any failure becomes a
:class:`~ray_mtup.errors.ConfigError` naming the field by its dotted path (``lora.r``).
A config is never mutated; it crosses Ray's process boundary as a plain dict
(:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict`).

Layering, lowest first (:func:`resolve_config`, the one place that applies it): field
defaults -> the model's documented optimum (:data:`MODELS`) -> a preset (shipped in
``ray_mtup/presets/``, or a YAML path) -> a config YAML (``--config``) -> a search space's
``overrides:`` -> explicit overrides (``--set`` and the flags).

>>> cfg = resolve_config(model="qwen2.5-7b", preset="full_training")
>>> (cfg.learning_rate, cfg.epochs, cfg.per_device_batch_size, cfg.global_batch_size, cfg.zero_stage)
(0.0001, 15, 'auto', 16, 'auto')
>>> resolve_config(model="qwen2.5-3b", preset="quick_test").max_samples
100
>>> TrainConfig(learning_rate=-1.0)
Traceback (most recent call last):
...
ray_mtup.errors.ConfigError: learning_rate: must be > 0, got -1.0
>>> TrainConfig().replace(**{"lora.target_modules": "q_proj"}).lora.target_modules
('q_proj',)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ModelError
from .models import ALL_LINEAR, DECODER_LINEARS, MODELS, ModelSpec, model_kind, model_optimum, model_spec

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"
#: Environment variable naming the corpus directory when ``data_dir`` is not set.
DATA_DIR_ENV = "RAY_MTUP_DATA_DIR"
#: Retries of a failed trial or run (Tune's and Train's ``FailureConfig``), unless a flag says otherwise.
MAX_FAILURES = 2

TEMPLATE_NAMES = ("v1_formal", "v2_natural", "v3_instructional", "v4_compact", "v5_cot")
SCORING_MODES = ("official", "normalised")  # == ray_mtup.scoring.MODES
#: The default LoRA targets: every linear layer but the output head, as peft's ``all-linear`` finds them.
LORA_TARGETS = (ALL_LINEAR,)


#: The faults ``inject_fault`` injects (see :mod:`ray_mtup.faults`).
FAULT_KINDS = ("nan_loss", "kill_worker", "oom", "disk_full", "corrupt_adapter", "drop_state")
_FAULT_SPEC = re.compile(r"(?P<kind>[a-z_]+)@(?P<epoch>\d+)(?::(?P<micro>\d+))?")


@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``inject_fault``: the fault's kind, its epoch and (for ``oom``) its micro-batch."""

    kind: str
    epoch: int
    micro: int = 0


def parse_fault(spec: str) -> FaultSpec:
    """Parse an ``inject_fault`` value; a bad one raises ConfigError naming the field.

    >>> parse_fault("oom@2:3")
    FaultSpec(kind='oom', epoch=2, micro=3)
    >>> parse_fault("disk_full@1").kind
    'disk_full'
    """
    m = _FAULT_SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or m["kind"] not in FAULT_KINDS or (m["micro"] is not None) != (m["kind"] == "oom"):
        raise ConfigError("inject_fault", f"expected KIND@EPOCH (oom@EPOCH:MICRO) with KIND one of "
                                          f"{list(FAULT_KINDS)}, got {spec!r}")
    return FaultSpec(m["kind"], int(m["epoch"]), int(m["micro"] or 0))


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "tuple": "a list", "list": "a list", "dict": "a mapping", "model": "a mapping"}


def config_error(exc: ValidationError) -> ConfigError:
    """The first error of a pydantic ``ValidationError`` as a ConfigError naming the dotted field."""
    err = exc.errors()[0]
    path = [str(p) for p in err["loc"]]
    ctx = err.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, ConfigError):  # a project check (below) raised inside pydantic
        return ConfigError(".".join(path + [original.field]), original.message)
    field = ".".join(path) if path else exc.title
    kind, value = err["type"], err.get("input")
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return ConfigError(field, f"must be {op} {ctx[key]:g}, got {value!r}")
    if kind == "extra_forbidden":
        return ConfigError(field, f"unknown key; valid keys: {_valid_keys(exc.title, path[:-1])}")
    if kind in ("too_short", "too_long"):
        return ConfigError(field, f"must not be empty, got {value!r}" if kind == "too_short" else err["msg"])
    if isinstance(original, ValueError):
        return ConfigError(field, str(original))
    expected = _EXPECTED.get(kind.split("_")[0])
    return ConfigError(field, f"expected {expected}, got {value!r}" if expected else f"{err['msg']}, got {value!r}")


def _valid_keys(model_name: str, path: list[str]) -> list[str]:
    """The field names of the (nested) model at ``path`` under the model called ``model_name``."""
    cls: Any = next((c for c in (TrainConfig, LoraSettings, TinyModelSettings, ModelSpec)
                     if c.__name__ == model_name), None)
    for part in path:
        cls = cls.model_fields[part].annotation if cls is not None and part in cls.model_fields else None
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _check(cond: bool, name: str, message: str) -> None:
    """A project check inside a validator: ``name`` is relative to the model being checked."""
    if not cond:
        raise ConfigError(name, message)


class Settings(BaseModel):
    """Base of the config models: frozen, unknown keys rejected, errors as ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc) from None


class LoraSettings(Settings):
    """LoRA adapter settings (peft ``LoraConfig``)."""

    r: int = Field(64, ge=1, description="LoRA rank.")
    alpha: int = Field(128, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        LORA_TARGETS, min_length=1,
        description=(f"Linear layers that get an adapter: {ALL_LINEAR} (every linear layer but the output "
                     f"head, as peft finds them in the model), or a list of module names, or one name "
                     f"(e.g. {', '.join(DECODER_LINEARS)})."))
    train_base: bool = Field(False, description=(
        "Also train the base weights (saved beside the adapter as base_model.safetensors). "
        "Only for a random-init base (the tiny model), which a frozen LoRA cannot teach."))

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Module names (checked against the model when the adapter is built), or ``all-linear`` alone."""
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"{ALL_LINEAR} stands alone (it is every linear layer), got {list(value)}")
        bad = [v for v in value if v != ALL_LINEAR and not re.fullmatch(r"[A-Za-z_][\w.]*", v)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name; give {ALL_LINEAR} or names such as "
                             f"{', '.join(DECODER_LINEARS)}")
        return value


class TinyModelSettings(Settings):
    """Shape of the random-init Qwen2 used by ``model: tiny`` (tests and the CPU demo)."""

    hidden_size: int = Field(256, ge=1, description="Hidden size.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (KV heads = heads / 2).")
    intermediate_size: int = Field(688, ge=1, description="MLP width.")
    vocab_size: int = Field(3000, ge=300, description="BPE vocabulary trained on the corpus.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSettings:
        _check(self.hidden_size % self.num_heads == 0, "hidden_size",
               f"must be divisible by tiny.num_heads ({self.num_heads})")
        return self


class TrainConfig(Settings):
    """Everything one training run (one trial) needs. Travels to workers as a dict."""

    # model
    model: str = Field("tiny", description=(
        f"A registry name ({', '.join(MODELS)}), a hub id (Qwen/Qwen3-8B) or a local checkpoint directory."))
    model_path: str | None = Field(None, description=(
        "Local weights of the model: a directory or a single .gguf file."))
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings, description="Shape of the tiny model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    # data
    data_dir: str | None = Field(None, description=(
        f"Corpus directory; None: ${DATA_DIR_ENV}, else the shipped sample corpus (see corpus_dir)."))
    template: str = Field("v2_natural", description="MTUP prompt template.")
    chat_template: bool = Field(False, description=(
        "Put the MTUP template's instruction in the user turn of the tokenizer's chat template "
        "(Qwen3's thinking block off) and train the completion as the assistant's turn, ended by the "
        "template's end-of-turn token; false: the plain MTUP text ended by EOS."))
    max_samples: int | None = Field(None, ge=2, description="Cap on corpus graphs (None: all).")
    val_split: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction held out for validation.")
    max_seq_len: int = Field(2048, ge=32, description="Longer examples are skipped and counted.")
    seed: int = Field(42, description="Seed of the split, the init and the shuffling.")
    # optimisation
    epochs: int = Field(10, ge=1, description="Training epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    per_device_batch_size: int | Literal["auto"] = Field(4, description=(
        "Micro-batch per worker, or auto: the largest divisor of global_batch_size / workers whose "
        "estimated memory fits the device (ray_mtup.memory), resolved by the training loop."))
    global_batch_size: int = Field(16, ge=1, description=(
        "Examples per optimiser step over all workers; gradient accumulation is derived from it "
        "(global_batch_size / (per_device_batch_size x num_workers)), so it must divide evenly."))
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Linear warm-up share of all steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimiser steps per epoch (smoke tests).")
    # distribution
    num_workers: int = Field(1, ge=1, description="Ray Train workers for this run.")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    zero_stage: int | Literal["auto"] = Field("auto", description=(
        "DeepSpeed ZeRO stage: 2, 3, or auto (2 when the base weights, the adapter's optimizer state "
        "and the micro-batch's activations fit in one device's memory with a margin, else 3; "
        "ray_mtup.memory), resolved by the training loop."))
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations.")
    # speed-ups (each measured against "off" by bench/bench_packing.py)
    packing: bool = Field(False, description=(
        "Padding-free training: each micro-batch (the examples the length-grouped sampler picks) "
        "becomes one row of concatenated sequences with position ids restarting at 0 and no "
        "attention mask (transformers' DataCollatorWithFlattening); the loss is the same mean over "
        "the same label tokens as padded. Needs an attention implementation that reads packed "
        "position ids (sdpa, eager, flash_attention_2/3); with any other the run warns and pads. "
        "Validation loss and generation stay padded."))
    liger_kernel: bool = Field(False, description=(
        "Liger's Triton kernels for the model's family where Liger has them (Qwen2/3, Llama, Gemma 3 and more; "
        "fused linear cross-entropy, RoPE, RMSNorm, SwiGLU/GeGLU). Ignored, with a warning, for a family "
        "Liger lacks, without CUDA or without the liger-kernel package (extra `gpu`); "
        "under ZeRO-3 the fused cross-entropy is left off (it reads the sharded lm_head weight)."))
    # evaluation
    eval_batch_size: int = Field(32, ge=1, description="Generation batch per worker.")
    max_new_tokens: int | None = Field(None, ge=8, description=(
        "Generation budget per graph (None: derived from the training data by the training loop)."))
    eval_max_samples: int | None = Field(None, ge=1, description=(
        "Validation graphs generated per epoch: a seeded sample stratified over the source files, the "
        "same for every trial (None: all)."))
    generation_cache: str = Field("dynamic", description=(
        "KV cache of evaluation generation: dynamic, or static (lets transformers compile the "
        "decode step; for GPUs)."))
    eval_generation: Literal["auto", "replica", "synced"] = Field("auto", description=(
        "How evaluation generates under ZeRO-3 with several workers: replica (each rank gathers the "
        "LoRA-merged weights once into a plain model on its device, generates its shard alone, then "
        "frees it), synced (the partitioned model in lockstep, synced_gpus), or auto (replica when it "
        "fits in the memory every device reports, else synced). ZeRO-2 or one worker: no effect. "
        "Every path generates from the LoRA-merged weights predict ships (docs/evaluation.md)."))
    scoring_mode: str = Field("normalised", description=(
        "SMATCH mode of the per-epoch objective: normalised (gold and predictions normalised the "
        "same way; the default) or official (the shared task's convention)."))
    # held-out test and schedule horizon
    test_split: float = Field(0.1, description=(
        "Fraction held out as the test split (seeded, stratified, duplicates on one side); never "
        "trained on, scored per epoch or used to choose anything. 0: none. Ignored with test_file."))
    test_file: str | None = Field(None, description=(
        "A gold file in the corpus format (e.g. the public-test gold) that replaces the test split."))
    schedule_epochs: int | None = Field(None, description=(
        "Length of the cosine learning-rate schedule in epochs (None: epochs). A search sets it to "
        "its space's maximum epochs, so every trial has the same LR at the same epoch and `epochs` "
        "is only where a trial stops."))
    # retrieval and constrained decoding
    retrieval_k: int = Field(0, description=(
        "Training pairs (sentence + graph) retrieved by BM25 over the training sentences and shown "
        "in every prompt; 0 is plain MTUP."))
    constrained_decoding: bool = Field(False, description=(
        "Generate the step-2 graph under a PENMAN grammar (llguidance) with fresh variables, so "
        "every output is well-formed before repair."))

    # testing
    inject_fault: str | None = Field(None, description=(
        "Tests only: 'nan_loss@E' makes the loss NaN in epoch E; 'kill_worker@E' kills the last "
        "rank's process in epoch E, once per run (a marker file records that it happened); "
        "'oom@E:M' raises out-of-memory at micro-batch M of epoch E; 'disk_full@E' fails the "
        "epoch-E checkpoint write with ENOSPC; 'corrupt_adapter@E' / 'drop_state@E' damage the "
        "newest stored checkpoint in epoch E, then kill the worker (see ray_mtup/faults.py)."))

    @field_validator("zero_stage", "per_device_batch_size", mode="before")
    @classmethod
    def _int_or_auto(cls, value: Any, info: ValidationInfo) -> Any:
        """``auto`` (planned on the workers from device memory) or an integer: a stage of 2 or 3,
        a micro-batch >= 1."""
        if value == "auto":
            return value
        number = _as_int(value)
        if info.field_name == "zero_stage" and number not in (2, 3):
            raise ValueError(f"must be 2, 3 or auto, got {value!r}")
        if info.field_name == "per_device_batch_size" and (number is None or number < 1):
            raise ValueError(f"must be an integer >= 1 or auto, got {value!r}")
        return number

    @model_validator(mode="before")
    @classmethod
    def _upgrade_grad_accum(cls, data: Any) -> Any:
        """Read a config written before ``global_batch_size`` replaced the ``grad_accum`` field."""
        if isinstance(data, Mapping) and "grad_accum" in data:
            return upgrade_grad_accum(data, cls.model_fields["per_device_batch_size"].default)
        return data

    @model_validator(mode="after")
    def _project_checks(self) -> TrainConfig:
        _check(model_kind(self.model) is not None, "model", unknown_model(self.model))
        if self.model in MODELS:  # the registry's models are Llama-style decoders (Qwen2.5, Qwen3)
            check_lora_targets(self.lora.target_modules, DECODER_LINEARS, self.model)
        if self.model_path is not None:
            _check(Path(self.model_path).exists(), "model_path", f"{self.model_path} does not exist")
        _check(self.template in TEMPLATE_NAMES, "template",
               f"unknown template {self.template!r}; choose from {list(TEMPLATE_NAMES)}")
        if self.inject_fault is not None:
            parse_fault(self.inject_fault)  # ConfigError naming inject_fault
        _check(self.generation_cache in ("dynamic", "static"), "generation_cache",
               f"must be dynamic or static, got {self.generation_cache!r}")
        _check(self.scoring_mode in SCORING_MODES, "scoring_mode",
               f"unknown mode {self.scoring_mode!r}; choose from {list(SCORING_MODES)}")
        if self.per_device_batch_size == "auto":
            _check(self.global_batch_size % self.num_workers == 0, "global_batch_size",
                   f"{self.global_batch_size} is not a multiple of num_workers ({self.num_workers})")
        else:
            per_step = self.per_device_batch_size * self.num_workers
            _check(self.global_batch_size % per_step == 0, "global_batch_size",
                   f"{self.global_batch_size} is not a multiple of per_device_batch_size x num_workers "
                   f"({self.per_device_batch_size} x {self.num_workers} = {per_step})")
        _check(0.0 <= self.test_split < 1.0, "test_split", f"must be in [0, 1), got {self.test_split}")
        _check(self.val_split + self.test_split < 1.0, "test_split",
               f"val_split + test_split must be < 1, got {self.val_split} + {self.test_split}")
        if self.test_file is not None:
            _check(Path(self.test_file).is_file(), "test_file", f"{self.test_file} is not a file")
        if self.schedule_epochs is not None:
            _check(self.schedule_epochs >= self.epochs, "schedule_epochs",
                   f"must be >= epochs ({self.epochs}) or null, got {self.schedule_epochs}")
        _check(0 <= self.retrieval_k <= 8, "retrieval_k", f"must be in [0, 8], got {self.retrieval_k}")
        return self

    def micro_batch(self) -> int:
        """``per_device_batch_size`` as resolved; ``auto`` is an error here (resolve it first)."""
        if self.per_device_batch_size == "auto":
            raise ConfigError("per_device_batch_size", "auto is resolved by the training loop from the "
                                                       "device's memory (ray_mtup.memory.resolve_auto)")
        return self.per_device_batch_size

    def stage(self) -> int:
        """``zero_stage`` as resolved; ``auto`` is an error here (resolve it first)."""
        if self.zero_stage == "auto":
            raise ConfigError("zero_stage", "auto is resolved by the training loop from the device's memory "
                                            "(ray_mtup.memory.resolve_auto)")
        return self.zero_stage

    @property
    def spec(self) -> ModelSpec:
        """The registry's entry for ``model`` (a hub id or a directory: one without an optimum)."""
        return model_spec(self.model)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-safe dict (tuples become lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output (or any YAML mapping); errors name the dotted field."""
        if not isinstance(data, Mapping):
            raise ConfigError(cls.__name__, f"expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise config_error(exc) from None

    def write_yaml(self, path: str | Path, header: str) -> None:
        """Write the config as YAML that ``--config`` accepts, after a ``#`` comment ``header``
        that ends with the command reproducing the run."""
        comment = "".join(f"# {line}\n" for line in header.splitlines())
        Path(path).write_text(comment + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True),
                              encoding="utf-8")

    def replace(self, **overrides: Any) -> TrainConfig:
        """A new config with ``overrides`` applied (dotted keys reach nested settings)."""
        return TrainConfig.from_dict(merge(self.to_dict(), overrides))


def check_lora_targets(targets: tuple[str, ...], linears: tuple[str, ...], model: str) -> None:
    """ConfigError naming ``lora.target_modules`` when a name is not one of the model's linear layers."""
    bad = [t for t in targets if t != ALL_LINEAR and t not in linears]
    if bad:
        raise ConfigError("lora.target_modules", f"unknown module {bad[0]!r} of {model}; choose from "
                                                 f"{[ALL_LINEAR, *linears]}")


def unknown_model(model: str) -> str:
    return (f"unknown model {model!r}: give a registry name ({', '.join(sorted(MODELS))}), a hub id "
            "(owner/name, e.g. Qwen/Qwen3-8B) or a checkpoint directory")


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (``3``, ``"3"``, ``3.0``), else None.

    >>> _as_int("3"), _as_int(2.0), _as_int(2.5), _as_int(True), _as_int("x")
    (3, 2, None, None, None)
    """
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def upgrade_grad_accum(data: Mapping[str, Any], per_device_default: int | str) -> dict[str, Any]:
    """``data`` (a config of an older version) with ``grad_accum`` turned into ``global_batch_size``.

    >>> upgrade_grad_accum({"grad_accum": 4, "per_device_batch_size": 2, "num_workers": 2}, 4)
    {'per_device_batch_size': 2, 'num_workers': 2, 'global_batch_size': 16}
    """
    if "global_batch_size" in data:
        raise ConfigError("grad_accum", "no longer a field: set global_batch_size (gradient accumulation "
                                        "is derived from it)")
    out = {k: v for k, v in data.items() if k != "grad_accum"}
    if data.get("per_device_batch_size", per_device_default) == "auto":
        raise ConfigError("grad_accum", "no longer a field, and per_device_batch_size is auto: set "
                                        "global_batch_size instead")
    try:
        out["global_batch_size"] = (int(data["grad_accum"]) * int(data.get("per_device_batch_size", per_device_default))
                                    * int(data.get("num_workers", 1)))
    except (TypeError, ValueError):
        raise ConfigError("grad_accum", f"expected an integer, got {data['grad_accum']!r}") from None
    logger.warning("config field grad_accum=%s read as global_batch_size=%d", data["grad_accum"],
                   out["global_batch_size"])
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any], _prefix: str = "") -> dict[str, Any]:
    """Merge ``overrides`` into a copy of ``base``; ``"lora.r": 16`` sets a nested key.

    >>> merge({"a": 1, "lora": {"r": 64, "alpha": 128}}, {"lora.r": 16, "a": 2})
    {'a': 2, 'lora': {'r': 16, 'alpha': 128}}
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            sub = out.get(head)
            if not isinstance(sub, dict):
                raise ConfigError(_prefix + key, f"{_prefix + head!r} is not a nested setting")
            out[head] = merge(sub, {rest: value}, f"{_prefix}{head}.")
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{_prefix}{key}.")
        else:
            out[key] = value
    return out


def corpus_dir(data_dir: str | Path | None, default: str | Path | None = SAMPLE_DATA_DIR) -> Path | None:
    """The corpus directory (the one lookup): ``data_dir``, else ``$RAY_MTUP_DATA_DIR``, else
    ``default`` (the sample corpus shipped with the package; None: no directory).

    >>> corpus_dir("/corpus"), corpus_dir(None, default=None) if DATA_DIR_ENV not in os.environ else None
    (PosixPath('/corpus'), None)
    """
    found = data_dir or os.environ.get(DATA_DIR_ENV) or default
    return Path(found) if found else None


def with_data_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its corpus found by :func:`corpus_dir` (``data_dir``, else
    ``$RAY_MTUP_DATA_DIR``) and made absolute, as the launcher and ``python -m ray_mtup.worker``
    record it: Ray workers and a later ``predict`` may not share this directory. ``data_dir``
    stays None when neither is set: the sample corpus shipped with the package, wherever the
    package is installed.
    """
    found = corpus_dir(cfg.data_dir, default=None)
    if found is None or "://" in str(cfg.data_dir or ""):
        return cfg
    return cfg.replace(data_dir=str(found.resolve()))


def load_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(data).__name__}")
    return data


#: Folders of shipped YAML files: ``ray_mtup/presets/``, and ``search_spaces/`` at the top of the
#: repository, which the wheel ships as ``ray_mtup/search_spaces/`` (pyproject.toml maps it).
PRESETS = "presets"
SEARCH_SPACES = "search_spaces"
_FLAG_OF = {PRESETS: "preset", SEARCH_SPACES: "search_space"}


def yaml_folder(kind: str) -> Traversable:
    """The folder of the shipped ``kind`` files: inside the installed package, else (a checkout,
    an editable install, a job's uploaded working directory) next to it.

    >>> sorted(p.name for p in yaml_folder(SEARCH_SPACES).iterdir())[:2]
    ['default.yaml', 'smoke.yaml']
    """
    packaged = resources.files(__package__).joinpath(kind)
    if packaged.is_dir() or kind != SEARCH_SPACES:
        return packaged
    return PACKAGE_DIR.parent / kind


def packaged_names(kind: str) -> list[str]:
    """Names of the shipped YAML files of ``kind`` (``presets``, ``search_spaces``)."""
    return sorted(p.name[: -len(".yaml")] for p in yaml_folder(kind).iterdir() if p.name.endswith(".yaml"))


def packaged_yaml(kind: str, name: str | Path) -> Traversable | Path:
    """A shipped YAML by name (``smoke``), or any YAML file by path.

    >>> packaged_yaml(SEARCH_SPACES, "smoke").name
    'smoke.yaml'
    """
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    path = yaml_folder(kind).joinpath(f"{text}.yaml")
    if not path.is_file():
        raise ConfigError(_FLAG_OF.get(kind, kind),
                          f"unknown name {text!r}; choose from {packaged_names(kind)} or give a YAML path")
    return path


def preset_names() -> list[str]:
    return packaged_names(PRESETS)


def load_preset(name: str | Path) -> dict[str, Any]:
    """The overrides of a preset: a shipped name (``quick_test``) or a YAML path."""
    return load_yaml(packaged_yaml(PRESETS, name))


def optimum(model: str, model_path: str | None = None) -> Any:
    """The model's documented optimum, or defaults derived from its size (logged as derived:
    they are not the method's); a config.json that cannot be read is a ConfigError naming
    ``model`` (or ``model_path``)."""
    try:
        found = model_optimum(model, model_path)
    except ModelError as exc:
        raise ConfigError("model_path" if model_path else "model", str(exc)) from None
    if not found.documented:
        logger.info("%s", found.describe(model))
    return found


def resolve_config(
    model: str | None = None,
    preset: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    space_overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the config of one run, validated once: defaults <- model optimum <- preset <-
    ``config_file`` <- ``space_overrides`` (a search space's ``overrides:``) <- ``overrides``
    (``--set`` and flags; ``None`` values are ignored).

    ``model`` None takes the config file's ``model`` key, else ``tiny``.

    >>> cfg = resolve_config("tiny", space_overrides={"epochs": 2, "seed": 1}, overrides={"epochs": 3})
    >>> cfg.epochs, cfg.seed
    (3, 1)
    """
    loaded = load_yaml(config_file) if config_file is not None else {}
    model = loaded.get("model", model) if model is None else model
    model = model or "tiny"
    if model_kind(model) is None:
        raise ConfigError("model", unknown_model(model))
    model_path = (overrides or {}).get("model_path") or loaded.get("model_path")
    spec = optimum(model, model_path)
    layers: list[Mapping[str, Any]] = [
        {"model": model, "learning_rate": spec.learning_rate, "epochs": spec.epochs,
         "per_device_batch_size": spec.per_device_batch_size, "global_batch_size": spec.global_batch_size,
         "lora": {"train_base": spec.train_base}},
        load_preset(preset) if preset is not None else {},
        {k: v for k, v in (upgrade_grad_accum(loaded, spec.per_device_batch_size) if "grad_accum" in loaded
                           else loaded).items() if k != "model"},
        space_overrides or {},
        {k: v for k, v in (overrides or {}).items() if v is not None},
    ]
    data = TrainConfig().to_dict()
    for layer in layers:
        data = merge(data, layer)
    return TrainConfig.from_dict(data)
