"""Model cards (``README.md``) of what a run ships: its adapter directories and an exported model.

peft's ``save_pretrained`` writes a blank template card next to every adapter; the project
writes its own in its place (:func:`write_card`): the base model, the data, the config that
produced the weights, the scores with their intervals and how to prompt the model.
The figures come from the run's ``summary.json`` (:func:`figures_from_summary`), or, in a
checkpoint written during training, from that epoch's validation metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from .config import SAMPLE_DATA_DIR, TrainConfig
from .prompts import get_template, render_inference

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
KINDS = ("adapter", "merged")

#: The TrainConfig fields a card lists (the whole config is in the run's config.yaml).
CARD_FIELDS = ("model", "model_path", "template", "learning_rate", "epochs", "global_batch_size", "max_seq_len",
               "seed", "max_samples", "val_split", "test_split", "retrieval_k", "constrained_decoding",
               "scoring_mode")

#: What a run on the shipped sample corpus says of itself, in its closing summary.
SAMPLE_CORPUS_NOTE = ("the sample corpus shipped with the package (synthetic sentences: its scores say nothing "
                      "about Vietnamese AMR; pass --data-dir for the VLSP corpus)")


def describe_corpus(cfg: TrainConfig) -> str:
    """The corpus a run trained on, for its closing summary and its cards.

    >>> describe_corpus(TrainConfig(data_dir="/data/vlsp2025"))
    '/data/vlsp2025'
    >>> describe_corpus(TrainConfig()) == SAMPLE_CORPUS_NOTE
    True
    """
    if cfg.data_dir is None or Path(cfg.data_dir).resolve() == SAMPLE_DATA_DIR.resolve():
        return SAMPLE_CORPUS_NOTE
    return str(cfg.data_dir)


def base_name(cfg: TrainConfig, recorded: str | None = None) -> str:
    """The base model as a reader can find it: the hub id, else the local weights.

    >>> base_name(TrainConfig(model="qwen2.5-7b"))
    'Qwen/Qwen2.5-7B-Instruct'
    """
    if cfg.model_path is not None:
        return cfg.model_path
    return cfg.spec.hub_id or recorded or f"the {cfg.model} test model (random weights)"


def data_description(cfg: TrainConfig) -> str:
    """The corpus a run trained on, as a card says it (:func:`describe_corpus`)."""
    described = describe_corpus(cfg)
    return described if described == SAMPLE_CORPUS_NOTE else f"the corpus in `{described}` (train_amr_*.txt)"


def figures_from_summary(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"validation": ..., "test": ...}`` of a run's or a search's ``summary.json``: each with
    ``task2_f1``, ``ci95`` (or None) and ``n`` (graphs), when known.

    >>> f = figures_from_summary({"best": {"task2_f1": 0.3, "n_eval": 184}, "test": {"task2_f1": 0.28,
    ...     "ci95": [0.24, 0.32], "n_graphs": 184, "test_set": "test split"}})
    >>> f["validation"], f["test"]["ci95"]
    ({'task2_f1': 0.3, 'ci95': None, 'n': 184}, [0.24, 0.32])
    """
    best = summary.get("best_metrics") or summary.get("best") or {}
    noise = summary.get("noise") or {}
    test = summary.get("test") or {}
    out: dict[str, dict[str, Any]] = {}
    if best.get("task2_f1") is not None:
        out["validation"] = {"task2_f1": best["task2_f1"], "ci95": noise.get("ci95"),
                             "n": noise.get("n_sentences") or best.get("n_eval")}
    if test.get("task2_f1") is not None:
        out["test"] = {"task2_f1": test["task2_f1"], "ci95": test.get("ci95"), "n": test.get("n_graphs"),
                       "what": test.get("test_set")}
    return out


def _score_rows(figures: Mapping[str, Mapping[str, Any]], mode: str) -> list[str]:
    rows = ["| split | Task 2 SMATCH F1 | 95% bootstrap interval | graphs |", "|---|---|---|---|"]
    names = {"validation": "validation (chose the epoch; optimistic)",
             "test": "held-out test (scored once, after the choice)"}
    for split in ("validation", "test"):
        f = figures.get(split)
        if f is None:
            rows.append(f"| {names[split]} | not measured | | |")
            continue
        ci = f.get("ci95")
        interval = f"{ci[0]:.4f} - {ci[1]:.4f}" if ci else "n/a"
        rows.append(f"| {names[split]} | {f['task2_f1']:.4f} | {interval} | {f.get('n') or '-'} |")
    rows.append("")
    rows.append(f"Corpus SMATCH, scoring mode `{mode}`" + (
        f"; the test graphs are the {figures['test']['what']}." if figures.get("test", {}).get("what") else "."))
    return rows


