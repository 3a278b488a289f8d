"""Pinned numerics of the tiny model: a change in initialisation, tokenisation, batching, the loss or
the optimizer step moves these figures, and fails here in seconds instead of in a search.

The loop runs one optimizer step in this process (``run_loop``), seeded, on the shipped sample corpus;
the first step's training loss and the validation loss after it are pinned (to 1e-4, room for the
summation order of another CPU), and must not depend on the ZeRO stage.
"""

from __future__ import annotations

import pytest

from ray_mtup.config import resolve_config

#: The first optimizer step of the seeded tiny model (shape below) on the sample corpus: (train_loss, val_loss).
#: A deliberate change of numerics re-pins them: ``pytest -s tests/test_numerics.py`` prints the new ones.
PINNED = (6.759975, 6.600020)
TOL = 1e-4

FIRST_STEP = {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 1000},
              "max_samples": 60, "epochs": 1, "max_steps_per_epoch": 1, "per_device_batch_size": 8,
              "global_batch_size": 8, "learning_rate": 1e-3, "lora.r": 8, "lora.dropout": 0.0, "num_workers": 1,
              "eval_max_samples": 2, "max_new_tokens": 8, "seed": 42}


@pytest.mark.parametrize("stage", [2, 3])
def test_first_step_losses_of_the_seeded_tiny_model_are_pinned(stage, run_loop, tmp_path):
    cfg = resolve_config("tiny", overrides={**FIRST_STEP, "zero_stage": stage})
    (m,) = run_loop(cfg, tmp_path / "run").reported
    assert (m["global_step"], m["zero_stage"], m["micro_batch_size"]) == (1, stage, 8)
    print(f"ZeRO-{stage}: first step train_loss {m['train_loss']!r} val_loss {m['val_loss']!r}")
    assert m["train_loss"] == pytest.approx(PINNED[0], abs=TOL)
    assert m["val_loss"] == pytest.approx(PINNED[1], abs=TOL)
