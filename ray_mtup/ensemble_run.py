"""The ensemble command: ``python -m ray_mtup ensemble`` and ``predict --ensemble``.

A search's K best trials (ranked by the objective in its ``results.csv``) each parse the
sentences with their best checkpoint, through ``predict``'s path
(:func:`ray_mtup.predict.load_merged`, :func:`ray_mtup.predict.parse_sentences`);
with ``retrieval`` the graph of the BM25-nearest training sentence
(:class:`ray_mtup.retrieval.PairIndex`) is one more candidate, ranked last. The pure
selection (:func:`ray_mtup.ensemble.select`) keeps one graph per sentence.

A trial's parses of a split are written once, to ``<experiment>/ensemble/<trial_id>/<split>.json``
(with the checkpoint they came from and the sentence ids), and reused while both still match.

A candidate is a trial's repaired Task 2 graph, or the empty graph where none could be
recovered: what the search's objective and its test figure score (:attr:`ray_mtup.predict.Parses.task2`),
so the best trial's figure here is the summary's test figure. The selection and every figure
see the empty graph as empty; ``predict --ensemble`` writes predict's minimal fallback graph
in its place (:func:`as_written`).

Scores are corpus SMATCH in the run's scoring mode, paired with gold by sentence id
(:func:`ray_mtup.scoring.score_by_id`), each with its bootstrap interval
(:func:`ray_mtup.scoring.bootstrap_ci`), and the ensemble against the best trial as a paired
bootstrap over the same sentences.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import objective, scoring
from .checkpointing import STATE_FILE
from .config import TrainConfig
from .corpus import Example
from .dataset import corpus_splits, to_mtup
from .ensemble import Selection, select
from .errors import ConfigError, ModelError
from .predict import FALLBACK_GRAPH, find_adapter, load_merged, model_inputs, parse_sentences
from .retrieval import PairIndex

logger = logging.getLogger(__name__)

ENSEMBLE_DIR = "ensemble"
RESULTS_CSV = "results.csv"
SPLITS = ("val", "test")
LOOKUP = "bm25_lookup"
N_RESAMPLES = 1000
#: What a cache file's graphs are (``null``: the empty graph); a file without it is parsed again.
CANDIDATE_KIND = "task2"
#: Config fields that decide the corpus splits: every member must agree on them.
SPLIT_FIELDS = ("data_dir", "seed", "val_split", "test_split", "max_samples", "test_file")


@dataclass(frozen=True)
class Member:
    """One of the search's trials, as the ensemble uses it."""

    trial_id: str
    rank: int  # 1 = the best trial by the objective
    objective: float
    checkpoint: str  # the trial's best checkpoint (a directory, or a remote URI)


def ranked_trials(experiment_dir: str | Path) -> list[Member]:
    """The experiment's trials with a best checkpoint, best first by the search's objective
    (ties: earlier trial first), read from its ``results.csv``."""
    path = Path(experiment_dir) / RESULTS_CSV
    if not path.is_file():
        raise ConfigError("run", f"{path} not found: --run takes a search's experiment directory "
                                 "(the one with results.csv and summary.json)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("checkpoint_path")]
    scored = sorted(rows, key=lambda r: (-objective.score({objective.METRIC: _float(r.get("best_objective"))}),
                                         int(r.get("trial_index") or 0)))
    return [Member(r["trial_id"], i, objective.score({objective.METRIC: _float(r.get("best_objective"))}),
                   r["checkpoint_path"]) for i, r in enumerate(scored, start=1)]


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def top_members(experiment_dir: str | Path, k: int) -> list[Member]:
    """The ``k`` best trials; fewer than ``k`` with a checkpoint is a ConfigError."""
    if k < 1:
        raise ConfigError("top", f"must be >= 1, got {k}")
    members = ranked_trials(experiment_dir)
    if len(members) < k:
        raise ConfigError("top", f"{experiment_dir} has {len(members)} trial(s) with a best checkpoint, "
                                 f"fewer than the {k} asked for")
    return members[:k]


@contextlib.contextmanager
def checkpoint_dir(member: Member) -> Iterator[Path]:
    """The member's checkpoint as a local directory (a remote one is downloaded for the block)."""
    local = Path(member.checkpoint)
    if "://" not in member.checkpoint:
        if not local.is_dir():
            raise ModelError(f"the best checkpoint of trial {member.trial_id} is gone: {local} "
                             "(the search keeps each trial's best; was the directory moved?)")
        yield local
        return
    import ray.train

    with ray.train.Checkpoint(member.checkpoint).as_directory() as d:
        yield Path(d)


def member_config(member: Member) -> TrainConfig:
    """The trial's config, as its checkpoint recorded it."""
    with checkpoint_dir(member) as d:
        state = json.loads((find_adapter(d) / STATE_FILE).read_text(encoding="utf-8"))
    return TrainConfig.from_dict(state["config"])


def split_config(members: Sequence[Member], data_dir: str | None = None) -> TrainConfig:
    """The config that decides the splits, the same for every member (ConfigError otherwise)."""
    configs = [member_config(m) for m in members]
    first = configs[0]
    for m, cfg in zip(members[1:], configs[1:]):
        for name in SPLIT_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise ConfigError(name, f"trials {members[0].trial_id} and {m.trial_id} split the corpus "
                                        f"differently ({getattr(first, name)!r} vs {getattr(cfg, name)!r})")
    return first.replace(data_dir=data_dir) if data_dir is not None else first


def split_examples(cfg: TrainConfig, split: str) -> list[Example]:
    """All graphs of the run's validation or test split (not only the per-epoch subset)."""
    if split not in SPLITS:
        raise ConfigError("split", f"must be one of {list(SPLITS)}, got {split!r}")
    _, val, test = corpus_splits(cfg)
    examples = val if split == "val" else test
    if not examples:
        raise ConfigError("split", f"the run's {split} split is empty")
    return examples


def parse_with(member: Member, sentences: Sequence[str], batch_size: int | None = None,
               data_dir: str | None = None, model_path: str | None = None, device: str = "auto") -> list[str | None]:
    """The member's candidate for each sentence, through predict's path: its repaired Task 2
    graph, or None (the empty graph) where none could be recovered."""
    with checkpoint_dir(member) as d:
        model, tokenizer, cfg = load_merged(find_adapter(d), model_path, device)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=data_dir)
    logger.info("trial %s (rank %d) parses %d sentences", member.trial_id, member.rank, len(sentences))
    parses = parse_sentences(model, tokenizer, cfg, model_inputs(sentences), batch_size or cfg.eval_batch_size,
                             progress=False)  # the trial's batch by default, as its test figure
    logger.info("trial %s: %s", member.trial_id, parses.counts)
    del model
    gc.collect()
    return parses.task2


