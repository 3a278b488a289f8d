"""Checkpoint I/O of a training run: atomic writes, validated reads, fallback on resume.

A checkpoint directory holds the LoRA adapter (``adapter_model.safetensors`` and
``adapter_config.json``) with the project's model card (``README.md``, :mod:`ray_mtup.cards`), the tokenizer, the trainer state (``trainer_state.json``: epoch,
step, history, config), the epoch's validation predictions, and with ``lora.train_base`` the
trained base weights (``base_model.safetensors``).

* :func:`save_checkpoint` writes into a temporary sibling directory, fsyncs every file and
  renames it onto the target: a crash or a full disk never leaves a half-written checkpoint
  under the target's name.
* :func:`validate_checkpoint` checks that the trainer state parses and that every
  safetensors file has a readable header covering the whole file; a bad one raises
  :class:`~ray_mtup.errors.CheckpointError` naming the file.
* :func:`load_resume_state` resumes from the latest checkpoint its session offers; when that
  one is unusable it falls back to the newest earlier complete one (Ray Train keeps
  ``CheckpointConfig.num_to_keep``), saying so in the log and in the returned state's
  ``resume_note``. Without one it raises: a run never silently starts again from scratch.

Under ZeRO-3 the weights are gathered from every rank before saving
(:func:`trainable_state`), and scattered back when a resumed run loads them
(:func:`assign_weights`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cards import CARD_FILE, figures_from_summary, render_card
from .config import TrainConfig
from .errors import CheckpointError, TrainingError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
BASE_FILE = "base_model.safetensors"  # trained base weights, only with lora.train_base (tiny)
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "trainer_state.json"
PREDICTIONS_FILE = "val_predictions.txt"
PREDICTIONS_JSONL = "val_predictions.jsonl"
STATE_KEYS = ("epoch", "global_step", "history")

#: Called with the name of each part just before it is written (fault injection in tests).
WriteHook = Callable[[str], None]


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


def assign_weights(model: Any, weights: dict[str, Any], source: Path) -> None:
    """Copy named tensors into ``model``'s parameters (scattered back to every rank under ZeRO-3)."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise CheckpointError(f"does not fit the model: {missing[:3]}", source)
    with _gathered([params[n] for n in weights], modifier_rank=0), torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))


def load_trained_base(model: Any, directory: Path) -> bool:
    """Load ``base_model.safetensors`` (``lora.train_base``) of ``directory`` into ``model``
    (ZeRO-3-aware, see :func:`assign_weights`); False when the checkpoint has none."""
    from safetensors.torch import load_file

    path = Path(directory) / BASE_FILE
    if not path.is_file():
        return False
    assign_weights(model, load_file(str(path)), path)
    return True


