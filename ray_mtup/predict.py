"""Parse sentences with a trained adapter: ``python -m ray_mtup predict``.

Reuses the evaluation path (prompt → batched greedy generation → split steps → repair).
Every input line gets a valid PENMAN graph, in this order of preference:

1. the Task 2 output, repaired if needed;
2. the Task 1 output with its variables restored (when Task 2 cannot be repaired);
3. the documented minimal graph :data:`FALLBACK_GRAPH` (when neither can).

How many outputs took each path is counted and reported, never hidden. Scores follow
the objective's rule, not this file's: :attr:`Parses.task2` keeps an unreadable Task 2
output as None (an empty graph), and the held-out test figure (:mod:`ray_mtup.holdout`)
scores that.

The input is a sentence per line, or a gold file in the corpus format (its ``#::snt``
lines). Before the model sees a sentence it is written in the training sentences' form
(:func:`ray_mtup.corpus.to_corpus_form`: lower case, ``_`` between syllables as a space,
punctuation a token of its own) unless ``raw_input``; the written ``#::snt`` line keeps the
sentence as given. The output path is checked before the model loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from . import corpus, retrieval
from .amr import CONCEPT_STYLES, concept_style
from .checkpointing import STATE_FILE, load_trained_base
from .config import TrainConfig
from .dataset import load_examples
from .devices import resolve_device
from .errors import ConfigError, ModelError, RayMtupError
from .generation import FALLBACK_GRAPH, generate, parse_outputs, prompts_for, shipped_graphs
from .modeling import WeightsSource, base_source, build_model, load_adapter, load_tokenizer
from .prompts import get_template
from .replica import merge_and_unload

logger = logging.getLogger(__name__)

#: ``--raw-input`` warns when more than this share of the lines is unlike the training sentences.
UNLIKE_CORPUS_WARNING = 0.1


@dataclass(frozen=True)
class PredictReport:
    n_sentences: int
    n_task2: int
    n_task2_repaired: int
    n_task1_fallback: int
    n_minimal: int
    output: str
    input_normalised: bool = True
    n_input_changed: int = 0  # lines the normalisation changed (0 with raw input)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_adapter(path: str | Path) -> Path:
    """An adapter directory: ``path`` itself, or a run's ``adapter/``, or a search's ``best_adapter/``."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "best_adapter"):
        if (candidate / "adapter_config.json").is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    raise ModelError(f"no adapter found in {path} (looked for adapter_config.json and {STATE_FILE} in it, "
                     f"in {path / 'adapter'} and in {path / 'best_adapter'})")


def inference_source(state: dict[str, Any], cfg: TrainConfig) -> WeightsSource:
    """The base weights a run trained on: ``cfg.model_path`` or the hub id, else the directory
    its checkpoint recorded (the tiny model's, which predict cannot rebuild without the corpus)."""
    if cfg.model_path is not None or cfg.spec.hub_id is not None:
        return base_source(cfg)
    recorded = state.get("base_source")
    if not recorded or not Path(recorded).is_dir():
        raise ModelError(f"the base checkpoint this run trained on ({recorded}) is not on this machine; "
                         "pass --model-path")
    return WeightsSource(recorded)


