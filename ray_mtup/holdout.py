"""The reported figure: a chosen adapter scored once on the held-out test set.

Selection and reporting are kept apart. ASHA, Optuna and the choice of a run's best epoch
see only the validation split; the test set (the seeded ``test_split`` of the corpus, or
``test_file``) is scored once, after the choice, by :func:`score_on_test`. The search's
reporting and the single run both call it, so both report the test F beside the
validation F that chose the adapter.

Generation takes ``predict``'s path (:func:`ray_mtup.predict.load_merged`, the
sentences' corpus form :func:`ray_mtup.predict.model_inputs`, and
:func:`ray_mtup.predict.parse_sentences`), and predictions are paired with gold by sentence
id (:func:`ray_mtup.scoring.score_by_id`). It is scored by the objective's rule, as
validation is (:func:`ray_mtup.evaluation.score_epoch`): a Task 2 output that cannot be
read counts as an empty graph and as invalid. The figure is in the run's scoring mode, with
its bootstrap 95% interval; the official F is given too, for predictions written with
either concept style (:data:`ray_mtup.amr.CONCEPT_STYLES`), overall and per source file
(the literary file writes ``chủ_tịch``, the news file and the shared task's test gold
``chủ tịch``).

Beside it, under its own name (``submitted``), is the figure of the file ``predict``
writes: there an unreadable output is replaced by the Task 1 graph or the placeholder
``(a / amr-unknown)``, which can earn SMATCH credit, so it is never the reported figure.
Every test sentence is saved with its gold graph and its own F
(``test_predictions.jsonl``, :func:`write_test_predictions`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from . import scoring
from .amr import CONCEPT_STYLES, concept_style
from .cards import SAMPLE_CORPUS_NOTE, describe_corpus  # noqa: F401 (the closing summaries' names)
from .checkpointing import PREDICTIONS_JSONL
from .config import TrainConfig
from .corpus import Example
from .dataset import corpus_splits
from .errors import RayMtupError
from .predict import find_adapter, load_merged, model_inputs, parse_sentences

logger = logging.getLogger(__name__)

N_RESAMPLES = 1000
TEST_PREDICTIONS = "test_predictions.jsonl"


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


def evaluate_adapter(adapter_dir: str | Path, model_path: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Generate for every test sentence with the adapter and score it (see the module doc);
    ``device``: as ``predict --device`` (:func:`ray_mtup.devices.resolve_device`).

    The result holds ``predictions`` (one record per sentence), which
    :func:`write_test_predictions` moves into a file."""
    adapter_dir = find_adapter(adapter_dir)
    model, tokenizer, cfg = load_merged(adapter_dir, model_path, device)
    test = held_out_set(cfg)
    if not test:
        return {"note": "no test set (test_split 0 and no test_file)"}
    t0 = time.perf_counter()
    inputs = model_inputs([ex.sentence for ex in test])
    parses = parse_sentences(model, tokenizer, cfg, inputs, batch_size=cfg.eval_batch_size, progress=False)
    result = score_parses(test, parses.task2, parses.graphs, cfg.scoring_mode)
    result["predictions"] = [{**record, "model_input": text, "raw": raw}
                             for record, text, raw in zip(result["predictions"], inputs, parses.raw)]
    result.update({"test_set": describe(cfg), "adapter": str(adapter_dir), "time_s": time.perf_counter() - t0,
                   **parses.counts})
    logger.info("test F %.4f [%.4f, %.4f] on %d graphs of the %s (submitted file: F %.4f)", result["task2_f1"],
                *result["ci95"], len(test), describe(cfg), result["submitted"]["task2_f1"])
    return result


def score_parses(test: Sequence[Example], task2: Sequence[str | None], submitted: Sequence[str],
                 mode: str) -> dict[str, Any]:
    """The test figure of ``task2`` (the objective's rule: None is an empty graph and invalid),
    with its interval, its official F per concept style (overall and per source file) and
    per-sentence records; and, under ``submitted``, the F of the file ``predict`` writes
    (``submitted``: fallback graphs and placeholders included).

    >>> from ray_mtup.corpus import Example
    >>> test = [Example("t:1", "chó", "(c / chó)", "t.txt", 1), Example("t:2", "mèo", "(m / mèo)", "t.txt", 3)]
    >>> r = score_parses(test, ["(c / chó)", None], ["(c / chó)", "(a / amr-unknown)"], "normalised")
    >>> round(r["task2_f1"], 4), r["validity"], r["submitted"]["task2_f1"], r["submitted"]["validity"]
    (0.6667, 0.5, 0.75, 1.0)
    """
    gold = {ex.id: ex.amr or "" for ex in test}
    pairs = scoring.score_by_id(gold, {ex.id: g for ex, g in zip(test, task2)}, mode)
    score = scoring.Score.from_pairs(list(pairs.values()), mode)
    lo, hi = scoring.bootstrap_ci(pairs, n_resamples=N_RESAMPLES)
    official: dict[str, float] = {}
    by_source: dict[str, dict[str, float]] = {}
    sources = {ex.id: ex.source for ex in test}
    for style in CONCEPT_STYLES:
        written = {ex.id: None if g is None else concept_style(g, style) for ex, g in zip(test, task2)}
        style_pairs = scoring.score_by_id(gold, written, "official")
        official[style] = scoring.Score.from_pairs(list(style_pairs.values()), "official").f1
        for source in sorted(set(sources.values())):
            by_source.setdefault(source, {})[style] = scoring.Score.from_pairs(
                [p for i, p in style_pairs.items() if sources[i] == source], "official").f1
    as_written = scoring.score_by_id(gold, {ex.id: g for ex, g in zip(test, submitted)}, mode)
    written_score = scoring.Score.from_pairs(list(as_written.values()), mode)
    return {
        "task2_f1": score.f1,
        "ci95": [lo, hi],
        "scoring_mode": mode,
        "task2_f1_official": official,
        "task2_f1_official_by_source": by_source,
        "validity": score.validity,
        "n_graphs": len(test),
        "submitted": {"task2_f1": written_score.f1, "validity": written_score.validity,
                      "note": "the file predict writes, Task 1 fallbacks and placeholder graphs included "
                              "(not the reported figure: a placeholder can earn SMATCH credit)"},
        "note": f"scored once after the choice, unreadable Task 2 output as an empty graph (as in validation); "
                f"bootstrap over {len(test)} test sentences",
        "predictions": [{"id": ex.id, "sentence": ex.sentence, "gold": gold[ex.id], "task2_graph": g,
                         "submitted_graph": w, "task2_f1": pairs[ex.id].f1, "submitted_f1": as_written[ex.id].f1}
                        for ex, g, w in zip(test, task2, submitted)],
    }