def weights_digest(weights: dict[str, Any]) -> str:
    """A short hash of named tensors (key order independent); proves which adapter is loaded."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(directory: Path, model: Any, tokenizer: Any, state: dict[str, Any],
                    weights: dict[str, Any], predictions: Sequence[dict[str, Any]],
                    before_write: WriteHook | None = None) -> None:
    """Adapter (safetensors), tokenizer, trainer state and the epoch's validation predictions.

    ``model`` is the PeftModel, ``weights`` its gathered trainable tensors (:func:`trainable_state`).
    ``directory`` must not exist or be empty; it appears complete or not at all.
    ``predictions`` are dicts with id, sentence, raw, task1_graph and task2_graph (None when
    invalid), and (:func:`ray_mtup.evaluation.prediction_records`) the gold graph and the
    sentence's own Task 2 F; the JSONL keeps them exactly (for re-scoring), the .txt is for
    reading (the corpus format, gold and F as comment lines).
    """
    def write(tmp: Path) -> None:
        _write_model_files(tmp, model, tokenizer, weights, before_write)
        if "config" in state:  # the project's card in place of peft's blank one (rewritten with the test F later)
            _write_text(tmp, CARD_FILE, render_card(TrainConfig.from_dict(state["config"]), figures_from_summary(
                {"best": (state.get("history") or [{}])[-1]}), "adapter", state.get("base_source")), before_write)
        _write_text(tmp, STATE_FILE, json.dumps(state, indent=2, ensure_ascii=False), before_write)
        _write_text(tmp, PREDICTIONS_JSONL,
                    "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), before_write)
        _write_text(tmp, PREDICTIONS_FILE, _readable_predictions(predictions), before_write)

    _atomic_directory(Path(directory), write)


def save_stop_state(directory: Path, state: dict[str, Any]) -> None:
    """A checkpoint with only the trainer state: a run that stopped (NaN loss, out of memory)
    records its history and ``stop_reason`` without weights worth keeping."""
    _atomic_directory(Path(directory), lambda tmp: _write_text(tmp, STATE_FILE, json.dumps(state, indent=2), None))


def _write_model_files(tmp: Path, model: Any, tokenizer: Any, weights: dict[str, Any],
                       before_write: WriteHook | None) -> None:
    from peft import get_peft_model_state_dict

    _call(before_write, ADAPTER_FILE)
    adapter_sd = get_peft_model_state_dict(model, state_dict=weights)
    model.save_pretrained(str(tmp), state_dict=adapter_sd, safe_serialization=True)
    base = {n: w for n, w in weights.items() if "lora_" not in n}
    if base:  # lora.train_base: the trained base weights, named as in the PeftModel
        from safetensors.torch import save_file

        _call(before_write, BASE_FILE)
        save_file(base, str(tmp / BASE_FILE))
    _call(before_write, "tokenizer")
    tokenizer.save_pretrained(str(tmp))


def _readable_predictions(predictions: Sequence[dict[str, Any]]) -> str:
    lines = []
    for p in predictions:
        graph = p["task2_graph"] if p["task2_graph"] is not None else "# invalid output (scored as empty)"
        notes = ""
        if "task2_f1" in p:
            notes += f"# F {p['task2_f1']:.4f}\n"
        if p.get("gold"):
            notes += "".join(f"# gold {line}\n" for line in p["gold"].splitlines())
        lines.append(f"#::snt {p['sentence']}\n{notes}{graph}\n")
    return "\n".join(lines)


def _call(hook: WriteHook | None, name: str) -> None:
    if hook is not None:
        hook(name)


def _write_text(directory: Path, name: str, text: str, before_write: WriteHook | None) -> None:
    _call(before_write, name)
    (directory / name).write_text(text, encoding="utf-8")


def _atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh sibling of ``target``, fsync it, rename it to ``target``."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError("exists and is not an empty directory; refusing to overwrite it", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)  # POSIX rename: atomic, and allowed onto an empty directory
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking every file a resume reads.

    A state-only checkpoint (one with a ``stop_reason``) needs no weights. Raises
    :class:`CheckpointError` naming the first missing, truncated or unparseable file.
    """
    directory = Path(directory)
    state = _read_state(directory / STATE_FILE)
    if state.get("stop_reason"):
        return state
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError("missing", directory / name)
    try:
        json.loads((directory / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable: {exc}", directory / ADAPTER_CONFIG_FILE) from exc
    _check_safetensors(directory / ADAPTER_FILE)
    if (directory / BASE_FILE).exists():
        _check_safetensors(directory / BASE_FILE)
    return state


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError("missing (the trainer state)", path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable trainer state: {exc}", path) from exc
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"trainer state lacks one of {list(STATE_KEYS)}", path)
    return state


def _check_safetensors(path: Path) -> None:
    """The header parses and its tensors cover the file exactly (a truncated file fails)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise CheckpointError("holds no tensors", path)
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError, OSError: the file is not a complete safetensors file
        raise CheckpointError(f"truncated or corrupt safetensors file: {exc}", path) from exc


def load_checkpoint_into(model: Any, directory: str | Path) -> dict[str, Any]:
    """Validate ``directory``, load its adapter (and base weights) into ``model``; its state.

    Adds ``loaded_adapter_digest`` to the state (the digest of what was loaded).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    state = validate_checkpoint(directory)
    if state.get("stop_reason"):
        return state
    weights = load_file(str(directory / ADAPTER_FILE))  # safetensors: no pickle is executed
    result = set_peft_model_state_dict(model, weights)  # LoRA tensors: not partitioned before the engine
    if getattr(result, "unexpected_keys", None):
        raise TrainingError(f"checkpoint adapter does not fit the model: {result.unexpected_keys[:3]}")
    load_trained_base(model, directory)  # lora.train_base; partitioned under ZeRO-3
    state["loaded_adapter_digest"] = weights_digest(trainable_state(model))
    return state


def load_resume_state(model: Any, candidates: Sequence[Path]) -> dict[str, Any] | None:
    """Resume from the newest of ``candidates`` (checkpoint directories, newest first), else from
    the newest complete earlier one.

    Returns None when there is none (a fresh start). When the latest checkpoint is unusable and
    an earlier one is used, the state carries ``resume_note`` saying so. Raises
    :class:`CheckpointError` naming the bad file when no checkpoint is usable.
    """
    if not candidates:
        return None
    try:
        state = load_checkpoint_into(model, candidates[0])
        logger.info("resuming after epoch %d (adapter %s)", state["epoch"], state.get("loaded_adapter_digest"))
        return state
    except CheckpointError as exc:
        problem = exc
    logger.error("the latest checkpoint is unusable: %s", problem)
    for directory in candidates[1:]:
        try:
            state = load_checkpoint_into(model, directory)
        except CheckpointError as exc:
            logger.error("an earlier checkpoint is unusable too: %s", exc)
            continue
        note = f"latest checkpoint unusable ({problem}); resumed from the epoch-{state['epoch']} checkpoint"
        logger.warning("%s", note)
        state["resume_note"] = note
        return state
    raise CheckpointError(f"{problem.message}; no earlier complete checkpoint to fall back to "
                          "(not starting again from scratch)", problem.path)


def recorded_memory_plan(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The memory plan (ZeRO stage, micro-batch, arithmetic) the workers recorded in a
    checkpoint's trainer state; None when the checkpoint has no state."""
    path = Path(checkpoint_dir) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")).get("memory_plan") if path.is_file() else None


def write_failure(epoch: int, exc: OSError) -> str:
    """The stop reason of a run whose epoch-``epoch`` checkpoint could not be written.

    >>> import errno
    >>> write_failure(2, OSError(errno.ENOSPC, "No space left on device"))
    'disk full while writing the epoch-2 checkpoint ([Errno 28] No space left on device); earlier checkpoints are untouched'
    """
    what = "disk full while writing" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "could not write"
    return f"{what} the epoch-{epoch} checkpoint ({exc}); earlier checkpoints are untouched"
