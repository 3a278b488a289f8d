"""Memory planning: the ZeRO stage and the micro-batch chosen from what a device reports, and
whether an evaluation replica of the merged model fits (:func:`replica_fits`).

``zero_stage: auto`` and ``per_device_batch_size: auto`` are resolved here, once on every
worker, before the engine is built (:func:`resolve_auto`, called by
:func:`ray_mtup.training.train_loop`). The estimate is arithmetic on the model's shape (read
from the model's ``config.json``, on disk or through the hub's cache, by
:mod:`ray_mtup.models`; no weights are loaded) and the run config. Per device, in bytes:

* **base weights** in the training dtype (bf16 on GPU, fp32 on CPU), divided by the world
  size under ZeRO-3; a base that trains too (``lora.train_base``) adds its fp32 master copy,
  gradient and AdamW moments (16 bytes a parameter), sharded over the world (stages 2 and 3);
* **trainable state** of the LoRA adapter (rank ``r`` on ``lora.target_modules``): its
  working copy in the training dtype (replicated under ZeRO-2, sharded under 3) plus the fp32
  master copy, fp32 gradient and the two fp32 AdamW moments, sharded over the world (16 bytes
  a parameter; on the host instead with ``offload``);
* **ZeRO buffers**: the gradient reduce bucket (DeepSpeed's default 5e8 elements, or fewer
  when fewer parameters train); under ZeRO-3 also the gathered parameters of the largest
  module (the embedding or one decoder layer) twice over (the one in use and the prefetched one);
* **activations** of a micro-batch of ``B`` sequences of the planned length ``s`` (the
  longest encoded training example: the length-grouped batches put the longest ones
  together), per token and per layer (:func:`activation_bytes_per_token_layer`, after
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  eq. 1, rewritten for the gated MLP of Qwen2/3, Llama and Gemma 3, grouped-query attention
  with a fused (SDPA) kernel that stores no ``s x s`` scores, RoPE and RMSNorm, plus LoRA's
  dropout copies; a sliding window, which only bounds the scores such a kernel never stores,
  changes nothing here and is named in the plan's notes);
  with gradient checkpointing only every layer's input is kept, plus one layer recomputed;
* **logits** of the whole vocabulary for the loss (:func:`logits_bytes_per_token`);
* a **margin**: 10 % of the estimate plus 1 GiB (CUDA context, allocator fragmentation,
  communication buffers, the backward's transient gradients).

Fitting means estimate + margin <= the free memory the device reports (the minimum over
ranks). The micro-batch candidates are the divisors of ``global_batch_size / world``; the
largest that fits wins (1, with a note, when none does). The stage is 2 when the plan fits
under ZeRO-2, else 3 (and the micro-batch is planned again under ZeRO-3). Explicit integers
are never changed; the plan then only reports whether they are expected to fit.

    python -m ray_mtup.memory --model qwen2.5-7b --device-memory 141e9 --world 1
    python -m ray_mtup.memory --model path/to/checkpoint --device-memory 141e9 --json

>>> shape = ModelShape(3584, 18944, 28, 28, 4, 152064)  # Qwen2.5-7B-Instruct's config.json
>>> round(shape.base_params() / 1e9, 3), round(base_weight_bytes(shape, 2, 1, 2) / 1e9, 1)
(7.616, 15.2)
>>> plan = plan_memory(shape, world=1, free_bytes=141e9, total_bytes=141e9, on_gpu=True, seq_len=1024,
...                    global_batch_size=16, zero_stage="auto", micro_batch="auto", lora=LoraSettings())
>>> plan.zero_stage, plan.micro_batch_size, plan.grad_accum, plan.fits
(2, 8, 2, True)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from . import models
from .config import LoraSettings, TrainConfig, resolve_config
from .distributed import all_reduce
from .errors import ConfigError, RayMtupError
from .models import ModelShape, read_model_config, shape_from_config

logger = logging.getLogger(__name__)

GIB = 2**30
#: The margin: a share of the estimate plus a fixed amount (bytes).
MARGIN_FRACTION = 0.10
MARGIN_FIXED = 1 * GIB
#: DeepSpeed's default ``reduce_bucket_size`` (elements); the engine does not change it.
REDUCE_BUCKET = 500_000_000
#: fp32 master copy + fp32 gradient + AdamW's two fp32 moments, per trained parameter.
OPTIMIZER_BYTES = 16
Auto = Literal["auto"]


def model_shape(model: str, path: str | None = None, gguf_file: str | None = None) -> ModelShape:
    """The shape of ``model`` whose weights are at ``path`` (a directory, a hub id, or the
    directory of ``gguf_file``), from its ``config.json`` (or a GGUF file's metadata), without
    loading weights (:func:`ray_mtup.models.read_model_config`)."""
    if path:
        return shape_from_config(read_model_config(path, gguf_file))
    return models.model_shape(model)


# --------------------------------------------------------------------------- the terms


def base_weight_bytes(shape: ModelShape, dtype_bytes: int, world: int, stage: int) -> int:
    """The base weights on one device: all of them under ZeRO-2, a 1/world shard under ZeRO-3.

    >>> s = ModelShape(3584, 18944, 28, 28, 4, 152064)
    >>> base_weight_bytes(s, 2, 4, 3) * 4 == base_weight_bytes(s, 2, 4, 2)
    True
    """
    return -(-shape.base_params() * dtype_bytes // (world if stage == 3 else 1))


def trainable_state_bytes(params: int, dtype_bytes: int, world: int, stage: int, offload: bool = False) -> int:
    """Trained parameters on one device: the working copy in the training dtype (sharded only
    under ZeRO-3) + fp32 master, gradient and AdamW moments (sharded; on the host with offload).

    >>> trainable_state_bytes(1000, 2, 1, 2), trainable_state_bytes(1000, 2, 4, 2), trainable_state_bytes(1000, 2, 4, 3)
    (18000, 6000, 4500)
    """
    working = params * dtype_bytes // (world if stage == 3 else 1)
    return working + (0 if offload else params * OPTIMIZER_BYTES // world)


def zero_buffer_bytes(shape: ModelShape, trainable: int, dtype_bytes: int, stage: int) -> int:
    """DeepSpeed's gradient reduce bucket; under ZeRO-3 also two gathered largest modules.

    >>> zero_buffer_bytes(ModelShape(3584, 18944, 28, 28, 4, 152064), 10**6, 2, 2)
    2000000
    """
    bucket = min(REDUCE_BUCKET, trainable) * dtype_bytes
    if stage != 3:
        return bucket
    return bucket + 2 * max(shape.embedding_params(), shape.layer_params()) * dtype_bytes


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int, lora: LoraSettings) -> int:
    """Bytes kept for the backward pass per token and per decoder layer, without recomputation.

    Korthikanti et al.'s eq. 1 counts ``sbh(34 + 5as/h)`` bytes a layer for a GPT layer in
    16-bit. Counted the same way, element by element, for a Qwen2 layer (``h`` hidden, ``k``
    K/V width, ``i`` MLP width):

    * attention, ``4h + 3k``: the normed input of q/k/v (``h``), q, k, v (``h + 2k``), q and k
      after RoPE (``h + k``), the input of o_proj (``h``); the fused SDPA kernel keeps only a
      log-sum-exp per head, not the ``5as/h`` scores of the paper;
    * MLP, ``h + 4i``: the normed input of gate/up, their outputs, SiLU's output and the product;
    * the two RMSNorms, ``4h``: each keeps its input and its normalised copy;
    * LoRA with dropout > 0: each adapted linear keeps its dropped-out input (``in`` elements
      and a 1-byte mask each) and the ``r`` outputs of its A matrix.

    >>> s = ModelShape(64, 128, 2, 4, 2, 300)
    >>> activation_bytes_per_token_layer(s, 2, LoraSettings(r=8, target_modules=("q_proj",), dropout=0.0))
    2384
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    elements = (4 * h + 3 * kv) + (h + 4 * i) + 4 * h
    shapes = shape.linear_shapes()
    lora_bytes = 0
    for target in shape.lora_targets(lora.target_modules):
        d_in = shapes[target][0]
        lora_bytes += lora.r * dtype_bytes + (d_in * (dtype_bytes + 1) if lora.dropout > 0 else 0)
    return elements * dtype_bytes + lora_bytes


def logits_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """The loss over the vocabulary, per token: the logits in the training dtype, their fp32
    copy (transformers' loss upcasts), the fp32 log-softmax cross-entropy keeps, and the
    backward's fp32 gradient of it.

    >>> logits_bytes_per_token(ModelShape(3584, 18944, 28, 28, 4, 152064), 2)
    2128896
    """
    return shape.vocab_size * (dtype_bytes + 12)


def activation_bytes(shape: ModelShape, dtype_bytes: int, lora: LoraSettings, tokens: int,
                     gradient_checkpointing: bool) -> int:
    """Activations of ``tokens`` tokens (micro-batch x length) through every layer: all of
    them kept, or (checkpointing) each layer's input plus one layer recomputed at a time.

    >>> s = ModelShape(3584, 18944, 28, 28, 4, 152064)
    >>> activation_bytes(s, 2, LoraSettings(), 1024, True) < activation_bytes(s, 2, LoraSettings(), 1024, False) / 10
    True
    """
    per_layer = activation_bytes_per_token_layer(shape, dtype_bytes, lora)
    if gradient_checkpointing:
        return tokens * (shape.num_layers * shape.hidden_size * dtype_bytes + per_layer)
    return tokens * shape.num_layers * per_layer


def margin_bytes(estimate: int) -> int:
    """10 % of the estimate plus 1 GiB.

    >>> margin_bytes(10 * GIB) == 2 * GIB
    True
    """
    return int(MARGIN_FRACTION * estimate) + MARGIN_FIXED


def micro_batch_candidates(global_batch_size: int, world: int) -> list[int]:
    """Micro-batches that keep the global batch exact on ``world`` workers, largest first.

    >>> micro_batch_candidates(16, 1), micro_batch_candidates(16, 4), micro_batch_candidates(12, 2)
    ([16, 8, 4, 2, 1], [4, 2, 1], [6, 3, 2, 1])
    """
    if global_batch_size % world:
        raise ConfigError("global_batch_size", f"{global_batch_size} is not a multiple of the {world} worker(s)")
    per_worker = global_batch_size // world
    return [m for m in range(per_worker, 0, -1) if per_worker % m == 0]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Estimate:
    """Every term at one (stage, micro-batch), in bytes per device."""

    zero_stage: int
    micro_batch_size: int
    base_weights: int
    trainable_state: int
    zero_buffers: int
    activations: int
    logits: int
    margin: int

    @property
    def needed(self) -> int:
        """The estimate plus the margin: what must be free."""
        return (self.base_weights + self.trainable_state + self.zero_buffers + self.activations + self.logits
                + self.margin)


@dataclass(frozen=True)
class MemoryPlan:
    """The resolved ZeRO stage and micro-batch with every term of the arithmetic behind them."""

    model_shape: dict[str, Any]
    world_size: int
    on_gpu: bool
    dtype_bytes: int
    seq_len: int
    global_batch_size: int
    gradient_checkpointing: bool
    offload: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    base_params: int
    trainable_params: int
    device_free_bytes: int
    device_total_bytes: int
    requested_zero_stage: int | str
    requested_micro_batch: int | str
    zero_stage: int
    micro_batch_size: int
    grad_accum: int
    fits: bool
    chosen: Estimate
    considered: tuple[Estimate, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (for summary.json and the checkpoint's trainer state)."""
        out = asdict(self)
        out["chosen"]["needed"] = self.chosen.needed
        for est, d in zip(self.considered, out["considered"]):
            d["needed"] = est.needed
        out["lora_targets"] = list(self.lora_targets)
        out["considered"] = list(out["considered"])
        out["notes"] = list(self.notes)
        out["explain"] = self.explain()
        return out

    def explain(self) -> str:
        """The plan for a person: the choice, each term, what was tried, notes.

        >>> plan = plan_memory(ModelShape(3584, 18944, 28, 28, 4, 152064), world=4, free_bytes=24e9, total_bytes=24e9,
        ...                    on_gpu=True, seq_len=1024, global_batch_size=16, zero_stage="auto",
        ...                    micro_batch="auto", lora=LoraSettings())
        >>> print(plan.explain().splitlines()[0])
        memory plan: ZeRO-3, micro-batch 1 x accumulation 4 x 4 worker(s) = global batch 16 (zero_stage auto, per_device_batch_size auto)
        """
        c = self.chosen
        lines = [
            f"memory plan: ZeRO-{self.zero_stage}, micro-batch {self.micro_batch_size} x accumulation "
            f"{self.grad_accum} x {self.world_size} worker(s) = global batch {self.global_batch_size} "
            f"(zero_stage {self.requested_zero_stage}, per_device_batch_size {self.requested_micro_batch})",
            f"  device: {_gb(self.device_free_bytes)} free of {_gb(self.device_total_bytes)} "
            f"({'GPU, bf16' if self.on_gpu else 'CPU, fp32'}; the least free over ranks)",
            f"  model: {self.base_params / 1e9:.3f}B parameters, {self.trainable_params / 1e6:.1f}M trained "
            f"(LoRA r {self.lora_r} on {', '.join(self.lora_targets)}); sequences of {self.seq_len} tokens"
            f"{', gradient checkpointing' if self.gradient_checkpointing else ''}"
            f"{', optimizer offloaded' if self.offload else ''}",
            f"  base weights     {_gb(c.base_weights)}",
            f"  trainable state  {_gb(c.trainable_state)}",
            f"  ZeRO buffers     {_gb(c.zero_buffers)}",
            f"  activations      {_gb(c.activations)}",
            f"  logits (loss)    {_gb(c.logits)}",
            f"  margin           {_gb(c.margin)}",
            f"  needed           {_gb(c.needed)} -> {'fits' if self.fits else 'DOES NOT FIT'}",
            "  tried: " + ", ".join(f"ZeRO-{e.zero_stage} x {e.micro_batch_size}: {_gb(e.needed)}"
                                    for e in self.considered),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def estimate(shape: ModelShape, *, stage: int, micro_batch: int, world: int, on_gpu: bool, seq_len: int,
             lora: LoraSettings, gradient_checkpointing: bool = False, offload: bool = False) -> Estimate:
    """Every term at one stage and micro-batch (see the module docstring)."""
    dtype = 2 if on_gpu else 4
    lora_params = shape.lora_params(lora.r, lora.target_modules)
    base = base_weight_bytes(shape, dtype, world, stage)
    trainable = lora_params
    state = trainable_state_bytes(lora_params, dtype, world, stage, offload)
    if lora.train_base:  # the working copy is already the base weights
        trainable += shape.base_params()
        state += 0 if offload else shape.base_params() * OPTIMIZER_BYTES // world
    tokens = micro_batch * seq_len
    acts = activation_bytes(shape, dtype, lora, tokens, gradient_checkpointing)
    logits = tokens * logits_bytes_per_token(shape, dtype)
    buffers = zero_buffer_bytes(shape, trainable, dtype, stage)
    return Estimate(stage, micro_batch, base, state, buffers, acts, logits,
                    margin_bytes(base + state + buffers + acts + logits))


def plan_memory(shape: ModelShape, *, world: int, free_bytes: float, total_bytes: float, on_gpu: bool,
                seq_len: int, global_batch_size: int, zero_stage: int | Auto, micro_batch: int | Auto,
                lora: LoraSettings, gradient_checkpointing: bool = False, offload: bool = False) -> MemoryPlan:
    """Choose the stage and the micro-batch (explicit integers are kept) and say why.

    Stages tried: 2 then 3 (``auto``), else the given one; for each, the micro-batches
    :func:`micro_batch_candidates` (``auto``), else the given one; the first that fits wins.

    >>> kw = dict(world=1, total_bytes=80e9, on_gpu=True, seq_len=1024, global_batch_size=16, lora=LoraSettings())
    >>> p = plan_memory(ModelShape(3584, 18944, 28, 28, 4, 152064), free_bytes=80e9, zero_stage="auto", micro_batch=2, **kw)
    >>> p.zero_stage, p.micro_batch_size, p.grad_accum
    (2, 2, 8)
    """
    stages = [2, 3] if zero_stage == "auto" else [int(zero_stage)]
    micros = micro_batch_candidates(global_batch_size, world) if micro_batch == "auto" else [int(micro_batch)]
    if global_batch_size % (micros[-1] * world):
        raise ConfigError("global_batch_size", f"{global_batch_size} is not a multiple of micro-batch "
                                               f"{micros[-1]} x {world} worker(s)")
    considered: list[Estimate] = []
    chosen: Estimate | None = None
    for stage in stages:
        for m in micros:
            est = estimate(shape, stage=stage, micro_batch=m, world=world, on_gpu=on_gpu, seq_len=seq_len,
                           lora=lora, gradient_checkpointing=gradient_checkpointing, offload=offload)
            considered.append(est)
            if est.needed <= free_bytes:
                chosen = est
                break
        if chosen is not None:
            break
    notes: list[str] = []
    fits = chosen is not None
    if chosen is None:
        chosen = considered[-1]  # the last stage at the smallest micro-batch tried
        notes.append(f"nothing tried fits in {_gb(free_bytes)}: expect out of memory (try more workers, "
                     "gradient_checkpointing, offload, or a shorter max_seq_len)")
        if micro_batch == "auto":
            notes.append("micro-batch 1 for want of one that fits")
    if zero_stage == "auto" and chosen.zero_stage == 3:
        notes.append("ZeRO-2 does not fit: ZeRO-3 shards the base weights over the workers"
                     + ("; with one worker it shards nothing" if world == 1 else ""))
    if shape.sliding_layers:
        notes.append(f"{shape.sliding_layers} of {shape.num_layers} layers attend within a window of "
                     f"{shape.sliding_window} tokens: planned as full attention (the fused kernel keeps no "
                     "scores either way)")
    lora_params = shape.lora_params(lora.r, lora.target_modules)
    return MemoryPlan(
        model_shape=asdict(shape), world_size=world, on_gpu=on_gpu, dtype_bytes=2 if on_gpu else 4,
        seq_len=seq_len, global_batch_size=global_batch_size, gradient_checkpointing=gradient_checkpointing,
        offload=offload, lora_r=lora.r, lora_targets=shape.lora_targets(lora.target_modules), base_params=shape.base_params(),
        trainable_params=lora_params + (shape.base_params() if lora.train_base else 0),
        device_free_bytes=int(free_bytes), device_total_bytes=int(total_bytes),
        requested_zero_stage=zero_stage, requested_micro_batch=micro_batch, zero_stage=chosen.zero_stage,
        micro_batch_size=chosen.micro_batch_size,
        grad_accum=global_batch_size // (chosen.micro_batch_size * world), fits=fits, chosen=chosen,
        considered=tuple(considered), notes=tuple(notes))


def plan_for_config(cfg: TrainConfig, shape: ModelShape, *, world: int, free_bytes: float, total_bytes: float,
                    on_gpu: bool, seq_len: int) -> MemoryPlan:
    """:func:`plan_memory` with the run's settings taken from ``cfg``."""
    return plan_memory(shape, world=world, free_bytes=free_bytes, total_bytes=total_bytes, on_gpu=on_gpu,
                       seq_len=seq_len, global_batch_size=cfg.global_batch_size, zero_stage=cfg.zero_stage,
                       micro_batch=cfg.per_device_batch_size, lora=cfg.lora,
                       gradient_checkpointing=cfg.gradient_checkpointing, offload=cfg.offload)


def resolved(cfg: TrainConfig, plan: MemoryPlan) -> TrainConfig:
    """``cfg`` with the plan's integers in place of ``auto`` (explicit values are the plan's too)
    and ``num_workers`` the world the plan is for (torchrun's may differ from the config's), so
    the result validates as written to checkpoints.

    >>> plan = plan_for_config(TrainConfig(), ModelShape(1536, 8960, 28, 12, 2, 151936, True), world=1, free_bytes=141e9,
    ...                        total_bytes=141e9, on_gpu=True, seq_len=512)
    >>> cfg = resolved(TrainConfig(), plan)
    >>> (cfg.zero_stage, cfg.per_device_batch_size, cfg.num_workers)
    (2, 4, 1)
    """
    return cfg.model_copy(update={"zero_stage": plan.zero_stage, "per_device_batch_size": plan.micro_batch_size,
                                  "num_workers": plan.world_size})


# --------------------------------------------------------------------------- on the workers


def device_memory(device: Any) -> tuple[int, int]:
    """(free, total) bytes of ``device``: the GPU's own view on CUDA, the host's available
    memory otherwise.

    >>> free, total = device_memory("cpu")
    >>> 0 < free <= total
    True
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        import psutil
    except ImportError:  # a slim environment (no Ray): what the kernel calls free
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    mem = psutil.virtual_memory()
    return int(mem.available), int(mem.total)


def planned_seq_len(lengths: Sequence[int], on_gpu: bool) -> int:
    """The sequence length to plan for: the longest encoded example (length-grouped batches put
    the longest together), rounded up to the multiple of 8 the GPU collate pads to.

    >>> planned_seq_len([100, 301, 7], True), planned_seq_len([100, 301, 7], False)
    (304, 301)
    """
    longest = max(lengths)
    return -(-longest // 8) * 8 if on_gpu else longest


def resolve_auto(cfg: TrainConfig, lengths: Sequence[int], weights_path: str, weights_kwargs: Mapping[str, Any],
                 world: int, device: Any, on_gpu: bool) -> tuple[TrainConfig, MemoryPlan]:
    """The run's plan and its config with ints, the same on every rank: planned with the least
    free memory over the ranks (a collective when ``world > 1``; the process group must be up).

    On CPU the ranks of one host share its memory, so each counts ``1/world`` of what is free.
    """
    free, total = device_memory(device)
    if not on_gpu:
        free, total = free // world, total // world
    free = -all_reduce([-float(free)], device, world, "max")[0]  # the minimum over ranks
    shape = model_shape(cfg.model, weights_path, weights_kwargs.get("gguf_file"))
    plan = plan_for_config(cfg, shape, world=world, free_bytes=free, total_bytes=total, on_gpu=on_gpu,
                           seq_len=planned_seq_len(lengths, on_gpu))
    return resolved(cfg, plan), plan


# --------------------------------------------------------------------------- evaluation replicas

#: Share of the free memory a replica may use; the rest absorbs fragmentation and allocator caches.
HEADROOM = 0.9


def replica_bytes(n_params: int, bytes_per_param: int, margin: int = 0, sharers: int = 1) -> int:
    """Bytes that ``sharers`` replicas of ``n_params`` parameters need, each with ``margin`` more.

    >>> replica_bytes(7_600_000_000, 2, margin=2 * 2**30) / 2**30
    16.156...
    """
    return sharers * (n_params * bytes_per_param + margin)


def replica_fits(n_params: int, bytes_per_param: int, free: int, margin: int = 0, sharers: int = 1) -> bool:
    """Whether ``sharers`` replicas (ranks on the same device: the host's CPU ranks) plus their
    margins fit in :data:`HEADROOM` of ``free`` bytes.

    >>> replica_fits(7_600_000_000, 2, free=100 * 2**30, margin=4 * 2**30)   # a 7B in bf16, H200
    True
    >>> replica_fits(7_600_000_000, 2, free=12 * 2**30)                      # a 16 GiB card, mid-run
    False
    >>> replica_fits(1_000, 4, free=10_000, sharers=2)
    True
    >>> replica_fits(1_000, 4, free=10_000, sharers=3)
    False
    """
    return replica_bytes(n_params, bytes_per_param, margin, sharers) <= HEADROOM * free


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_mtup.memory",
                                description="Print the memory plan (ZeRO stage, micro-batch) for a device of a "
                                            "given size, without one.")
    p.add_argument("--model", required=True,
                   help="a registry name, a hub id or a checkpoint directory (its config.json gives the shape)")
    p.add_argument("--model-path", help="the model's weights stored apart: a directory or a .gguf file")
    p.add_argument("--device-memory", type=float, required=True, help="bytes free on each device, e.g. 141e9")
    p.add_argument("--world", type=int, default=1, help="workers (one device each)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens of the longest training example")
    p.add_argument("--cpu", action="store_true", help="plan for fp32 on CPU instead of bf16 on a GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig fields, e.g. --set lora.r=16 --set zero_stage=3 --set gradient_checkpointing=true")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    args = build_parser().parse_args(argv)
    try:
        sets = {k.strip(): yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
        model_path = str(Path(args.model_path).resolve()) if args.model_path else None
        cfg = resolve_config(args.model, overrides={"num_workers": args.world, "model_path": model_path, **sets})
        gguf = Path(model_path).name if model_path and model_path.endswith(".gguf") else None
        plan = plan_for_config(cfg, model_shape(cfg.model, str(Path(model_path).parent) if gguf else model_path, gguf),
                               world=args.world,
                               free_bytes=args.device_memory, total_bytes=args.device_memory,
                               on_gpu=not args.cpu, seq_len=args.seq_len)
    except RayMtupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