def write_test_predictions(test: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``test`` without its per-sentence ``predictions``, which go to ``out_dir/test_predictions.jsonl``
    (its path is then ``test["predictions_file"]``)."""
    records = test.get("predictions")
    if records is None:
        return test
    path = Path(out_dir) / TEST_PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return {**{k: v for k, v in test.items() if k != "predictions"}, "predictions_file": str(path)}


def validation_interval(cfg: TrainConfig, adapter_dir: str | Path) -> dict[str, Any] | None:
    """Task 2 F1 of the validation predictions a checkpoint saved, with its bootstrap 95%
    interval (paired with the run's validation gold by sentence id); None when the checkpoint
    saved none or the run's corpus cannot be read here."""
    path = Path(adapter_dir) / PREDICTIONS_JSONL
    if not path.is_file():
        return None
    preds = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        gold = {ex.id: ex.amr or "" for ex in corpus_splits(cfg)[1]}
    except (OSError, RayMtupError) as exc:
        logger.warning("no validation interval: the run's corpus cannot be read (%s)", exc)
        return None
    pairs = scoring.score_by_id(gold, {p["id"]: p["task2_graph"] for p in preds}, cfg.scoring_mode)
    lo, hi = scoring.bootstrap_ci(pairs, n_resamples=N_RESAMPLES)
    return {"task2_f1": scoring.Score.from_pairs(list(pairs.values()), cfg.scoring_mode).f1, "ci95": [lo, hi],
            "n": len(pairs)}


def _evaluate_checkpoint(checkpoint_path: str) -> dict[str, Any]:
    import ray.train

    with ray.train.Checkpoint(checkpoint_path).as_directory() as d:
        return evaluate_adapter(d)


def score_on_test(adapter_dir: str | Path, checkpoint_path: str | None = None, use_gpu: bool = False,
                  out_dir: str | Path | None = None) -> dict[str, Any]:
    """The test figure of a chosen adapter: in this process on CPU, or, for a GPU run, in a
    Ray task holding one GPU that reads the checkpoint from the run's storage. The
    per-sentence predictions go to ``out_dir/test_predictions.jsonl`` (:func:`write_test_predictions`).

    A failure is logged and returned as ``{"error": ...}``: the search's results are still
    written.
    """
    try:
        if use_gpu and checkpoint_path:
            import ray

            task = ray.remote(num_gpus=1)(_evaluate_checkpoint)
            result = ray.get(task.remote(checkpoint_path))
        else:
            result = evaluate_adapter(adapter_dir, device="gpu" if use_gpu else "cpu")  # where the run trained
        return write_test_predictions(result, out_dir if out_dir is not None else Path(adapter_dir).parent)
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
    >>> print(format_test_line(0.0, {"task2_f1": 0.0, "ci95": [0.0, 0.0], "n_graphs": 11, "validity": 0.0,
    ...                              "scoring_mode": "normalised", "test_set": "test split",
    ...                              "submitted": {"task2_f1": 0.176}}))
    chosen on validation Task 2 F1 0.0000; test Task 2 F1 0.0000 (95% CI 0.0000-0.0000, 11 graphs of the test split, normalised); validity 0.000; the written file, placeholders included, scores 0.1760
    """
    if "task2_f1" not in test:
        return f"test: {test.get('error') or test.get('note')}"
    val = "-" if validation_f1 is None else f"{validation_f1:.4f}"
    line = (f"chosen on validation Task 2 F1 {val}; test Task 2 F1 {test['task2_f1']:.4f} "
            f"(95% CI {format_interval(test['ci95'])}, {test['n_graphs']} graphs of the {test['test_set']}, {test['scoring_mode']})")
    submitted = (test.get("submitted") or {}).get("task2_f1")
    if submitted is not None and submitted != test["task2_f1"]:
        line += (f"; validity {test.get('validity', float('nan')):.3f}; the written file, placeholders included, "
                 f"scores {submitted:.4f}")
    return line
