"""Results of a search a person can use: leaderboard, results.csv, summary.json, plots.

Everything here is rebuilt from what the trials left: their reported per-epoch metrics and
their checkpoints (adapter + ``val_predictions.jsonl``). Two things are measured: the best
trial's saved predictions are re-scored per sentence (paired with gold by sentence id) for
the bootstrap, and its chosen adapter is scored once on the held-out test set
(:mod:`ray_mtup.holdout`), the figure the summary reports.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import objective, scoring, study
from .cards import figures_from_summary, write_card
from .checkpointing import PREDICTIONS_JSONL, recorded_memory_plan
from .config import TrainConfig
from .dataset import corpus_splits, evaluation_subset, load_examples
from .ensemble_run import SPLITS, ensemble_split, top_members
from .errors import RayMtupError
from .holdout import describe_corpus, score_on_test
from .outputs import upload_results
from .trial import SAMPLED_KEYS, apply_sampled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as read back from Tune: its sampled values and per-epoch history."""

    trial_id: str  # Tune's
    index: int  # creation order, from 1 (trial 1 is the documented optimum)
    sampled: dict[str, Any]
    config: TrainConfig
    history: list[dict[str, Any]]
    status: str
    error: str
    wall_time_s: float

    @property
    def epochs_run(self) -> int:
        return max((int(m["epoch"]) for m in self.history), default=0)

    @property
    def best(self) -> dict[str, Any]:
        """The best epoch; an epoch that stopped the trial (e.g. its checkpoint could not be
        written) only when there is no other."""
        usable = [m for m in self.history if not m.get("stop_reason")] or self.history
        return dict(objective.best_epoch(usable))

    @property
    def stop_reason(self) -> str:
        reasons = [m.get("stop_reason") for m in self.history if m.get("stop_reason")]
        return str(reasons[-1]) if reasons else ""

    @property
    def resume_note(self) -> str:
        """Why a resume used an older checkpoint than the latest (see ray_mtup.checkpointing), or ''."""
        return "; ".join(str(m["resume_note"]) for m in self.history if m.get("resume_note"))

    @property
    def stopped_early(self) -> bool:
        """Stopped by ASHA: ended without error before its planned epochs."""
        return self.status == "TERMINATED" and not self.stop_reason and self.epochs_run < self.config.epochs

    @property
    def epoch_cost_s(self) -> float:
        times = [m.get("epoch_time_s", 0.0) + m.get("eval_time_s", 0.0) for m in self.history]
        return sum(times) / len(times) if times else 0.0

    def device_hours(self) -> float:
        units = self.config.num_workers if self.config.use_gpu else self.config.num_workers * self.config.cpus_per_worker
        return self.wall_time_s * units / 3600.0


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float) and math.isnan(v):
            v = None
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


def _error_line(error: Any) -> str:
    """The informative last line of a (Ray-wrapped) exception, or ''."""
    if not error:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def collect_trials(grid: Any, base: TrainConfig) -> list[TrialRecord]:
    """TrialRecords from a Tune ``ResultGrid``, in trial creation order.

    A ResultGrid lists its trials in the order Tune created them (its experiment state's
    order), also after a resume; Tune puts the trial's ``trial_id`` in every result.
    """
    records = []
    for index, result in enumerate(grid, start=1):
        sampled = {k: v for k, v in (result.config or {}).items() if k in SAMPLED_KEYS}
        df = result.metrics_dataframe
        history: list[dict[str, Any]] = []
        if df is not None and len(df) and "epoch" in df:
            rows = [_clean(r) for r in df.to_dict("records")]
            by_epoch = {int(r["epoch"]): r for r in rows if r.get("epoch") is not None}
            history = [by_epoch[e] for e in sorted(by_epoch)]
        metrics = result.metrics or {}
        error = _error_line(result.error)
        status = "ERROR" if result.error else "TERMINATED"
        trial_id = str(metrics["trial_id"])
        wall = float(metrics.get("time_total_s") or sum(m.get("epoch_time_s", 0) + m.get("eval_time_s", 0)
                                                         for m in history))
        records.append(TrialRecord(trial_id, index, sampled, apply_sampled(base.to_dict(), sampled), history,
                                   status, error, wall))
    return records