def cached_parses(experiment_dir: str | Path, member: Member, split: str, examples: Sequence[Example],
                  batch_size: int | None = None, data_dir: str | None = None, model_path: str | None = None,
                  device: str = "auto") -> list[str | None]:
    """The member's candidates for ``split``: read from its cache file when it holds this
    checkpoint's parses of these ids, else generated once and written there."""
    path = Path(experiment_dir) / ENSEMBLE_DIR / member.trial_id / f"{split}.json"
    ids = [ex.id for ex in examples]
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if (cached.get("checkpoint") == member.checkpoint and cached.get("candidates") == CANDIDATE_KIND
                    and [p["id"] for p in cached["parses"]] == ids):
                logger.info("trial %s: reusing its %s parses (%s)", member.trial_id, split, path)
                return [p["graph"] for p in cached["parses"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable cache %s: %s", path, exc)
        logger.info("the cache %s is stale; parsing again", path)
    graphs = parse_with(member, [ex.sentence for ex in examples], batch_size, data_dir, model_path, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"trial_id": member.trial_id, "checkpoint": member.checkpoint, "split": split,
               "candidates": CANDIDATE_KIND,
               "parses": [{"id": ex.id, "sentence": ex.sentence, "graph": g} for ex, g in zip(examples, graphs)]}
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=0), encoding="utf-8")
    tmp.replace(path)
    return graphs


def as_written(graph: str | None) -> str:
    """A selected graph as predict writes it: the empty graph becomes the minimal fallback graph."""
    return FALLBACK_GRAPH if graph is None else graph


def lookup_graphs(cfg: TrainConfig, sentences: Sequence[str]) -> list[str]:
    """The graph of the BM25-nearest training sentence of each sentence (the run's training split)."""
    train, _, _ = corpus_splits(cfg)
    index = PairIndex(to_mtup(train))
    return [index.neighbours(s, 1)[0].task2 for s in sentences]


def _scored(gold: dict[str, str], ids: Sequence[str], graphs: Sequence[str | None], mode: str
            ) -> dict[str, scoring.PairCounts]:
    return scoring.score_by_id(gold, dict(zip(ids, graphs)), mode)


def _figure(name: str, pairs: dict[str, scoring.PairCounts], mode: str) -> dict[str, Any]:
    score = scoring.Score.from_pairs(list(pairs.values()), mode)
    lo, hi = scoring.bootstrap_ci(pairs, n_resamples=N_RESAMPLES)
    return {"name": name, "f1": score.f1, "ci95": [lo, hi], "validity": score.validity}


