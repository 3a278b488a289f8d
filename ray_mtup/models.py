"""The models a run can train, and what the project knows of each: the one home of model facts.

``model`` (``--model``) is one of

* a **registry name** (:data:`MODELS`): a name, its hub id and, where the method documents
  one, its optimum (learning rate, epochs, global batch);
* a **hub id** (``Qwen/Qwen3-8B``), read from the Hugging Face hub or its local cache;
* a **local checkpoint directory** holding a ``config.json`` (and weights, tokenizer).

Shapes are never written down here: they are read from the model's ``config.json``
(transformers' ``AutoConfig``, no weights loaded) by :func:`read_model_config` and
:func:`shape_from_config`. A model without a documented optimum gets defaults derived from
its size (:func:`derived_optimum`): the Qwen2.5 pattern, 2e-4 and 10 epochs up to about 4B
parameters, 1e-4 and 15 epochs above, at a global batch of 16.

>>> model_kind("qwen3-8b"), model_kind("Qwen/Qwen3-8B"), model_kind("not a model")
('registry', 'hub', None)
>>> derived_optimum(4.0e9), derived_optimum(8.2e9)
((0.0002, 10), (0.0001, 15))
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from .errors import ModelError

logger = logging.getLogger(__name__)

#: The linear layers of a Llama-style decoder layer (Qwen2/3, Llama, Mistral, Gemma 2/3): what
#: peft's ``all-linear`` finds in them (it leaves out the output head).
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: peft's name for "every linear layer but the output head".
ALL_LINEAR = "all-linear"
#: Size (parameters) up to which a model gets the small models' derived defaults; the method's
#: documented optima change between its 3B (2e-4, 10 epochs) and 7B (1e-4, 15 epochs) models.
DERIVED_SIZE_LIMIT = 5e9
DERIVED_SMALL = (2e-4, 10)
DERIVED_LARGE = (1e-4, 15)
#: The global batch of the method's recipe (4 x 4 for 1.5B/3B, 2 x 8 for 7B).
GLOBAL_BATCH = 16


class ModelSpec(BaseModel):
    """A model of the registry: its hub id and, where the method documents one, its optimum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    hub_id: str | None
    learning_rate: float | None = None  # None: no documented optimum (derived from the size)
    epochs: int | None = None
    per_device_batch_size: int | Literal["auto"] = "auto"
    global_batch_size: int = GLOBAL_BATCH
    train_base: bool = False

    @property
    def documented(self) -> bool:
        return self.learning_rate is not None and self.epochs is not None


def _spec(name: str, hub_id: str | None, lr: float | None = None, epochs: int | None = None, **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, hub_id=hub_id, learning_rate=lr, epochs=epochs, **kw)


#: The model registry: names, hub ids, documented optima. ``tiny`` is a random-init Qwen2
#: built locally (tests, CPU demo). The real models plan their micro-batch from the device's
#: memory (``auto``: ray_mtup.memory) at the global batch of 16.
MODELS: dict[str, ModelSpec] = {
    "qwen2.5-1.5b": _spec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 2e-4, 10),
    "qwen2.5-3b": _spec("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", 2e-4, 10),
    "qwen2.5-7b": _spec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 1e-4, 15),
    # Qwen3: no documented optimum for this task; derived from the size read from config.json.
    "qwen3-1.7b": _spec("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
    "qwen3-4b": _spec("qwen3-4b", "Qwen/Qwen3-4B"),
    "qwen3-8b": _spec("qwen3-8b", "Qwen/Qwen3-8B"),
    "qwen3-14b": _spec("qwen3-14b", "Qwen/Qwen3-14B"),
    # A random-init base holds nothing worth freezing: tiny trains it too (lora.train_base).
    "tiny": _spec("tiny", None, 1e-3, 10, per_device_batch_size=8, train_base=True),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_kind(model: str) -> Literal["registry", "directory", "hub"] | None:
    """What ``model`` names: a registry entry, a local checkpoint directory, a hub id, or nothing."""
    if model in MODELS:
        return "registry"
    # an absolute path names a directory even where it is absent (a run's config read on another
    # machine, whose `predict --model-path` gives the weights); loading it is what fails, if anything
    if Path(model).is_dir() or Path(model).is_absolute():
        return "directory"
    if _HUB_ID.match(model):
        return "hub"
    return None


def model_spec(model: str) -> ModelSpec:
    """The registry's spec of ``model``; a hub id or a directory gets one without an optimum."""
    if model in MODELS:
        return MODELS[model]
    return ModelSpec(name=model, hub_id=model if model_kind(model) == "hub" else None)


def weights_reference(model: str, model_path: str | None) -> tuple[str, str | None] | None:
    """(directory or hub id, GGUF file name or None) holding the model's ``config.json``;
    None for ``tiny`` (written from the training data)."""
    if model_path is not None:
        path = Path(model_path)
        return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)
    spec = model_spec(model)
    if spec.hub_id is not None:
        return spec.hub_id, None
    if model_kind(model) == "directory":
        return model, None
    return None