def load_merged(adapter_dir: Path, model_path: str | None = None, device: str = "auto") -> tuple[Any, Any, TrainConfig]:
    """The run's base with its adapter (and trained base weights, ``lora.train_base``) merged in,
    on ``device`` (``auto``, ``gpu`` or ``cpu``, by the launchers' one rule,
    :func:`ray_mtup.devices.resolve_device`: ``auto`` without a GPU is an error for a real model;
    bf16 on a GPU, fp32 on the CPU), its tokenizer and its config with the run's generation budget
    (derived from its training data when the config left it unset); the one loader of
    ``predict``, the test figure, the ensemble and ``export``."""
    import torch

    state = json.loads((adapter_dir / STATE_FILE).read_text(encoding="utf-8"))
    data = dict(state["config"])
    if model_path is not None:  # applied before validation: the stored path may not exist here
        data["model_path"] = model_path
    cfg = TrainConfig.from_dict(data)
    tokenizer = load_tokenizer(adapter_dir)
    where = resolve_device(device, cfg.model, torch.cuda.device_count(), where="on this machine")
    device = "cuda" if where == "gpu" else "cpu"
    model = build_model(inference_source(state, cfg), cfg, tokenizer, device)
    # Merged weights generate about 30% faster than an unmerged adapter (docs/benchmarks.md), and
    # they are merged as evaluation merges them, so the epoch was chosen on this very model.
    model = load_adapter(model, adapter_dir)
    load_trained_base(model, adapter_dir)  # a trained base (lora.train_base), when there is one
    model = merge_and_unload(model).to(device)
    model.eval()
    budget = cfg.max_new_tokens or state.get("max_new_tokens")
    if budget is None:
        raise ModelError(f"{adapter_dir / STATE_FILE} records no max_new_tokens; pass --max-new-tokens")
    return model, tokenizer, cfg.replace(max_new_tokens=int(budget))


@dataclass(frozen=True)
class Parses:
    """What :func:`parse_sentences` made of each sentence.

    ``graphs``: what ``predict`` writes (Task 2, else Task 1, else :data:`FALLBACK_GRAPH`);
    ``task2``: the repaired Task 2 graph or None, what the objective scores (None: empty);
    ``raw``: the generations; ``counts``: how many graphs took each path.
    """

    graphs: list[str]
    task2: list[str | None]
    raw: list[str]
    counts: dict[str, int]


def parse_sentences(model: Any, tokenizer: Any, cfg: TrainConfig, sentences: Sequence[str],
                    batch_size: int = 32, max_new_tokens: int | None = None,
                    progress: bool = True) -> Parses:
    """One canonical graph per sentence (Task 2, else Task 1, else :data:`FALLBACK_GRAPH`),
    and how many took each path; the path of ``predict`` and of the test figure."""
    template = get_template(cfg.template)
    out = generate(model, tokenizer, prompts_for(template, sentences, retrieved_contexts(cfg, sentences),
                                                   tokenizer if cfg.chat_template else None),
                   batch_size=batch_size, max_new_tokens=max_new_tokens or cfg.max_new_tokens, progress=progress,
                   stop_template=template, constrained=cfg.constrained_decoding)
    parsed = parse_outputs(template, out.texts)
    graphs, counts = shipped_graphs(parsed)
    return Parses(graphs, [p.task2_graph for p in parsed], list(out.texts), counts)


