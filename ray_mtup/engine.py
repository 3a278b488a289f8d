"""The DeepSpeed engine: its config, the process group, and the model built inside it.

:func:`build_engine` is the one path for every model: the base weights are loaded with
``from_pretrained`` while a ``HfDeepSpeedConfig`` is alive, so under ZeRO-3 they are
partitioned as they load (``zero.Init``); LoRA is applied; ``deepspeed.initialize`` wraps
the result with AdamW (``torch_adam``) and transformers' cosine schedule with warm-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .checkpointing import load_resume_state
from .config import TrainConfig
from .distributed import init_distributed
from .errors import ConfigError
from .modeling import WeightsSource, apply_lora, build_model

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool, bf16: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config derived from the training config (the one place it is built).

    The global batch is the config's, whatever the world size: accumulation is derived. bf16 is
    on with GPUs (``bf16`` forces it either way: DeepSpeed's CPU accelerator runs it too). The
    config must be resolved (no ``auto``: see :func:`ray_mtup.memory.resolve_auto`).

    >>> ds = deepspeed_config(TrainConfig(zero_stage=3, per_device_batch_size=2, num_workers=4), 4, True)
    >>> ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["zero_optimization"]["stage"]
    (16, 2, 3)
    >>> ds["bf16"]["enabled"], ds["optimizer"]["params"]["torch_adam"]
    (True, True)
    """
    stage = cfg.stage()
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    accum = grad_accum(cfg, world_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch(),
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch() * accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "weight_decay": cfg.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                # torch's AdamW: nothing is JIT-compiled (FusedAdam/CPUAdam need a compiler).
                "torch_adam": True,
            },
        },
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu if bf16 is None else bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Accumulation steps that keep the global batch at ``cfg.global_batch_size`` on ``world_size`` workers.

    >>> grad_accum(TrainConfig(model="qwen2.5-7b", per_device_batch_size=2, num_workers=4), 1)
    8
    >>> grad_accum(TrainConfig(model="qwen2.5-7b", per_device_batch_size=2, num_workers=4), 4)
    2
    """
    micro = cfg.micro_batch() * world_size
    if cfg.global_batch_size % micro:
        raise ConfigError("global_batch_size", f"{cfg.global_batch_size} is not a multiple of micro-batch "
                                               f"{cfg.per_device_batch_size} x {world_size} worker(s)")
    return cfg.global_batch_size // micro


@dataclass
class Schedule:
    """Optimizer steps of the run: per epoch, in all, and of warm-up."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def build_engine(cfg: TrainConfig, source: WeightsSource, tokenizer: Any, world_size: int, on_gpu: bool,
                 schedule: Schedule, checkpoints: Sequence[Path] = (), device: Any = None,
                 bf16: bool | None = None) -> tuple[Any, Any, dict[str, Any] | None]:
    """(engine, keep-alive, resumed trainer state or None).

    The base is loaded from ``source`` (partitioned while loading under ZeRO-3), LoRA is
    applied, the newest usable of ``checkpoints`` (newest first; see
    :func:`~ray_mtup.checkpointing.load_resume_state`) is loaded into it, then
    ``deepspeed.initialize``; a resumed run's schedule continues at its saved step. Keep the
    second value alive as long as the engine: under ZeRO-3 transformers reads it to know the
    weights are partitioned. Under ZeRO-2 the base is read straight onto ``device`` (a GPU).
    ``bf16`` (default: ``on_gpu``) trains in bf16 with fp32 master weights; the adapter then
    computes in bf16 under both stages (:func:`~ray_mtup.modeling.apply_lora`).
    """
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup
    from transformers.integrations import HfDeepSpeedConfig

    init_distributed(on_gpu)
    import torch

    bf16 = on_gpu if bf16 is None else bf16
    ds_config = deepspeed_config(cfg, world_size, on_gpu, bf16)
    keep_alive = HfDeepSpeedConfig(ds_config)  # before from_pretrained: ZeRO-3 partitions on load
    base = build_model(source, cfg, tokenizer, "cuda" if on_gpu else "cpu", device=device,
                       dtype=torch.bfloat16 if bf16 else torch.float32)
    model = apply_lora(base, cfg.lora)
    resume = load_resume_state(model, list(checkpoints))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, schedule.warmup_steps, schedule.total_steps),
    )
    for _ in range(resume["global_step"] if resume else 0):  # continue the schedule where it stopped
        engine.lr_scheduler.step()
    return engine, keep_alive, resume