def ensemble_split(experiment_dir: str | Path, top: int, split: str, retrieval: bool = False,
                   batch_size: int | None = None, data_dir: str | None = None, model_path: str | None = None,
                   members: Sequence[Member] | None = None, device: str = "auto") -> dict[str, Any]:
    """Corpus F of the ensemble, of each candidate and of the best trial on ``split``."""
    members = list(members) if members is not None else top_members(experiment_dir, top)
    cfg = split_config(members, data_dir)
    examples = split_examples(cfg, split)
    ids = [ex.id for ex in examples]
    candidates: list[list[str | None]] = [
        list(cached_parses(experiment_dir, m, split, examples, batch_size, data_dir, model_path, device))
        for m in members]
    names = [m.trial_id for m in members]
    if retrieval:
        candidates.append(list(lookup_graphs(cfg, [ex.sentence for ex in examples])))
        names.append(LOOKUP)
    mode = cfg.scoring_mode
    t0 = time.perf_counter()
    chosen: Selection = select(candidates, mode)
    selection_s = time.perf_counter() - t0
    gold = {ex.id: ex.amr or "" for ex in examples}
    per_candidate = [_scored(gold, ids, c, mode) for c in candidates]
    ensemble_pairs = _scored(gold, ids, chosen.graphs, mode)
    ens = _figure("ensemble", ensemble_pairs, mode)
    wins = chosen.wins(len(candidates))
    cands = [{**_figure(n, p, mode), "rank": i + 1, "kept_for": wins[i]}
             for i, (n, p) in enumerate(zip(names, per_candidate))]
    best = cands[0]
    dlo, dhi = scoring.bootstrap_ci(ensemble_pairs, n_resamples=N_RESAMPLES, baseline=per_candidate[0])
    k = len(candidates)
    return {
        "split": split, "n_graphs": len(examples), "scoring_mode": mode, "top": len(members),
        "retrieval": retrieval,
        "ensemble_f1": ens["f1"], "ensemble_ci95": ens["ci95"], "ensemble_validity": ens["validity"],
        "best_trial": best["name"], "best_trial_f1": best["f1"], "best_trial_ci95": best["ci95"],
        "ensemble_minus_best_ci95": [dlo, dhi],
        "candidates": cands,
        "smatch_pairs": len(examples) * k * (k - 1) // 2, "selection_time_s": selection_s,
        "parses": str(Path(experiment_dir) / ENSEMBLE_DIR),
    }


def format_result(r: dict[str, Any]) -> str:
    """The table the ensemble command prints.

    >>> print(format_result({"split": "val", "n_graphs": 2, "scoring_mode": "normalised", "top": 2,
    ...     "retrieval": False, "ensemble_f1": 0.5, "ensemble_ci95": [0.4, 0.6], "best_trial": "a",
    ...     "best_trial_f1": 0.45, "best_trial_ci95": [0.3, 0.5], "ensemble_minus_best_ci95": [0.0, 0.1],
    ...     "candidates": [{"name": "a", "rank": 1, "f1": 0.45, "ci95": [0.3, 0.5], "kept_for": 2},
    ...                    {"name": "b", "rank": 2, "f1": 0.4, "ci95": [0.3, 0.5], "kept_for": 0}],
    ...     "smatch_pairs": 2, "selection_time_s": 0.1}))
    ensemble of the top 2 trials on val (2 graphs, normalised)
      candidate             F1      95% CI              kept for
      1 a                   0.4500  [0.3000, 0.5000]    2
      2 b                   0.4000  [0.3000, 0.5000]    0
      ensemble              0.5000  [0.4000, 0.6000]
      best trial a          0.4500  [0.3000, 0.5000]
      ensemble - best               [0.0000, 0.1000]    (paired bootstrap)
      2 SMATCH pairs for the selection in 0.1 s
    """
    def row(label: str, f1: float | None, ci: Sequence[float], tail: str = "") -> str:
        value = f"{f1:.4f}" if f1 is not None else ""
        return f"  {label:<22}{value:<8}[{ci[0]:.4f}, {ci[1]:.4f}]    {tail}".rstrip()

    what = f"the top {r['top']} trials" + (" and the BM25 lookup" if r["retrieval"] else "")
    lines = [f"ensemble of {what} on {r['split']} ({r['n_graphs']} graphs, {r['scoring_mode']})",
             f"  {'candidate':<22}{'F1':<8}{'95% CI':<20}kept for"]
    lines += [row(f"{c['rank']} {c['name']}", c["f1"], c["ci95"], str(c["kept_for"])) for c in r["candidates"]]
    lines.append(row("ensemble", r["ensemble_f1"], r["ensemble_ci95"]))
    lines.append(row(f"best trial {r['best_trial']}", r["best_trial_f1"], r["best_trial_ci95"]))
    lines.append(row("ensemble - best", None, r["ensemble_minus_best_ci95"], "(paired bootstrap)"))
    lines.append(f"  {r['smatch_pairs']} SMATCH pairs for the selection in {r['selection_time_s']:.1f} s")
    return "\n".join(lines)


def predict_ensemble(experiment_dir: str | Path, top: int, sentences: Sequence[str], retrieval: bool = False,
                     batch_size: int | None = None, data_dir: str | None = None,
                     model_path: str | None = None, device: str = "auto") -> tuple[list[str], Selection, list[str]]:
    """The ensemble's graph of each new sentence (input order), the selection, and the
    candidates' names (the trials, best first, then the lookup)."""
    members = top_members(experiment_dir, top)
    candidates: list[list[str | None]] = [list(parse_with(m, sentences, batch_size, data_dir, model_path, device))
                                          for m in members]
    names = [m.trial_id for m in members]
    cfg = member_config(members[0])
    if data_dir is not None:
        cfg = cfg.replace(data_dir=data_dir)
    if retrieval:
        candidates.append(list(lookup_graphs(cfg, sentences)))
        names.append(LOOKUP)
    chosen = select(candidates, cfg.scoring_mode)
    return [as_written(g) for g in chosen.graphs], chosen, names