def check_output_path(path: str | Path) -> Path:
    """``path`` if parses can be written there: not a directory, and its nearest existing
    parent a writable directory. Checked before a model loads; ConfigError("output") if not."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("output", f"{path} is a directory; give the path of a file to write")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError("output", f"{path} exists and is not writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("output", f"cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("output", f"cannot create {path}: {parent} is not writable")
    return path


def model_inputs(sentences: Sequence[str], raw_input: bool = False) -> list[str]:
    """What the model reads for ``sentences``: their corpus form
    (:func:`ray_mtup.corpus.to_corpus_form`), or with ``raw_input`` the sentences as given,
    with a warning when more than :data:`UNLIKE_CORPUS_WARNING` of them look unlike the
    training sentences (word-segmented or capitalised)."""
    if raw_input:
        unlike = sum(corpus.looks_unlike_corpus(s) for s in sentences)
        if unlike > UNLIKE_CORPUS_WARNING * len(sentences):
            logger.warning("%d of %d input lines are word-segmented ('_') or have capitals, unlike nearly all "
                           "training sentences, and --raw-input keeps them so; without it they are normalised",
                           unlike, len(sentences))
        return list(sentences)
    inputs = [corpus.to_corpus_form(s) for s in sentences]
    logger.info("input normalised to the training sentences' form (lower case, '_' between syllables as a space, "
                "punctuation spaced): %d of %d lines changed; --raw-input turns this off",
                n_changed(sentences, inputs), len(sentences))
    return inputs


def n_changed(sentences: Sequence[str], inputs: Sequence[str]) -> int:
    """How many sentences their model input rewrote beyond spacing.

    >>> n_changed(["Tôi  đi", "tôi đi"], ["tôi đi", "tôi đi"])
    1
    """
    return sum(" ".join(s.split()) != i for s, i in zip(sentences, inputs))


def write_parses(path: str | Path, sentences: Sequence[str], graphs: Sequence[str], style: str) -> Path:
    """``#::snt`` + graph blocks, multi-word concepts written in ``style`` (:data:`CONCEPT_STYLES`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = [f"#::snt {s}\n{concept_style(g, style)}\n" for s, g in zip(sentences, graphs)]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def retrieved_contexts(cfg: TrainConfig, sentences: list[str]) -> list[tuple[tuple[str, str], ...]] | None:
    """The run's retrieved training pairs for ``sentences`` (None for plain MTUP).

    The BM25 index is rebuilt from the run's own training split (same corpus, seed and split),
    so the corpus directory the run trained on must be readable.
    """
    if cfg.retrieval_k == 0:
        return None
    try:
        train, _, _ = load_examples(cfg)
    except (OSError, RayMtupError) as exc:
        raise ModelError(f"retrieval_k={cfg.retrieval_k}: the run's training split is needed to retrieve "
                         f"examples, and it cannot be read from data_dir={cfg.data_dir!r}: {exc}") from exc
    index = retrieval.PairIndex(train)
    return [tuple((p.sentence, p.task2) for p in index.neighbours(s, cfg.retrieval_k)) for s in sentences]


def predict_file(adapter: str | Path, input_path: str | Path, output_path: str | Path,
                 batch_size: int = 32, max_new_tokens: int | None = None,
                 model_path: str | None = None, concept_style: str = "space", constrained: bool | None = None,
                 data_dir: str | None = None, raw_input: bool = False,
                 device: str = "auto") -> PredictReport:
    """Parse every sentence of ``input_path`` into ``output_path`` (``#::snt`` + PENMAN blocks).

    ``input_path``: one sentence per line, or a gold file in the corpus format (its ``#::snt``
    lines). The model reads each sentence in its corpus form (:func:`model_inputs`; as given
    with ``raw_input``); the ``#::snt`` lines keep the sentences as given.

    Multi-word concepts are written with spaces by default, as the shared task's test gold
    writes them (``concept_style="_"`` keeps canonical PENMAN's ``chủ_tịch``). ``constrained``
    (default: the run's ``constrained_decoding``) generates step 2 under the PENMAN grammar;
    ``data_dir`` overrides where a retrieval run's training corpus is read; ``device``: see
    :func:`load_merged`.
    """
    if concept_style not in CONCEPT_STYLES:
        raise ConfigError("concept_style", f"must be one of {list(CONCEPT_STYLES)}, got {concept_style!r}")
    check_output_path(output_path)
    adapter_dir = find_adapter(adapter)
    sentences = [ex.sentence for ex in corpus.read_input_sentences(input_path)]
    inputs = model_inputs(sentences, raw_input)
    model, tokenizer, cfg = load_merged(adapter_dir, model_path, device)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=data_dir)
    if constrained is not None:
        cfg = cfg.replace(constrained_decoding=constrained)
    parses = parse_sentences(model, tokenizer, cfg, inputs, batch_size, max_new_tokens)
    out = write_parses(output_path, sentences, parses.graphs, concept_style)
    counts = parses.counts
    return PredictReport(len(sentences), counts["n_task2"], counts["n_task2_repaired"],
                         counts["n_task1_fallback"], counts["n_minimal"], str(out), not raw_input,
                         n_changed(sentences, inputs))
