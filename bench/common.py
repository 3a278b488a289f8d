"""Helpers shared by the benchmark scripts: JSON output, corpus location, Qwen2.5 shapes.

The scripts are launched as files (``python bench/bench_x.py`` or under ``torchrun``), so
each one puts the repository root on ``sys.path`` before importing ``bench.common``.
Nothing here is imported by the library.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "vlsp2025"
CORPUS_FILES = ("train_amr_1.txt", "train_amr_2.txt")

#: The real Qwen2.5 (Instruct) shapes, used to build random-init models when no weights are
#: at hand: (hidden, intermediate, layers, attention heads, KV heads, vocabulary).
QWEN25_DIMS: dict[str, tuple[int, int, int, int, int, int]] = {
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
}
MODEL_CHOICES = ("tiny", *QWEN25_DIMS)


def emit(record: dict[str, Any]) -> None:
    """Print one JSON object on one line (the output format of every bench script)."""
    print(json.dumps(record, ensure_ascii=False), flush=True)


def default_data_dir() -> str:
    """``RAY_MTUP_DATA_DIR`` if set, else ``../shared/data/vlsp2025`` next to the repository."""
    from ray_mtup.config import corpus_dir

    return str(corpus_dir(None, default=DEFAULT_DATA_DIR))


def require_corpus(data_dir: str | Path, script: str) -> Path | None:
    """The corpus folder, or None after printing which files are missing (callers exit 2)."""
    path = Path(data_dir)
    missing = [name for name in CORPUS_FILES if not (path / name).is_file()]
    if missing:
        print(f"{script}: corpus not found: {', '.join(str(path / m) for m in missing)} "
              "(pass --data-dir or set RAY_MTUP_DATA_DIR)", file=sys.stderr)
        return None
    return path


def summarise(times: Sequence[float]) -> dict[str, float]:
    """Median, mean and min of a list of seconds.

    >>> summarise([3.0, 1.0, 2.0])
    {'median_s': 2.0, 'mean_s': 2.0, 'min_s': 1.0}
    """
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times)}


def qwen25_config(name: str, **overrides: Any) -> Any:
    """A ``Qwen2Config`` with the real shape of ``name`` (random init; no weights are read).

    >>> cfg = qwen25_config("qwen2.5-7b")
    >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size
    (3584, 28, 4, 152064)
    """
    from transformers import Qwen2Config

    hidden, inter, layers, heads, kv, vocab = QWEN25_DIMS[name]
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=name == "qwen2.5-1.5b" or name == "qwen2.5-3b",
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def build_base_model(name: str, cfg: Any, tokenizer: Any, device: Any, source: Any = None) -> Any:
    """The base model of a bench run, before LoRA.

    ``tiny`` (or ``cfg.model_path`` set): the project's :func:`ray_mtup.modeling.build_model` from
    ``source`` (:func:`ray_mtup.modeling.base_source`).
    A Qwen2.5 name without weights: a random-init ``Qwen2ForCausalLM`` of the real shape, built
    directly on ``device`` in bf16 on GPU (fp32 on CPU), with the same generation and
    gradient-checkpointing settings build_model applies; partitioned as it is built (zero.Init)
    while a ZeRO-3 ``HfDeepSpeedConfig`` is alive, as ``from_pretrained`` is in the loop.
    """
    import torch

    from ray_mtup.modeling import build_model, finish_model

    if name == "tiny" or cfg.model_path is not None:
        return build_model(source, cfg, tokenizer, device.type).to(device)
    from transformers import Qwen2ForCausalLM

    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    # _from_config, as from_pretrained does, builds under zero.Init while a ZeRO-3 HfDeepSpeedConfig
    # is alive (the caller's): each rank then allocates only its shard, as the loop's load does.
    zero3 = is_deepspeed_zero3_enabled()
    try:
        with contextlib.nullcontext() if zero3 else torch.device(device):
            model = Qwen2ForCausalLM._from_config(qwen25_config(name), dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return finish_model(model, tokenizer, cfg)


def rank_device(on_gpu: bool, world: int) -> tuple[Any, int]:
    """This torchrun rank's device and local rank: its GPU, or the CPU with the host's cores
    split over the ranks on it."""
    import os

    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), local_rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return torch.device("cpu"), local_rank
