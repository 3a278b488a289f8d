"""Frozen configuration dataclasses: the one home of every default.

A run is described by a :class:`TrainConfig`. It is built once, validated in
``__post_init__`` (a bad value raises :class:`~ray_mtup.errors.ConfigError` naming the
field) and never mutated; it crosses Ray's process boundary as a plain dict
(:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict`).

Layering, lowest first: dataclass defaults -> the model's documented optimum
(:data:`MODELS`) -> a preset YAML (``presets/``) -> a config YAML (``--config``) ->
explicit overrides (flags, or a trial's sampled hyper-parameters). See
:func:`resolve_config`.

>>> cfg = resolve_config(model="qwen2.5-7b", preset="full_training")
>>> (cfg.learning_rate, cfg.epochs, cfg.per_device_batch_size, cfg.grad_accum)
(0.0001, 15, 2, 8)
>>> resolve_config(model="qwen2.5-3b", preset="quick_test").max_samples
100
>>> TrainConfig(learning_rate=-1.0)
Traceback (most recent call last):
...
ray_mtup.errors.ConfigError: learning_rate: must be > 0, got -1.0
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
PRESETS_DIR = REPO_DIR / "presets"
SEARCH_SPACES_DIR = REPO_DIR / "search_spaces"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"

TEMPLATE_NAMES = ("v1_formal", "v2_natural", "v3_instructional", "v4_compact", "v5_cot")
SCORING_MODES = ("official", "normalised")  # == ray_mtup.scoring.MODES
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """A model of the registry and its documented optimum."""

    name: str
    hub_id: str | None
    learning_rate: float
    epochs: int
    per_device_batch_size: int
    grad_accum: int
    train_base: bool = False


#: The model registry. ``tiny`` is a random-init Qwen2 built locally (tests, CPU demo).
MODELS: dict[str, ModelSpec] = {
    "qwen2.5-1.5b": ModelSpec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 2e-4, 10, 4, 4),
    "qwen2.5-3b": ModelSpec("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", 2e-4, 10, 4, 4),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 1e-4, 15, 2, 8),
    # A random-init base holds nothing worth freezing: tiny trains it too (lora.train_base).
    "tiny": ModelSpec("tiny", None, 1e-3, 10, 8, 1, train_base=True),
}


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig``)."""

    r: int = field(default=64, metadata={"help": "LoRA rank."})
    alpha: int = field(default=128, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] = field(
        default=LORA_TARGETS, metadata={"help": "Linear layers that get an adapter."}
    )
    train_base: bool = field(default=False, metadata={
        "help": "Also train the base weights (saved beside the adapter as base_model.safetensors). "
                "Only for a random-init base (the tiny model), which a frozen LoRA cannot teach."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")


@dataclass(frozen=True)
class TinyModelSettings:
    """Shape of the random-init Qwen2 used by ``model: tiny`` (tests and the CPU demo)."""

    hidden_size: int = field(default=256, metadata={"help": "Hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (KV heads = heads / 2)."})
    intermediate_size: int = field(default=688, metadata={"help": "MLP width."})
    vocab_size: int = field(default=3000, metadata={"help": "BPE vocabulary trained on the corpus."})

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(self, f) >= 1, f"tiny.{f}", f"must be >= 1, got {getattr(self, f)}")
        _check(self.hidden_size % self.num_heads == 0, "tiny.hidden_size",
               f"must be divisible by tiny.num_heads ({self.num_heads})")
        _check(self.vocab_size >= 300, "tiny.vocab_size", f"must be >= 300, got {self.vocab_size}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run (one trial) needs. Travels to workers as a dict."""

    # model
    model: str = field(default="tiny", metadata={"help": f"Registry name: {', '.join(MODELS)}."})
    model_path: str | None = field(
        default=None, metadata={"help": "Local weights: a directory or a single .gguf file."}
    )
    tiny: TinyModelSettings = field(default_factory=TinyModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # data
    data_dir: str | None = field(
        default=None, metadata={"help": "Corpus directory; None uses the shipped sample corpus."}
    )
    template: str = field(default="v2_natural", metadata={"help": "MTUP prompt template."})
    max_samples: int | None = field(default=None, metadata={"help": "Cap on corpus graphs (None: all)."})
    val_split: float = field(default=0.1, metadata={"help": "Fraction held out for validation."})
    max_seq_len: int = field(default=2048, metadata={"help": "Longer examples are skipped and counted."})
    seed: int = field(default=42, metadata={"help": "Seed of the split, the init and the shuffling."})
    # optimisation
    epochs: int = field(default=10, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    per_device_batch_size: int = field(default=4, metadata={"help": "Micro-batch per worker."})
    grad_accum: int = field(default=4, metadata={"help": "Gradient accumulation steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warm-up share of all steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Cap on optimiser steps per epoch (smoke tests)."}
    )
    # distribution
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers for this run."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per worker; bf16."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage: 2 or 3."})
    offload: bool = field(default=False, metadata={"help": "ZeRO CPU offload of optimizer state."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations."})
    # evaluation
    eval_batch_size: int = field(default=32, metadata={"help": "Generation batch per worker."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation budget per graph."})
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Cap on validation graphs generated per epoch (None: all)."}
    )
    generation_cache: str = field(default="dynamic", metadata={
        "help": "KV cache of evaluation generation: dynamic, or static (lets transformers compile the "
                "decode step; for GPUs)."})
    scoring_mode: str = field(default="normalised", metadata={
        "help": "SMATCH mode of the per-epoch objective: normalised (gold and predictions normalised the "
                "same way; the default) or official (the shared task's convention)."})
    # retrieval and constrained decoding
    retrieval_k: int = field(default=0, metadata={
        "help": "Training pairs (sentence + graph) retrieved by BM25 over the training sentences and shown "
                "in every prompt; 0 is plain MTUP."})
    constrained_decoding: bool = field(default=False, metadata={
        "help": "Generate the step-2 graph under a PENMAN grammar (llguidance) with fresh variables, so "
                "every output is well-formed before repair."})

    # testing
    inject_fault: str | None = field(default=None, metadata={
        "help": "Tests only: 'nan_loss@E' makes the loss NaN in epoch E; 'kill_worker@E' kills the last "
                "rank's process in epoch E, once per run (a marker file records that it happened)."})

    def __post_init__(self) -> None:
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", _build(LoraSettings, self.lora, "lora."))
        if isinstance(self.tiny, Mapping):
            object.__setattr__(self, "tiny", _build(TinyModelSettings, self.tiny, "tiny."))
        _check(self.model in MODELS, "model", f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.model_path is not None:
            _check(Path(self.model_path).exists(), "model_path", f"{self.model_path} does not exist")
        _check(self.template in TEMPLATE_NAMES, "template",
               f"unknown template {self.template!r}; choose from {list(TEMPLATE_NAMES)}")
        if self.max_samples is not None:
            _check(self.max_samples >= 2, "max_samples", f"must be >= 2 or null, got {self.max_samples}")
        _check(0.0 < self.val_split < 1.0, "val_split", f"must be in (0, 1), got {self.val_split}")
        _check(self.max_seq_len >= 32, "max_seq_len", f"must be >= 32, got {self.max_seq_len}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.per_device_batch_size >= 1, "per_device_batch_size",
               f"must be >= 1, got {self.per_device_batch_size}")
        _check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        if self.max_steps_per_epoch is not None:
            _check(self.max_steps_per_epoch >= 1, "max_steps_per_epoch",
                   f"must be >= 1 or null, got {self.max_steps_per_epoch}")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.zero_stage in (2, 3), "zero_stage", f"must be 2 or 3, got {self.zero_stage}")
        _check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.max_new_tokens >= 8, "max_new_tokens", f"must be >= 8, got {self.max_new_tokens}")
        if self.eval_max_samples is not None:
            _check(self.eval_max_samples >= 1, "eval_max_samples",
                   f"must be >= 1 or null, got {self.eval_max_samples}")
        if self.inject_fault is not None:
            kind, _, epoch = self.inject_fault.partition("@")
            _check(kind in ("nan_loss", "kill_worker") and epoch.isdigit(), "inject_fault",
                   f"expected nan_loss@EPOCH or kill_worker@EPOCH, got {self.inject_fault!r}")
        _check(self.generation_cache in ("dynamic", "static"), "generation_cache",
               f"must be dynamic or static, got {self.generation_cache!r}")
        _check(self.scoring_mode in SCORING_MODES, "scoring_mode",
               f"unknown mode {self.scoring_mode!r}; choose from {list(SCORING_MODES)}")
        _check(0 <= self.retrieval_k <= 8, "retrieval_k", f"must be in [0, 8], got {self.retrieval_k}")

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(d["lora"]["target_modules"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming the key."""
        return _build(cls, data, "")

    def write_yaml(self, path: str | Path, header: str) -> None:
        """Write the config as YAML that ``--config`` accepts, after a ``#`` comment ``header``
        that ends with the command reproducing the run."""
        comment = "".join(f"# {line}\n" for line in header.splitlines())
        Path(path).write_text(comment + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True),
                              encoding="utf-8")

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A new config with ``overrides`` applied (dotted keys reach nested settings)."""
        return TrainConfig.from_dict(merge(self.to_dict(), overrides))


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, f"expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key; valid keys: {sorted(names)}")
    types = {f.name: str(f.type) for f in fields(cls)}
    values = {k: _coerce(prefix + k, types[k], v) for k, v in data.items()}
    return cls(**values)


def _coerce(key: str, type_name: str, value: Any) -> Any:
    """Check (and losslessly convert) a scalar against its field's annotation.

    >>> _coerce("lr", "float", "1e-3"), _coerce("epochs", "int", 3.0)
    (0.001, 3)
    >>> _coerce("epochs", "int", "many")
    Traceback (most recent call last):
    ...
    ray_mtup.errors.ConfigError: epochs: expected int, got 'many'
    """
    base, _, optional = type_name.partition(" | ")
    if value is None:
        if optional == "None":
            return None
        raise ConfigError(key, f"expected {base}, got null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "str":
        if isinstance(value, str):
            return value
    else:  # nested settings and tuples are checked by their own constructors
        return value
    raise ConfigError(key, f"expected {base}, got {value!r}")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
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
                raise ConfigError(key, f"{head!r} is not a nested setting")
            out[head] = merge(sub, {rest: value})
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
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


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The overrides of a named preset in ``presets/``."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("preset", f"unknown preset {name!r}; choose from {preset_names()}")
    return load_yaml(path)


def resolve_config(
    model: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the config of one run: defaults <- model optimum <- preset <- file <- overrides.

    ``model`` None takes the config file's ``model`` key, else ``tiny``.
    """
    loaded = load_yaml(config_file) if config_file is not None else {}
    model = loaded.get("model", model) if model is None else model
    model = model or "tiny"
    if model not in MODELS:
        raise ConfigError("model", f"unknown model {model!r}; choose from {sorted(MODELS)}")
    spec = MODELS[model]
    data: dict[str, Any] = TrainConfig(model=model).to_dict()
    data = merge(data, {
        "learning_rate": spec.learning_rate,
        "epochs": spec.epochs,
        "per_device_batch_size": spec.per_device_batch_size,
        "grad_accum": spec.grad_accum,
        "lora.train_base": spec.train_base,
    })
    if preset is not None:
        data = merge(data, load_preset(preset))
    if loaded:
        data = merge(data, {k: v for k, v in loaded.items() if k != "model"})
    if overrides:
        data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data)
