"""Ship a trained parser as one model: ``python -m ray_mtup export --run R --output DIR``.

The run's chosen adapter (a run's ``adapter/``, a search's ``best_adapter/``, or a checkpoint)
is loaded onto its base exactly as ``predict`` loads it (:func:`ray_mtup.predict.load_merged`:
the adapter, and with ``lora.train_base`` the trained base weights, merged with peft's
``merge_and_unload``), and written as a plain transformers checkpoint that transformers
(``from_pretrained``) and vLLM load without peft or ray_mtup:

* the merged weights in safetensors (``model*.safetensors``, ``config.json``), in the base's dtype
  (bf16 for Qwen2.5) unless ``dtype`` says otherwise;
* the tokenizer;
* ``generation_config.json`` with the project's decoding (:func:`ray_mtup.generation.decoding_config`:
  greedy, no repetition penalty, the run's token budget), not the base's sampling defaults;
* ``ray_mtup_config.yaml``: the run's config (prompt template, corpus, seed);
* ``README.md``: a model card (:mod:`ray_mtup.cards`) with the validation and test F and their
  intervals from the run's ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import cards
from .checkpointing import STATE_FILE
from .config import TrainConfig
from .errors import ConfigError, ModelError
from .generation import decoding_config
from .holdout import validation_interval
from .predict import find_adapter, inference_source, load_merged

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
CONFIG_FILE = "ray_mtup_config.yaml"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ExportReport:
    output: str
    adapter: str
    base: str
    dtype: str
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_output(output: str | Path) -> Path:
    """``output`` must be a new or empty directory (checked before any weights are loaded)."""
    path = Path(output)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError("output", f"{path} exists and is not an empty directory; choose a new one")
    return path


def run_summary(adapter_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of the run (``adapter/``) or search (``best_adapter/``) that holds
    ``adapter_dir``; ``{}`` for a bare checkpoint."""
    path = adapter_dir.parent / SUMMARY_FILE
    if adapter_dir.name not in ("adapter", "best_adapter") or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable run summary: {exc}") from exc


def card_figures(adapter_dir: Path, summary: dict[str, Any], cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The card's figures: the summary's; a validation interval the summary lacks (a single
    run's) from the checkpoint's saved validation predictions; without a summary, the
    checkpoint's last validation epoch."""
    figures = cards.figures_from_summary(summary)
    if "validation" not in figures:
        state = json.loads((adapter_dir / STATE_FILE).read_text(encoding="utf-8"))
        figures.update(cards.figures_from_summary({"best": (state.get("history") or [{}])[-1]}))
    if "validation" in figures and figures["validation"].get("ci95") is None:
        measured = validation_interval(cfg, adapter_dir)
        if measured is not None:
            figures["validation"] = measured
    return figures


def _dtype(name: str, source_config: Any) -> Any:
    import torch

    if name not in DTYPES:
        raise ConfigError("dtype", f"must be one of {list(DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    recorded = getattr(source_config, "torch_dtype", None) or getattr(source_config, "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) else torch.float32


def export_model(run: str | Path, output: str | Path, model_path: str | None = None,
                 dtype: str = "auto") -> ExportReport:
    """Write the merged model of ``run`` into ``output`` (see the module doc)."""
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    output = check_output(output)
    adapter_dir = find_adapter(run)
    summary = run_summary(adapter_dir)
    state = json.loads((adapter_dir / STATE_FILE).read_text(encoding="utf-8"))
    model, tokenizer, cfg = load_merged(adapter_dir, model_path, device="cpu")  # fp32: an exact merge
    source = inference_source(state, cfg)
    target = _dtype(dtype, AutoConfig.from_pretrained(source.path, **source.kwargs))
    model = model.to(target)
    model.generation_config = decoding_config(tokenizer, cfg.max_new_tokens)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    cfg.write_yaml(output / CONFIG_FILE, f"config of the run exported from {adapter_dir}; retrain with:\n"
                                         f"  python run_tune.py --no-search --config {output / CONFIG_FILE}")
    cards.write_card(output, cfg, card_figures(adapter_dir, summary, cfg), "merged",
                     recorded_base=state.get("base_source"), source=str(adapter_dir))
    files = sorted(p.name for p in output.iterdir())
    logger.info("exported %s (%s) to %s", adapter_dir, str(target).replace("torch.", ""), output)
    return ExportReport(str(output), str(adapter_dir), cards.base_name(cfg, state.get("base_source")),
                        str(target).replace("torch.", ""), files)
