"""Learning on real data: the tiny model, trained a few minutes on VLSP, beats a constant baseline.

The baseline predicts the most frequent training graph for every validation sentence (about
F 0.15 on this split). A model that only learned the output format, or an evaluator that
rewards invalid output, would not beat it by a margin. Skipped, saying so, without the corpus.
"""

from __future__ import annotations

from collections import Counter

import pytest

from ray_mtup import scoring
from ray_mtup.config import resolve_config
from ray_mtup.dataset import load_examples

pytestmark = pytest.mark.integration

N_EVAL = 150
#: The CPU demonstration settings (also the tiny_cpu search space's region).
LEARNING = {
    "epochs": 6,
    "learning_rate": 1e-3,
    "per_device_batch_size": 8,
    "global_batch_size": 16,  # 8 per worker x 2 workers: no accumulation
    "warmup_ratio": 0.05,
    "num_workers": 2,
    "eval_max_samples": N_EVAL,
    "max_new_tokens": 320,
}


def test_tiny_model_beats_most_frequent_graph_baseline(vlsp_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from ray_mtup.trial import run_single

    cfg = resolve_config("tiny", overrides={**LEARNING, "data_dir": str(vlsp_dir)})
    train, _, gold = load_examples(cfg)
    most_frequent, _ = Counter(ex.task2 for ex in train).most_common(1)[0]
    baseline = scoring.score_corpus(gold[:N_EVAL], [most_frequent] * N_EVAL, mode=cfg.scoring_mode).f1
    assert 0.05 < baseline < 0.3

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        summary = run_single(cfg, name="learning", storage_path=str(tmp_path / "storage"),
                             output_dir=tmp_path / "run")
    finally:
        ray.shutdown()
    best = summary.best
    print(f"baseline F {baseline:.4f}; tiny model best epoch {summary.best_epoch}: "
          f"task2 F {best['task2_f1']:.4f}, task1 F {best['task1_f1']:.4f}, validity {best['validity']:.3f}")
    assert best["n_eval"] == N_EVAL
    assert best["task2_f1"] > baseline + 0.02
    assert best["validity"] > 0.5