@lru_cache(maxsize=32)
def _read_config(path: str, gguf_file: str | None) -> dict[str, Any]:
    from transformers import AutoConfig

    local = Path(path).exists() or Path(path).is_absolute()  # an absolute path is a directory, not a hub id
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, KeyError) as exc:
        written = Path(path) / "config.json"
        if local and not gguf_file and written.is_file():  # a model type transformers does not know:
            try:  # its sizes as written
                return json.loads(written.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ModelError(f"cannot read {written}: {err}") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise ModelError(f"cannot read the model config of {path}{'/' + gguf_file if gguf_file else ''}: "
                             f"{reason}") from None
        raise ModelError(f"cannot read the hub for {path!r} (its config.json): {reason}. Check the network, "
                         "or give a local checkpoint directory (--model DIR or --model-path DIR)") from None
    text = config.get_text_config()  # a multimodal checkpoint (Gemma 3 4B+): its language model
    out = text.to_dict()
    out.setdefault("model_type", getattr(text, "model_type", ""))
    out.setdefault("tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    return out


def read_model_config(path: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as transformers' ``AutoConfig`` reads it, with its config
    class's defaults (Gemma 3 ties its embeddings without saying so), without weights: a
    directory, a hub id through the hub's cache, a GGUF file's metadata; the language model's
    part of a multimodal config; a directory whose model type transformers does not know, as
    written. ModelError naming the directory or the hub id when it cannot be read."""
    return dict(_read_config(str(path), gguf_file))


#: Model types whose attention normalises q and k per head (an RMSNorm of ``head_dim`` each).
QK_NORM_TYPES = frozenset({"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"})
#: Model types with four RMSNorms per layer (before and after attention and MLP) instead of two.
FOUR_NORM_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text"})
#: Model types with q/k/v biases that their config.json does not state (Qwen2's are hard-coded).
QKV_BIAS_TYPES = frozenset({"qwen2"})


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (Qwen2/3, Llama, Gemma 3) that the memory
    arithmetic and the parameter count need, as its ``config.json`` gives them."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size / num_heads
    attention_bias: bool = True  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    norms_per_layer: int = 2  # 4 for Gemma 2/3
    sliding_window: int | None = None
    sliding_layers: int = 0  # layers whose attention is windowed (Gemma 3: 5 of 6)
    model_type: str = "qwen2"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """Width of the Q projection (and the input of o_proj): heads x head dimension."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        """Width of the K (and V) projection: KV heads x head dimension."""
        return self.num_kv_heads * self.dim_per_head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear layer of one decoder layer, by module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """Parameters of one decoder layer: the linears, q/k/v biases (Qwen2), the q/k norms
        (Qwen3, Gemma 3) and the layer's RMSNorms."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        qk = 2 * self.dim_per_head if self.qk_norm else 0
        return (sum(a * b for a, b in self.linear_shapes().values()) + bias + qk
                + self.norms_per_layer * self.hidden_size)

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def base_params(self) -> int:
        """All parameters: embedding, layers, final norm, and the LM head unless tied.

        >>> q15 = shape_from_config({"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        ...     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        ...     "vocab_size": 151936, "tie_word_embeddings": True})   # Qwen2.5-1.5B-Instruct
        >>> round(q15.base_params() / 1e9, 2)
        1.54
        """
        head = 0 if self.tie_word_embeddings else self.embedding_params()
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size + head

    def lora_targets(self, targets: Sequence[str]) -> tuple[str, ...]:
        """``targets`` with ``all-linear`` expanded to the layer's linears (as peft expands it).

        >>> ModelShape(64, 128, 2, 4, 2, 300).lora_targets(["all-linear"])[:2]
        ('q_proj', 'k_proj')
        """
        if ALL_LINEAR in targets:
            return tuple(self.linear_shapes())
        unknown = [t for t in targets if t not in self.linear_shapes()]
        if unknown:
            raise ModelError(f"lora.target_modules {unknown}: not a linear layer of a {self.model_type} decoder "
                             f"layer that the memory plan knows ({', '.join(self.linear_shapes())})")
        return tuple(targets)

    def lora_params(self, r: int, targets: Sequence[str]) -> int:
        """Adapter parameters: r x (in + out) for every targeted linear of every layer."""
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in self.lora_targets(targets))


def _sliding_layers(config: Mapping[str, Any], layers: int) -> int:
    """Layers with windowed attention: from ``layer_types`` (transformers >= 4.53), else from
    Gemma 3's ``sliding_window_pattern`` (every N-th layer is global), else Qwen's switch."""
    if not config.get("sliding_window"):
        return 0
    types = config.get("layer_types")
    if types:
        return sum(1 for t in types if t == "sliding_attention")
    pattern = config.get("sliding_window_pattern")
    if pattern:
        return layers - layers // int(pattern)
    if config.get("use_sliding_window"):
        return max(0, layers - int(config.get("max_window_layers") or 0))
    return 0


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The shape from a ``config.json`` mapping (transformers' field names); a multimodal
    config's ``text_config`` when it has one.

    >>> shape_from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "vocab_size": 300}).kv_dim
    64
    """
    if isinstance(config.get("text_config"), Mapping):
        config = {"tie_word_embeddings": config.get("tie_word_embeddings", False), **config["text_config"]}
    model_type = str(config.get("model_type") or "")
    try:
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        return ModelShape(
            int(config["hidden_size"]), int(config["intermediate_size"]), layers, heads,
            int(config.get("num_key_value_heads") or heads), int(config["vocab_size"]),
            bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
            attention_bias=bool(config.get("attention_bias", model_type in QKV_BIAS_TYPES)),
            qk_norm=model_type in QK_NORM_TYPES, norms_per_layer=4 if model_type in FOUR_NORM_TYPES else 2,
            sliding_window=int(config["sliding_window"]) if _sliding_layers(config, layers) else None,
            sliding_layers=_sliding_layers(config, layers), model_type=model_type or "unknown")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the model config lacks a size the memory plan needs: {exc}") from None


#: One folder per registry name with the ``config.json`` its model card publishes (no weights):
#: a registry name's shape is read from there, so planning it needs no network.
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def model_shape(model: str, model_path: str | None = None) -> ModelShape:
    """The shape of ``model`` (weights at ``model_path`` when given), read from its config.json
    without loading weights: a registry name's from :data:`MODEL_CONFIGS`, a hub id's from the
    hub, a directory's from itself. ModelError for ``tiny`` (its checkpoint is written by the run).

    >>> model_shape("qwen2.5-7b").hidden_size, model_shape("qwen3-8b").num_layers
    (3584, 36)
    """
    if model_path is None and model in MODELS and (MODEL_CONFIGS / model / "config.json").is_file():
        return shape_from_config(read_model_config(str(MODEL_CONFIGS / model)))
    ref = weights_reference(model, model_path)
    if ref is None:
        raise ModelError(f"model {model!r} has no config.json before its run writes it; give --model-path")
    return shape_from_config(read_model_config(*ref))


def derived_optimum(params: float) -> tuple[float, int]:
    """(learning rate, epochs) for a model of ``params`` parameters without a documented optimum:
    the method's Qwen2.5 pattern (2e-4 and 10 epochs up to about 4B, 1e-4 and 15 above)."""
    return DERIVED_SMALL if params <= DERIVED_SIZE_LIMIT else DERIVED_LARGE


@dataclass(frozen=True)
class Optimum:
    """The first layer of a run's config: the documented optimum, or defaults derived from the size."""

    learning_rate: float
    epochs: int
    per_device_batch_size: int | Literal["auto"]
    global_batch_size: int
    train_base: bool
    documented: bool
    params: int | None = None  # the parameter count the derived defaults come from

    def describe(self, model: str) -> str:
        """One line for the log: the values and where they come from.

        >>> Optimum(1e-4, 15, "auto", 16, False, False, 8_190_735_360).describe("Qwen/Qwen3-8B")
        'Qwen/Qwen3-8B: 8.19B parameters (config.json), no documented optimum: derived defaults learning rate 0.0001, 15 epochs, global batch 16 (1e-4 and 15 epochs above 5B parameters, 2e-4 and 10 up to it)'
        """
        values = f"learning rate {self.learning_rate:g}, {self.epochs} epochs, global batch {self.global_batch_size}"
        if self.documented:
            return f"{model}: documented optimum {values}"
        return (f"{model}: {self.params / 1e9:.3g}B parameters (config.json), no documented optimum: derived "
                f"defaults {values} (1e-4 and 15 epochs above {DERIVED_SIZE_LIMIT / 1e9:g}B parameters, 2e-4 and "
                "10 up to it)")


def model_optimum(model: str, model_path: str | None = None) -> Optimum:
    """The documented optimum of a registry model, else defaults derived from the size its
    config.json gives (read without weights; ModelError when it cannot be read)."""
    spec = model_spec(model)
    if spec.documented:
        assert spec.learning_rate is not None and spec.epochs is not None
        return Optimum(spec.learning_rate, spec.epochs, spec.per_device_batch_size, spec.global_batch_size,
                       spec.train_base, True)
    params = model_shape(model, model_path).base_params()
    lr, epochs = derived_optimum(params)
    return Optimum(lr, epochs, spec.per_device_batch_size, spec.global_batch_size, spec.train_base, False, params)