def leaderboard_rows(records: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        best = r.best
        rows.append({
            "trial_id": r.trial_id,
            "trial_index": r.index,
            "status": r.status,
            **{k: r.sampled.get(k) for k in SAMPLED_KEYS if k in r.sampled},
            "epochs_run": r.epochs_run,
            "best_epoch": best.get("epoch"),
            "best_objective": best.get(objective.METRIC),
            "best_task1_f1": best.get("task1_f1"),
            "best_task2_f1": best.get("task2_f1"),
            "best_task2_f1_official": best.get("task2_f1_official"),
            "validity": best.get("validity"),
            "val_loss": best.get("val_loss"),
            "zero_stage": best.get("zero_stage"),  # as the trial's workers resolved it (ray_mtup.memory)
            "micro_batch_size": best.get("micro_batch_size"),
            "grad_accum": best.get("grad_accum"),
            "stopped_early": r.stopped_early,
            "stop_reason": r.stop_reason or r.error,
            "resume_note": r.resume_note,
            "wall_time_s": round(r.wall_time_s, 1),
            "device_hours": round(r.device_hours(), 5),
            "checkpoint_path": best.get("checkpoint_path"),
        })
    return rows


def format_leaderboard(rows: Sequence[Mapping[str, Any]]) -> str:
    """Best-first (by the search objective) fixed-width table."""
    ranked = sorted(rows, key=lambda r: -objective.score({objective.METRIC: r.get("best_objective")}))
    head = f"{'trial':<14}{'lr':>10}{'ep':>4}{'r':>5}{'template':>18}{'run':>5}{'T1 F1':>8}{'T2 F1':>8}" \
           f"{'valid':>7}{'early':>7}  note"
    lines = [head, "-" * len(head)]
    for r in ranked:
        def num(key: str, fmt: str) -> str:
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        lines.append(f"{r['trial_id']:<14}{num('learning_rate', '10.2e')}{num('epochs', '4d')}"
                     f"{num('lora_r', '5d')}{str(r.get('template', '-')):>18}{r['epochs_run']:>5}"
                     f"{num('best_task1_f1', '8.4f')}{num('best_task2_f1', '8.4f')}{num('validity', '7.3f')}"
                     f"{'yes' if r['stopped_early'] else 'no':>7}  {r.get('stop_reason') or ''}")
    return "\n".join(lines)


def _checkpoint(path: str | None) -> Any:
    """A Ray Checkpoint for a local or remote (s3://, gs://) checkpoint path, or None."""
    if not path:
        return None
    import ray.train

    return ray.train.Checkpoint(path)


def _read_predictions(checkpoint_path: str | None) -> list[dict[str, Any]] | None:
    checkpoint = _checkpoint(checkpoint_path)
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as d:
            path = Path(d) / PREDICTIONS_JSONL
            if not path.is_file():
                return None
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, FileNotFoundError) as exc:
        logger.warning("cannot read predictions of %s: %s", checkpoint_path, exc)
        return None


