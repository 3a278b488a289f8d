"""Evaluation scores the model ``predict`` ships: the loop's per-epoch figure equals ``predict``
then ``evaluate`` on the same rows from that epoch's checkpoint, exactly (CPU, one worker,
the loop in this process under a TorchrunSession)."""

from __future__ import annotations

import json
from pathlib import Path

from ray_mtup.config import resolve_config


def test_loop_figure_equals_predict_then_evaluate(qwen_like_checkpoint: Path, tmp_path, run_loop):
    from ray_mtup.predict import predict_file
    from ray_mtup.scoring import evaluate_files
    from ray_mtup.training import prepare_data

    cfg = resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(qwen_like_checkpoint), "epochs": 1, "max_samples": 40, "num_workers": 1,
        "per_device_batch_size": 4, "global_batch_size": 8, "learning_rate": 5e-3, "eval_max_samples": 6,
        "eval_batch_size": 4, "max_new_tokens": 24, "zero_stage": 2, "retrieval_k": 0})
    run_loop(cfg, tmp_path / "run")  # the conftest's in-process loop: its process group stays for the others
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert epoch["eval_generation"] == "plain"

    data, _, _ = prepare_data(cfg)
    rows = data.eval  # the evaluation subset the loop generated for (eval_max_samples)
    (tmp_path / "val.txt").write_text("\n".join(ex.sentence for ex in rows) + "\n", encoding="utf-8")
    (tmp_path / "gold.txt").write_text(
        "\n".join(f"#::snt {ex.sentence}\n{gold}\n" for ex, gold in zip(rows, data.eval_gold)), encoding="utf-8")
    checkpoint = sorted((tmp_path / "run").glob("checkpoint_*"))[0]
    predict_file(checkpoint, tmp_path / "val.txt", tmp_path / "pred.txt", batch_size=cfg.eval_batch_size,
                 raw_input=True, device="cpu")
    scored = evaluate_files(tmp_path / "gold.txt", tmp_path / "pred.txt")
    assert scored["sentence_mismatches"]["count"] == 0
    assert scored["f1"] == epoch["predict_f1_official"]
    assert scored["f1"] > 0  # graphs that match something: the figure is not a vacuous 0 == 0