def render_card(cfg: TrainConfig, figures: Mapping[str, Mapping[str, Any]], kind: str,
                recorded_base: str | None = None, source: str | None = None) -> str:
    """The card's Markdown (with Hugging Face metadata) for an ``adapter`` or a ``merged`` model."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    base = base_name(cfg, recorded_base)
    template = get_template(cfg.template)
    prompt = render_inference(template, "<câu tiếng Việt, chữ thường>")
    what = ("a LoRA adapter" if kind == "adapter" else "the base model with its LoRA adapter merged in")
    lines = [
        "---",
        f"base_model: {base}" if cfg.spec.hub_id and cfg.model_path is None else "base_model: null",
        "library_name: " + ("peft" if kind == "adapter" else "transformers"),
        "language: [vi]",
        "tags: [amr, semantic-parsing, vietnamese, lora, ray_mtup]",
        "pipeline_tag: text-generation",
        "---",
        "",
        "# Vietnamese AMR parser (MTUP)",
        "",
        f"This is {what}, trained by ray_mtup to parse Vietnamese sentences into AMR graphs (PENMAN) "
        f"with MTUP prompts: step 1 writes the graph without variables, step 2 the full graph.",
        "",
        f"* **Base model:** {base}",
        f"* **Data:** {data_description(cfg)}",
        f"* **LoRA:** r {cfg.lora.r}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout}, "
        f"on {', '.join(cfg.lora.target_modules)}" + (" (base weights trained too)" if cfg.lora.train_base else ""),
    ]
    if source:
        lines.append(f"* **Weights from:** `{source}`")
    lines += ["", "## Scores", "", *_score_rows(figures, cfg.scoring_mode), "", "## Config", ""]
    data = cfg.to_dict()
    lines += [f"* `{key}`: {data[key]}" for key in CARD_FIELDS if data.get(key) is not None]
    lines += ["", "The whole config is in the run's `config.yaml` (`ray_mtup_config.yaml` next to an exported "
              "model); `python run_tune.py --no-search --config <it>` retrains it.", "", "## Use", "",
              "The prompt (template `" + cfg.template + "`), with the sentence lower-cased as in training:", "",
              "```text", prompt, "```", ""]
    if cfg.retrieval_k:
        lines += [f"This run retrieves {cfg.retrieval_k} training pair(s) into each prompt: parse with "
                  "ray_mtup, which rebuilds that index from the run's corpus.", ""]
    if kind == "merged":
        lines += ["Decoding is greedy (`generation_config.json`: one beam, no sampling, no repetition penalty, "
                  "the run's token budget). With transformers alone:", "",
                  "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "tok = AutoTokenizer.from_pretrained(DIR)",
                  "model = AutoModelForCausalLM.from_pretrained(DIR)",
                  "ids = tok(prompt, return_tensors='pt', add_special_tokens=False)",
                  "out = model.generate(**ids)  # generation_config.json: the project's decoding",
                  "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
                  "```", "",
                  "The text after the step-2 marker is the graph; ray_mtup also repairs it into valid PENMAN "
                  "and falls back to step 1 when it cannot. vLLM loads this directory as it is.", ""]
    else:
        lines += ["Parse a file of sentences with this adapter:", "", "```bash",
                  "python -m ray_mtup predict --adapter DIR --input sentences.txt --output parses.txt",
                  "python -m ray_mtup export --run DIR --output merged/   # one merged model, for transformers/vLLM",
                  "```", ""]
    return "\n".join(lines)


def write_card(directory: str | Path, cfg: TrainConfig, figures: Mapping[str, Mapping[str, Any]], kind: str,
               recorded_base: str | None = None, source: str | None = None) -> Path:
    """Write :func:`render_card` as ``directory/README.md`` (replacing peft's blank card)."""
    path = Path(directory) / CARD_FILE
    path.write_text(render_card(cfg, figures, kind, recorded_base, source), encoding="utf-8")
    return path
