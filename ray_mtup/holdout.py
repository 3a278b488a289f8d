"""The reported figure: a chosen adapter scored once on the held-out test set.

Selection and reporting are kept apart. ASHA, Optuna and the choice of a run's best epoch
see only the validation split; the test set (the seeded ``test_split`` of the corpus, or
``test_file``) is scored once, after the choice, by :func:`score_on_test`. The search's
reporting and the single run both call it, so both report the test F beside the
validation F that chose the adapter.

Generation takes ``predict``'s path (:func:`ray_mtup.predict.load_for_inference` and
:func:`ray_mtup.predict.parse_sentences`), and predictions are paired with gold by sentence
id (:func:`ray_mtup.scoring.score_by_id`). The figure is in the run's scoring mode, with
its bootstrap 95% interval; the official F is given too, for predictions written with
either concept style (:data:`ray_mtup.amr.CONCEPT_STYLES`), overall and per source file
(the literary file writes ``chủ_tịch``, the news file and the shared task's test gold
``chủ tịch``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from . import scoring
from .amr import CONCEPT_STYLES, concept_style
from .config import TrainConfig
from .corpus import Example
from .dataset import corpus_splits
from .errors import RayMtupError
from .predict import find_adapter, load_for_inference, parse_sentences

logger = logging.getLogger(__name__)

N_RESAMPLES = 1000


def held_out_set(cfg: TrainConfig) -> list[Example]:
    """The run's test graphs: ``cfg.test_file``, else its seeded test split (maybe empty)."""
    return corpus_splits(cfg)[2]


def describe(cfg: TrainConfig) -> str:
    """Where the test graphs come from, for the reports.

    >>> describe(TrainConfig(test_split=0.1, seed=3))
    'test split (10% of the corpus, seed 3)'
    """
    if cfg.test_file:
        return f"test file {cfg.test_file}"
    return f"test split ({cfg.test_split:.0%} of the corpus, seed {cfg.seed})"


def evaluate_adapter(adapter_dir: str | Path, model_path: str | None = None) -> dict[str, Any]:
    """Generate for every test sentence with the adapter and score it (see the module doc)."""
    adapter_dir = find_adapter(adapter_dir)
    model, tokenizer, cfg = load_for_inference(adapter_dir, model_path)
    test = held_out_set(cfg)
    if not test:
        return {"note": "no test set (test_split 0 and no test_file)"}
    t0 = time.perf_counter()
    graphs, counts = parse_sentences(model, tokenizer, cfg, [ex.sentence for ex in test],
                                     batch_size=cfg.eval_batch_size, progress=False)
    gold = {ex.id: ex.amr or "" for ex in test}
    pairs = scoring.score_by_id(gold, {ex.id: g for ex, g in zip(test, graphs)}, cfg.scoring_mode)
    score = scoring.Score.from_pairs(list(pairs.values()), cfg.scoring_mode)
    lo, hi = scoring.bootstrap_ci(pairs, n_resamples=N_RESAMPLES)
    official: dict[str, float] = {}
    by_source: dict[str, dict[str, float]] = {}
    sources = {ex.id: ex.source for ex in test}
    for style in CONCEPT_STYLES:
        written = {ex.id: concept_style(g, style) for ex, g in zip(test, graphs)}
        style_pairs = scoring.score_by_id(gold, written, "official")
        official[style] = scoring.Score.from_pairs(list(style_pairs.values()), "official").f1
        for source in sorted(set(sources.values())):
            by_source.setdefault(source, {})[style] = scoring.Score.from_pairs(
                [p for i, p in style_pairs.items() if sources[i] == source], "official").f1
    result = {
        "task2_f1": score.f1,
        "ci95": [lo, hi],
        "scoring_mode": cfg.scoring_mode,
        "task2_f1_official": official,
        "task2_f1_official_by_source": by_source,
        "validity": score.validity,
        "n_graphs": len(test),
        "test_set": describe(cfg),
        "adapter": str(adapter_dir),
        "time_s": time.perf_counter() - t0,
        **counts,
        "note": f"scored once after the choice; bootstrap over {len(test)} test sentences",
    }
    logger.info("test F %.4f [%.4f, %.4f] on %d graphs of the %s", score.f1, lo, hi, len(test), describe(cfg))
    return result


def _evaluate_checkpoint(checkpoint_path: str) -> dict[str, Any]:
    import ray.train

    with ray.train.Checkpoint(checkpoint_path).as_directory() as d:
        return evaluate_adapter(d)


def score_on_test(adapter_dir: str | Path, checkpoint_path: str | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """The test figure of a chosen adapter: in this process on CPU, or, for a GPU run, in a
    Ray task holding one GPU that reads the checkpoint from the run's storage.

    A failure is logged and returned as ``{"error": ...}``: the search's results are still
    written.
    """
    try:
        if use_gpu and checkpoint_path:
            import ray

            task = ray.remote(num_gpus=1)(_evaluate_checkpoint)
            return ray.get(task.remote(checkpoint_path))
        return evaluate_adapter(adapter_dir)
    except (RayMtupError, OSError, RuntimeError) as exc:  # RuntimeError: torch, or a failed Ray task
        logger.error("the test set could not be scored: %s", exc)
        return {"error": str(exc)}


def format_interval(ci: Sequence[float] | None) -> str:
    """A 95% interval as ``lo-hi`` to 4 decimals, or "n/a".

    >>> format_interval([0.359811179058041, 0.5507425299695831]), format_interval(None)
    ('0.3598-0.5507', 'n/a')
    """
    return f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else "n/a"


def format_test_line(validation_f1: float | None, test: dict[str, Any]) -> str:
    """One line for the leaderboard's footer and the single run's report.

    >>> print(format_test_line(0.31, {"task2_f1": 0.29, "ci95": [0.25, 0.33], "n_graphs": 184,
    ...                               "scoring_mode": "normalised", "test_set": "test split"}))
    chosen on validation Task 2 F1 0.3100; test Task 2 F1 0.2900 (95% CI 0.2500-0.3300, 184 graphs of the test split, normalised)
    """
    if "task2_f1" not in test:
        return f"test: {test.get('error') or test.get('note')}"
    val = "-" if validation_f1 is None else f"{validation_f1:.4f}"
    return (f"chosen on validation Task 2 F1 {val}; test Task 2 F1 {test['task2_f1']:.4f} "
            f"(95% CI {format_interval(test['ci95'])}, {test['n_graphs']} graphs of the {test['test_set']}, {test['scoring_mode']})")