def _pairs_by_id(gold: dict[str, str], preds: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    return scoring.score_by_id(gold, {p["id"]: p["task2_graph"] for p in preds}, mode=mode)


def noise_analysis(best: TrialRecord, first: TrialRecord | None) -> dict[str, Any]:
    """Bootstrap interval of the best trial's validation F1, and whether it beats the first
    trial (the documented optimum) beyond noise: a paired bootstrap over the same sentences.

    The saved predictions are paired with the validation gold by sentence id; an id that
    is not a validation graph, or two trials scored on different sentences, is a ScoringError.
    These figures are on the graphs the choice was made on (optimistic); the test figure
    (:mod:`ray_mtup.holdout`) is the one to report.
    """
    preds = _read_predictions(best.best.get("checkpoint_path"))
    if preds is None:
        return {"note": "best checkpoint has no saved predictions; no interval"}
    gold = {ex.id: ex.amr or "" for ex in corpus_splits(best.config)[1]}
    mode = best.config.scoring_mode
    pairs = _pairs_by_id(gold, preds, mode)
    lo, hi = scoring.bootstrap_ci(pairs)
    out: dict[str, Any] = {
        "task2_f1": scoring.Score.from_pairs(list(pairs.values()), mode).f1,
        "ci95": [lo, hi],
        "n_sentences": len(pairs),
        "note": f"bootstrap over the {len(pairs)} validation sentences the best trial was chosen on "
                "(optimistic: see 'test' for the held-out figure); differences smaller than the interval "
                "width are noise",
    }
    if first is not None and first.trial_id != best.trial_id:
        first_preds = _read_predictions(first.best.get("checkpoint_path"))
        if first_preds is not None:
            dlo, dhi = scoring.bootstrap_ci(pairs, baseline=_pairs_by_id(gold, first_preds, mode))
            out["vs_documented_optimum"] = {
                "trial_id": first.trial_id,
                "delta_ci95": [dlo, dhi],
                "beats_beyond_noise": dlo > 0,
            }
    elif first is not None:
        out["vs_documented_optimum"] = {"trial_id": first.trial_id, "beats_beyond_noise": False,
                                        "note": "the documented optimum is the best trial"}
    return out


def most_frequent_graph_baseline(cfg: TrainConfig) -> dict[str, Any]:
    """Task 2 F1 of always answering the most frequent training graph (ties: the first seen),
    scored like the trials: against the same validation sentences (``eval_max_samples``).
    """
    from collections import Counter

    train, _, gold = load_examples(cfg)
    gold = evaluation_subset(cfg, gold)
    n = len(gold)
    graph, count = Counter(ex.task2 for ex in train).most_common(1)[0]
    score = scoring.score_corpus(gold, [graph] * n, mode=cfg.scoring_mode)
    return {"task2_f1": score.f1, "graph": graph, "train_count": count, "n_sentences": n,
            "scoring_mode": score.mode, "method": "the most frequent training graph, answered for every "
                                                  "validation sentence the trials are scored on"}


def cost_summary(records: Sequence[TrialRecord]) -> dict[str, Any]:
    """Wall time and device-hours per trial and in total, and what ASHA saved."""
    unit = "gpu_hours" if any(r.config.use_gpu for r in records) else "cpu_hours"
    saved_h = 0.0
    for r in records:
        if r.stopped_early:
            units = r.config.num_workers if r.config.use_gpu else r.config.num_workers * r.config.cpus_per_worker
            saved_h += (r.config.epochs - r.epochs_run) * r.epoch_cost_s * units / 3600.0
    used = sum(r.device_hours() for r in records)
    return {
        "unit": unit,
        "total_wall_time_s": sum(r.wall_time_s for r in records),
        f"total_{unit}": used,
        f"asha_saved_{unit}": saved_h,
        "asha_saved_fraction": saved_h / (used + saved_h) if used + saved_h else 0.0,
        "method": "saved = (planned - run epochs) x the trial's mean measured epoch time (train + eval)",
    }


def plot(records: Sequence[TrialRecord], out_dir: Path, baseline_f1: float | None = None) -> list[str]:
    """F1 per epoch (an x where ASHA stopped a trial; the baseline as a dashed line) and F1
    against the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stopped_label = "stopped by ASHA"
    for r in records:
        if r.history:
            xs, ys = [m["epoch"] for m in r.history], [m.get("task2_f1") or 0.0 for m in r.history]
            line, = ax.plot(xs, ys, marker="o", label=r.trial_id)
            if r.stopped_early:
                ax.plot(xs[-1], ys[-1], marker="x", markersize=12, mew=2.5, color=line.get_color(),
                        linestyle="none", label=stopped_label)
                stopped_label = "_nolegend_"
    if baseline_f1 is not None:
        ax.axhline(baseline_f1, color="grey", linestyle="--", label=f"baseline {baseline_f1:.3f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Task 2 SMATCH F1")
    ax.set_title("F1 per epoch (every trial)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "f1_per_epoch.png", dpi=110)
    plt.close(fig)
    paths.append(str(out_dir / "f1_per_epoch.png"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r.config.learning_rate for r in records if r.history]
    ys = [r.best.get("task2_f1") or 0.0 for r in records if r.history]
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best Task 2 F1")
    ax.set_title("F1 against learning rate")
    fig.tight_layout()
    fig.savefig(out_dir / "f1_vs_lr.png", dpi=110)
    plt.close(fig)
    paths.append(str(out_dir / "f1_vs_lr.png"))
    return paths


def local_results_dir(run_path: str) -> Path:
    """Where a run's result files are written: the run's directory, or ``runs/<name>`` locally
    when the storage is remote (s3://, gs://); remote results are then copied up.

    >>> local_results_dir("s3://bucket/exp"), local_results_dir("/data/exp")
    (PosixPath('runs/exp'), PosixPath('/data/exp'))
    """
    return Path(run_path) if "://" not in run_path else Path("runs") / Path(run_path).name


def ensemble_summary(out_dir: Path, top: int) -> dict[str, Any]:
    """The ensemble of the ``top`` best trials on the whole validation and test splits, without
    and with the BM25 lookup as a candidate (:mod:`ray_mtup.ensemble_run`); each trial parses
    each split once. A failure is logged and returned as ``{"error": ...}``."""
    out: dict[str, Any] = {"top": top}
    try:
        members = top_members(out_dir, top)
        for split in SPLITS:
            for retrieval in (False, True):
                r = ensemble_split(out_dir, top, split, retrieval=retrieval, members=members)
                key = f"{split}_retrieval" if retrieval else split
                out[key] = {k: r[k] for k in ("ensemble_f1", "ensemble_ci95", "best_trial", "best_trial_f1",
                                              "best_trial_ci95", "ensemble_minus_best_ci95", "n_graphs",
                                              "scoring_mode", "candidates")}
                print(format_ensemble_line(split, retrieval, r), flush=True)
    except (RayMtupError, OSError, RuntimeError) as exc:
        logger.error("the ensemble could not be scored: %s", exc)
        out["error"] = str(exc)
    return out


def format_ensemble_line(split: str, retrieval: bool, r: Mapping[str, Any]) -> str:
    """One leaderboard footer line of the ensemble.

    >>> print(format_ensemble_line("val", True, {"top": 3, "ensemble_f1": 0.31, "ensemble_ci95": [0.29, 0.33],
    ...     "best_trial_f1": 0.28, "best_trial_ci95": [0.26, 0.30], "n_graphs": 184}))
    ensemble of the top 3 + BM25 lookup: val Task 2 F1 0.3100 (95% CI 0.2900-0.3300) against the best trial's 0.2800 (0.2600-0.3000), 184 graphs
    """
    lookup = " + BM25 lookup" if retrieval else ""
    lo, hi = r["ensemble_ci95"]
    blo, bhi = r["best_trial_ci95"]
    return (f"ensemble of the top {r['top']}{lookup}: {split} Task 2 F1 {r['ensemble_f1']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}) against the best trial's {r['best_trial_f1']:.4f} "
            f"({blo:.4f}-{bhi:.4f}), {r['n_graphs']} graphs")


def write_search_results(grid: Any, base: TrainConfig, experiment_dir: str, space: Any,
                         launch: Mapping[str, Any] | None = None, ensemble: int = 0) -> dict[str, Any]:
    """Leaderboard to the terminal; results.csv, summary.json (with ``launch``, the launcher's
    device decision), best_config.yaml, best_adapter/, plots; with ``ensemble`` = K, the ensemble
    of the K best trials on validation and test (:func:`ensemble_summary`)."""
    out_dir = local_results_dir(experiment_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = collect_trials(grid, base)
    rows = leaderboard_rows(records)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out_dir / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(format_leaderboard(rows), flush=True)
    baseline = most_frequent_graph_baseline(records[0].config) if records else None
    if baseline is not None:
        print(f"baseline (the most frequent training graph for every sentence): Task 2 F1 "
              f"{baseline['task2_f1']:.4f} on {baseline['n_sentences']} validation sentences", flush=True)
    # A trial whose every epoch diverged (non-finite loss: val_loss NaN, no checkpoint) or stopped
    # the trial (a checkpoint that could not be written) cannot be the best one: it is listed with
    # its stop_reason, and the search may have no best at all.
    scored = [r for r in records
              if r.history and r.best.get("val_loss") is not None and not r.best.get("stop_reason")]
    summary: dict[str, Any] = {"experiment_dir": experiment_dir, "corpus": describe_corpus(base),
                               "search_space": space.path,
                               "n_trials": len(records), "n_errors": sum(r.status == "ERROR" for r in records),
                               "objective": "task2_f1 (validation, corpus SMATCH), ties by val_loss; "
                                            "the reported figure is 'test', scored once on held-out graphs",
                               "cost": cost_summary(records), "baseline": baseline, "launch": launch}
    if scored:
        best = max(scored, key=lambda r: objective.score(r.best))
        first = records[0] if records else None
        summary.update({
            "best_trial": best.trial_id,
            "best_config": best.config.to_dict(),
            "best_sampled": best.sampled,
            "best_metrics": best.best,
            "scoring_mode": best.config.scoring_mode,
            "documented_optimum_trial": first.trial_id if first else None,
            "noise": noise_analysis(best, first),
        })
        best.config.write_yaml(out_dir / "best_config.yaml",
                               f"best trial {best.trial_id} of {experiment_dir}; reproduce with:\n"
                               f"  python run_tune.py --no-search --config {out_dir / 'best_config.yaml'}")
        checkpoint = _checkpoint(best.best.get("checkpoint_path"))
        if checkpoint is not None:
            dest = out_dir / "best_adapter"
            if dest.exists():
                shutil.rmtree(dest)
            checkpoint.to_directory(str(dest))
            summary["best_adapter"] = str(dest)
            summary["best_memory_plan"] = recorded_memory_plan(dest)
            summary["test"] = score_on_test(dest, best.best.get("checkpoint_path"), best.config.use_gpu, out_dir)
            write_card(dest, best.config, figures_from_summary(summary), "adapter")
        if ensemble:
            summary["ensemble"] = ensemble_summary(out_dir, ensemble)
        summary["plots"] = plot(records, out_dir, baseline["task2_f1"] if baseline else None)
        summary["plots"] += study.write_study_plots(records, space, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str),
                                          encoding="utf-8")
    if "://" in experiment_dir:
        upload_results(out_dir, experiment_dir)
    logger.info("results in %s", out_dir)
    return summary
