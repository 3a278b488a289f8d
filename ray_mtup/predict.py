"""Parse sentences with a trained adapter: ``python -m ray_mtup predict``.

Reuses the evaluation path (prompt → batched greedy generation → split steps → repair).
Every input line gets a valid PENMAN graph, in this order of preference:

1. the Task 2 output, repaired if needed;
2. the Task 1 output with its variables restored (when Task 2 cannot be repaired);
3. the documented minimal graph :data:`FALLBACK_GRAPH` (when neither can).

How many outputs took each path is counted and reported, never hidden.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import corpus
from .config import TrainConfig
from .errors import ModelError, RayMtupError
from .generation import generate, parse_outputs, prompts_for
from .modeling import base_fingerprint, build_model, load_adapter, load_base_weights, load_tokenizer
from .prompts import get_template
from .training import STATE_FILE

logger = logging.getLogger(__name__)

#: Written for a sentence whose output cannot be turned into a graph at all.
FALLBACK_GRAPH = "(a / amr-unknown)"


@dataclass(frozen=True)
class PredictReport:
    n_sentences: int
    n_task2: int
    n_task2_repaired: int
    n_task1_fallback: int
    n_minimal: int
    output: str

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


def load_for_inference(adapter_dir: Path, model_path: str | None = None) -> tuple[Any, Any, TrainConfig]:
    """(model with adapter, tokenizer, the run's config), on GPU in bf16 when there is one."""
    import torch

    state = json.loads((adapter_dir / STATE_FILE).read_text(encoding="utf-8"))
    data = dict(state["config"])
    if model_path is not None:  # applied before validation: the stored path may not exist here
        data["model_path"] = model_path
    cfg = TrainConfig.from_dict(data)
    tokenizer = load_tokenizer(adapter_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, tokenizer, device)
    expected = state.get("base_fingerprint")
    if expected is not None and base_fingerprint(model) != expected:
        raise ModelError(f"the rebuilt base model differs from the one {adapter_dir} was trained on")
    # Merged weights generate about 30% faster than an unmerged adapter (docs/benchmarks.md).
    model = load_adapter(model, adapter_dir)
    load_base_weights(model, adapter_dir)  # a trained base (lora.train_base), when there is one
    model = model.merge_and_unload().to(device)
    model.eval()
    return model, tokenizer, cfg


def retrieved_contexts(cfg: TrainConfig, sentences: list[str]) -> list[tuple[tuple[str, str], ...]] | None:
    """The run's retrieved training pairs for ``sentences`` (None for plain MTUP).

    The BM25 index is rebuilt from the run's own training split (same corpus, seed and split),
    so the corpus directory the run trained on must be readable.
    """
    if cfg.retrieval_k == 0:
        return None
    from . import retrieval
    from .training import load_examples

    try:
        train, _, _ = load_examples(cfg.replace(retrieval_k=0))
    except (OSError, RayMtupError) as exc:
        raise ModelError(f"retrieval_k={cfg.retrieval_k}: the run's training split is needed to retrieve "
                         f"examples, and it cannot be read from data_dir={cfg.data_dir!r}: {exc}") from exc
    index = retrieval.PairIndex(train)
    return [tuple((p.sentence, p.task2) for p in index.neighbours(s, cfg.retrieval_k)) for s in sentences]


def predict_file(adapter: str | Path, input_path: str | Path, output_path: str | Path,
                 batch_size: int = 32, max_new_tokens: int | None = None,
                 model_path: str | None = None, constrained: bool | None = None,
                 data_dir: str | None = None) -> PredictReport:
    """Parse every line of ``input_path`` into ``output_path`` (``#::snt`` + PENMAN blocks).

    ``constrained`` (default: the run's ``constrained_decoding``) generates step 2 under the
    PENMAN grammar; ``data_dir`` overrides where a retrieval run's training corpus is read.
    """
    adapter_dir = find_adapter(adapter)
    sentences = [ex.sentence for ex in corpus.read_sentences(input_path)]
    model, tokenizer, cfg = load_for_inference(adapter_dir, model_path)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=data_dir)
    template = get_template(cfg.template)
    constrained = cfg.constrained_decoding if constrained is None else constrained
    raw = generate(model, tokenizer, prompts_for(template, sentences, retrieved_contexts(cfg, sentences)),
                   batch_size=batch_size, max_new_tokens=max_new_tokens or cfg.max_new_tokens, progress=True,
                   template=template if constrained else None)
    parsed = parse_outputs(template, raw)
    n_task2 = n_repaired = n_task1 = n_min = 0
    blocks = []
    for i, (sentence, p) in enumerate(zip(sentences, parsed)):
        if p.task2_graph is not None:
            graph = p.task2_graph
            n_task2 += 1
            n_repaired += int(p.task2_repaired)
        elif p.task1_graph is not None:
            graph = p.task1_graph
            n_task1 += 1
        else:
            graph = FALLBACK_GRAPH
            n_min += 1
            logger.info("line %d: no graph could be recovered; wrote %s", i + 1, FALLBACK_GRAPH)
        blocks.append(f"#::snt {sentence}\n{graph}\n")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("\n".join(blocks), encoding="utf-8")
    return PredictReport(len(sentences), n_task2, n_repaired, n_task1, n_min, str(output_path))
