"""Checkpoint I/O of the per-worker loop: what an epoch saves and what a resumed run loads.

A checkpoint directory holds the LoRA adapter (safetensors), the trained base weights when
``lora.train_base`` is on, the tokenizer, ``trainer_state.json`` (epoch, step, history, config)
and the epoch's validation predictions. Under ZeRO-3 the weights are gathered from every rank
before saving, and scattered back when a resumed run loads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .errors import TrainingError
from .modeling import BASE_FILE

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.json"
PREDICTIONS_FILE = "val_predictions.txt"
PREDICTIONS_JSONL = "val_predictions.jsonl"


def _gathered(params: Sequence[Any], modifier_rank: int | None) -> contextlib.AbstractContextManager:
    """Full tensors of (possibly ZeRO-3 partitioned) ``params`` inside the block; a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def trainable_state(model: Any) -> dict[str, Any]:
    """Full (gathered) trainable weights on CPU; under ZeRO-3 every rank must call this."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _gathered([p for _, p in params], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params}


def weights_digest(weights: dict[str, Any]) -> str:
    """A short hash of named tensors (key order independent); proves which adapter is loaded."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(directory: Path, model: Any, tokenizer: Any, state: dict[str, Any],
                    weights: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> None:
    """Adapter (safetensors), tokenizer, trainer state and the epoch's validation predictions.

    ``model`` is the PeftModel; ``weights`` its gathered trainable tensors
    (:func:`trainable_state`). ``predictions`` are dicts with id, sentence, raw, task1_graph and
    task2_graph (None when invalid); the JSONL keeps them exactly (for re-scoring), the .txt is
    for reading.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_sd = get_peft_model_state_dict(model, state_dict=weights)
    model.save_pretrained(str(directory), state_dict=adapter_sd, safe_serialization=True)
    base = {n: w for n, w in weights.items() if "lora_" not in n}
    if base:  # lora.train_base: the trained base weights, named as in the PeftModel
        save_file(base, str(directory / BASE_FILE))
    tokenizer.save_pretrained(str(directory))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    with (directory / PREDICTIONS_JSONL).open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    lines = []
    for p in predictions:
        graph = p["task2_graph"] if p["task2_graph"] is not None else "# invalid output (scored as empty)"
        lines.append(f"#::snt {p['sentence']}\n{graph}\n")
    (directory / PREDICTIONS_FILE).write_text("\n".join(lines), encoding="utf-8")


def assign_weights(model: Any, weights: dict[str, Any], source: Path) -> None:
    """Copy named tensors into ``model``'s parameters (scattered back to every rank under ZeRO-3)."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TrainingError(f"{source} does not fit the model: {missing[:3]}")
    targets = [params[n] for n in weights]
    with _gathered(targets, modifier_rank=0), torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))


def load_resume_state(model: Any, directory: Path | None) -> dict[str, Any] | None:
    """Load the checkpoint in ``directory`` (adapter, and trained base weights when saved) into
    the PeftModel ``model`` before its engine is built; return its trainer state, or None for a
    fresh start."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if directory is None:
        return None
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    adapter = load_file(str(directory / ADAPTER_FILE))  # safetensors: no pickle is executed
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise TrainingError(f"{directory / ADAPTER_FILE} does not fit the model: {result.unexpected_keys[:3]}")
    if (directory / BASE_FILE).is_file():  # lora.train_base; partitioned under ZeRO-3
        assign_weights(model, load_file(str(directory / BASE_FILE)), directory / BASE_FILE)
    state["loaded_adapter_digest"] = weights_digest(trainable_state(model))
    logger.info("resuming after epoch %d (adapter %s)", state["epoch"], state["loaded_adapter_digest"])
    return state
