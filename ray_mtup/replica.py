"""Evaluation generation outside the ZeRO-3 lockstep: a plain, LoRA-merged replica per rank.

Under ZeRO-3 with several workers every forward pass gathers each layer's weights from all
ranks, so generation runs in lockstep (``synced_gpus=True``): every rank decodes until the
slowest row of any rank ends, and every token pays the all-gathers. When one full copy of the
model fits on a device, each rank instead gathers the weights once per evaluation, merging the
LoRA deltas into the base weights as it goes (:func:`build_replica`), generates its shard alone,
and frees the copy (:func:`merged_replica`).

:func:`plan_generation` picks the path of ``TrainConfig.eval_generation``:

* ``plain``: ZeRO-2 or one worker; the engine's model, its LoRA merged in place for the
  evaluation (:func:`merged_in_place`);
* ``replica``: the copy above; ``auto`` takes it when it fits on every rank's device
  (:func:`ray_mtup.memory.replica_fits`: the replica's bytes plus the KV cache and activations
  of one evaluation batch, :func:`generation_margin`, against the memory the device reports);
* ``synced``: generation on the partitioned engine model in lockstep, its LoRA merged in
  place (:func:`merged_in_place`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .config import TrainConfig
from .distributed import all_reduce, gather
from .errors import ModelError
from .memory import GIB, HEADROOM, device_memory, replica_bytes, replica_fits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationPlan:
    """How this evaluation generates: ``path`` (plain, replica or synced) and why."""

    path: str
    reason: str

    @property
    def synced_gpus(self) -> bool:
        """Whether ``generate`` must run in lockstep with the other ranks."""
        return self.path == "synced"


def choose_path(mode: str, zero3: bool, world: int, fits: bool | None) -> GenerationPlan:
    """The path for ``eval_generation=mode``; ``fits``: whether a replica fits on every rank
    (None when not checked).

    >>> choose_path("auto", zero3=True, world=2, fits=True).path
    'replica'
    >>> choose_path("auto", zero3=True, world=2, fits=False).path
    'synced'
    >>> choose_path("replica", zero3=False, world=4, fits=None).path
    'plain'
    >>> choose_path("synced", zero3=True, world=1, fits=None).path
    'plain'
    >>> choose_path("synced", zero3=True, world=2, fits=True).reason
    'eval_generation=synced'
    """
    if not (zero3 and world > 1):
        return GenerationPlan("plain", "the engine's model is whole (ZeRO-2 or one worker)")
    if mode == "synced":
        return GenerationPlan("synced", "eval_generation=synced")
    if mode == "replica":
        note = "" if fits is not False else " although the fit check says it does not fit"
        return GenerationPlan("replica", f"eval_generation=replica{note}")
    if fits:
        return GenerationPlan("replica", "auto: a merged replica fits on every rank's device")
    return GenerationPlan("synced", "auto: a merged replica does not fit on every rank's device")


def base_parameter_count(model: Any) -> int:
    """Parameters of the model without its LoRA adapter (full sizes under ZeRO-3, where a
    partitioned tensor's ``numel()`` is 0 and its full size is ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters() if "lora_" not in name)


def generation_margin(config: Any, batch: int, seq_len: int, bytes_per_value: int) -> int:
    """Bytes of one evaluation batch beside the weights: the KV cache of ``batch`` rows of
    ``seq_len`` tokens (prompt + budget), the prefill's activations of one layer (hidden
    states, q/k/v, MLP, the attention scores of an eager kernel), and fp32 logits.

    >>> from transformers import Qwen2Config
    >>> q7 = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    ...                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
    >>> round(generation_margin(q7, batch=32, seq_len=1536, bytes_per_value=2) / 2**30, 1)
    13.1
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_cache = 2 * config.num_hidden_layers * kv_heads * head_dim * batch * seq_len * bytes_per_value
    activations = batch * seq_len * (4 * config.hidden_size + 3 * config.intermediate_size) * bytes_per_value
    scores = batch * heads * seq_len * seq_len * bytes_per_value
    logits = 2 * batch * config.vocab_size * 4
    return kv_cache + activations + scores + logits


def rows_that_fit(config: Any, seq_len: int, bytes_per_value: int, free: int, rows: int, floor: int) -> int:
    """Rows of one generation batch: as many of ``rows`` as :func:`generation_margin` fits in
    :data:`~ray_mtup.memory.HEADROOM` of ``free`` bytes, and never fewer than ``floor``.

    >>> from transformers import Qwen2Config
    >>> q7 = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    ...                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
    >>> rows_that_fit(q7, 1536, 2, free=100 * GIB, rows=184, floor=32)   # an H200 beside a 7B replica
    184
    >>> rows_that_fit(q7, 1536, 2, free=20 * GIB, rows=184, floor=32)
    43
    """
    per_row = generation_margin(config, 1, seq_len, bytes_per_value)
    return max(floor, min(rows, int(HEADROOM * free) // max(1, per_row)))


def generation_batch_size(model: Any, cfg: TrainConfig, device: Any, seq_len: int, rows: int, world: int) -> int:
    """The evaluation batch: on a GPU the whole shard when it fits beside the weights (decode is
    memory-bound there, so more rows cost little per step), else what fits; on the CPU
    ``eval_batch_size`` (compute-bound: a bigger batch spends steps on rows that have ended).
    The same on every rank (the smallest), as synced generation needs."""
    import torch

    if torch.device(device).type != "cuda":
        return cfg.eval_batch_size
    per_value = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    free, _ = device_memory(device)
    mine = rows_that_fit(_base_model(model).config, seq_len, per_value, free, rows, cfg.eval_batch_size)
    return int(-all_reduce([-mine], device, world, "max")[0])


def plan_generation(model: Any, cfg: TrainConfig, zero3: bool, world: int, device: Any, seq_len: int) -> GenerationPlan:
    """The path of this evaluation (the same on every rank). With ``auto`` and ``replica`` under
    ZeRO-3 on several workers it is a collective: every rank reports its device's free memory,
    and ranks on the same device (the CPU ranks of one host) count against it together."""
    import torch

    if not (zero3 and world > 1) or cfg.eval_generation == "synced":
        return choose_path(cfg.eval_generation, zero3, world, None)
    base = _base_model(model)
    dtype = next(model.parameters()).dtype
    per_param = torch.empty((), dtype=dtype).element_size()
    n_params = base_parameter_count(model)
    margin = generation_margin(base.config, cfg.eval_batch_size, seq_len, per_param)
    free, _ = device_memory(device)
    views = gather((socket.gethostname(), str(device), free, margin), world)
    sharing = [sum(1 for v in views if v[:2] == view[:2]) for view in views]
    fits = [replica_fits(n_params, per_param, f, m, s) for (_, _, f, m), s in zip(views, sharing)]
    plan = choose_path(cfg.eval_generation, zero3, world, all(fits))
    tight = min(range(world), key=lambda r: views[r][2] / max(1, sharing[r]))
    arithmetic = (f"{n_params:,} params x {per_param} B = {n_params * per_param / GIB:.3f} GiB + margin "
                  f"{views[tight][3] / GIB:.3f} GiB, x {sharing[tight]} rank(s) on the device = "
                  f"{replica_bytes(n_params, per_param, views[tight][3], sharing[tight]) / GIB:.3f} GiB vs "
                  f"{HEADROOM:.0%} of {views[tight][2] / GIB:.2f} GiB free on rank {tight}")
    return GenerationPlan(plan.path, f"{plan.reason} ({arithmetic})")


def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (with LoRA layers injected), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def merged_replica(model: Any, device: Any) -> Iterator[Any]:
    """A plain copy of ``model`` with its LoRA merged (:func:`build_replica`) for the block,
    freed afterwards (collected, and the CUDA cache emptied on a GPU)."""
    import torch

    t0 = time.perf_counter()
    replica = build_replica(model, device)
    logger.debug("merged replica built in %.2f s", time.perf_counter() - t0)
    try:
        yield replica
    finally:
        del replica
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def build_replica(model: Any, device: Any) -> Any:
    """A plain (not partitioned, no LoRA modules) model on ``device`` holding ``model``'s weights
    with every active LoRA delta merged into its base weight, in ``model``'s dtype.

    Under ZeRO-3 this is a collective: the weights are gathered module by module
    (``deepspeed.zero.GatheredParameters``), so beyond the replica only one module is whole at
    a time. The replica is built by its class's constructor, not ``from_config`` /
    ``from_pretrained``: those enter ``zero.Init`` while a ZeRO-3 ``HfDeepSpeedConfig`` is alive
    and would partition it again.
    """
    import torch

    base = _base_model(model)
    dtype = next(model.parameters()).dtype
    config = copy.deepcopy(base.config)
    config.use_cache = True
    replica = _construct(type(base), config, dtype, torch.device(device))
    partitioned = [n for n, p in replica.named_parameters() if hasattr(p, "ds_id")]
    if partitioned:
        raise ModelError(f"the evaluation replica was partitioned by ZeRO-3 ({partitioned[:2]})")
    _copy_merged(base, replica)
    replica.generation_config = copy.deepcopy(base.generation_config)
    replica.eval()
    return replica


def _construct(cls: Any, config: Any, dtype: Any, device: Any) -> Any:
    """``cls(config)`` on ``device`` in ``dtype``, without initialising weights that are about to
    be overwritten."""
    import torch

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = cls(config)
        model.tie_weights()  # skipped with the init: one tensor for tied embeddings, as the original
        return model
    finally:
        torch.set_default_dtype(previous)


def _copy_merged(base: Any, replica: Any) -> None:
    """Copy ``base``'s weights (gathered one module at a time) into ``replica``, merging LoRA."""
    import deepspeed
    import torch
    from peft.tuners.lora import LoraLayer

    targets = dict(replica.named_modules())
    lora_prefixes: list[str] = []
    with torch.no_grad():
        for name, module in base.named_modules():
            if any(name.startswith(prefix) for prefix in lora_prefixes):
                continue  # base_layer, lora_A/B of a LoRA layer already merged
            if isinstance(module, LoraLayer):
                lora_prefixes.append(name + ".")
                with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                    _copy_lora_layer(module, targets[name])
                continue
            own = dict(module.named_parameters(recurse=False))
            if own:
                with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
                    for pname, param in own.items():
                        getattr(targets[name], pname).copy_(param)
            for bname, buf in module.named_buffers(recurse=False):  # e.g. RoPE's inv_freq, as the engine has it
                mine = getattr(targets[name], bname, None)
                if isinstance(mine, torch.Tensor) and mine.shape == buf.shape:
                    mine.copy_(buf)


def merged_weight(layer: Any) -> Any:
    """A LoRA layer's base weight plus its active adapters' deltas, computed in fp32 from the
    adapter's values (``B @ A * scaling``), in the base weight's dtype: the one merge of
    evaluation (in place or into a replica) and of ``predict``, so both generate from the same
    weights whatever dtype each holds the adapter in."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import transpose

    base_layer = layer.get_base_layer()
    weight = base_layer.weight.detach().float()
    if not layer.disable_adapters:
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                if isinstance(layer, LoraLinear) and not layer.use_dora.get(adapter, False):
                    delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
                    delta = transpose(delta, layer.fan_in_fan_out) * layer.scaling[adapter]
                else:
                    delta = layer.get_delta_weight(adapter).float()
                weight = weight + delta
    return weight.to(base_layer.weight.dtype)


def lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merged_in_place(model: Any) -> Iterator[Any]:
    """``model`` (a peft model) generating from merged weights for the block: each LoRA layer's
    base weight is backed up to the host, overwritten with :func:`merged_weight`, and the
    adapters are switched off; on exit the exact base weights come back. Costs no device
    memory (the replica costs a model). Under ZeRO-3 each layer is gathered to merge and the
    backup is the rank's own partition."""
    import deepspeed
    import torch

    layers = lora_layers(model)
    backups = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                own = weight.ds_tensor if hasattr(weight, "ds_id") else weight.data
                backups.append((weight, own, own.detach().to("cpu", copy=True)))
                with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
                    weight.data.copy_(merged_weight(layer))
        with model.disable_adapter():
            yield model
    finally:
        with torch.no_grad():
            for _, own, saved in backups:
                own.copy_(saved.to(own.device))


def merge_and_unload(model: Any) -> Any:
    """The plain model of a peft ``model`` with every LoRA layer merged by :func:`merged_weight`
    (``predict``'s model: the weights evaluation generated from)."""
    import torch

    with torch.no_grad():
        for layer in lora_layers(model):
            layer.get_base_layer().weight.data.copy_(merged_weight(layer))
    return model.unload()


def _copy_lora_layer(layer: Any, target: Any) -> None:
    """``target.weight = merged_weight(layer)`` (base weight plus the active adapters' deltas)."""
    base_layer = layer.get_base_layer()
    target.weight.copy_(merged_weight(layer))
    if getattr(base_layer, "bias", None) is not None:
        target.bias.copy_(base_layer.bias)
