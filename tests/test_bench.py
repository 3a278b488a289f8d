"""The benchmark helpers compute the right things (no timing is ever asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_batching import length_grouped_batches, padded_fraction, random_batches  # noqa: E402
from bench.bench_generate import GenerateCounter, new_token_count  # noqa: E402
from bench.common import QWEN25_DIMS, qwen25_config, summarise  # noqa: E402
from ray_mtup.dataset import useful_token_fraction  # noqa: E402


def test_padded_fraction_matches_the_project_function():
    lengths = [3, 10, 4, 9, 5, 8, 1]
    batches = [[0, 1], [2, 3, 4], [5, 6]]
    real = sum(lengths)
    padded = 10 * 2 + 9 * 3 + 8 * 2
    assert padded_fraction(lengths, batches) == pytest.approx(real / padded)
    assert padded_fraction(lengths, batches) == pytest.approx(useful_token_fraction(lengths, batches))


def test_padded_fraction_rounds_up_and_pads_to_a_fixed_width():
    lengths = [5, 9]
    assert padded_fraction(lengths, [[0, 1]], pad_to_multiple_of=8) == pytest.approx(14 / 32)
    assert padded_fraction(lengths, [[0], [1]], width=10) == pytest.approx(14 / 20)
    assert padded_fraction(lengths, []) == 1.0


def test_random_batches_cover_every_index_once():
    batches = random_batches(11, 4, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(11))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert batches == random_batches(11, 4, seed=3)


def test_length_grouping_beats_random_batches_on_dispersed_lengths():
    lengths = [10 if i % 2 else 200 for i in range(400)]
    grouped = length_grouped_batches(lengths, 8, epoch=1, seed=0)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert padded_fraction(lengths, grouped) == pytest.approx(1.0)
    assert padded_fraction(lengths, random_batches(400, 8, seed=0)) < 0.6


def test_length_grouped_batches_shard_over_ranks():
    lengths = list(range(1, 41))
    both = length_grouped_batches(lengths, 4, epoch=2, seed=1, world_size=2)
    assert len(both) == 10 and sorted(i for b in both for i in b) == list(range(40))


def test_new_token_count_stops_at_the_first_eos():
    assert new_token_count([4, 5, 0, 0, 0], eos_id=0) == 3
    assert new_token_count([0], eos_id=0) == 1
    assert new_token_count([4, 5, 6], eos_id=0) == 3
    assert new_token_count([], eos_id=0) == 0


def test_generate_counter_counts_new_tokens_and_restores_the_method():
    torch = pytest.importorskip("torch")

    class FakeModel:
        def generate(self, input_ids, attention_mask=None, max_new_tokens=3):
            new = torch.tensor([[7, 0, 1], [7, 8, 9]])  # eos 0, pad 1 after it
            return torch.cat([input_ids, new], dim=1)

    model = FakeModel()
    with GenerateCounter(model, eos_id=0) as counter:
        model.generate(input_ids=torch.zeros((2, 5), dtype=torch.long))
        model.generate(input_ids=torch.zeros((2, 4), dtype=torch.long))
    assert (counter.calls, counter.new_tokens, counter.positions) == (2, 10, 12)
    assert "generate" not in vars(model)


def test_qwen25_shapes_are_the_published_ones():
    assert QWEN25_DIMS["qwen2.5-1.5b"] == (1536, 8960, 28, 12, 2, 151936)
    cfg = qwen25_config("qwen2.5-3b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 11008, 36)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (16, 2, 151936)
    assert qwen25_config("qwen2.5-7b").tie_word_embeddings is False


def test_summarise():
    assert summarise([4.0, 1.0, 2.0, 3.0]) == {"median_s": 2.5, "mean_s": 2.5, "min_s": 1.0}


def test_bench_batching_exits_2_without_the_corpus(tmp_path, capsys):
    from bench import bench_batching

    assert bench_batching.main(["--data-dir", str(tmp_path)]) == 2
    assert "corpus not found" in capsys.readouterr().err


TRAIN_KEYS = {"bench", "variant", "model", "world_size", "batch", "seq_len", "steps", "tokens_per_s",
              "tokens_per_s_best", "step_median_s", "cpu_s_per_step_median", "loss_first", "loss_last",
              "trainable_params"}


@pytest.mark.integration
def test_bench_train_under_torchrun_prints_every_variant():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "bench" / "bench_train.py"), "--model", "tiny", "--steps", "2", "--warmup-steps", "0",
           "--seq-len", "32", "--batch", "2", "--lora-r", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    train = {r["variant"]: r for r in records if r["bench"] == "train"}
    assert set(train) == {"plain_peft", "deepspeed_zero2", "deepspeed_zero3"}
    for r in train.values():
        assert TRAIN_KEYS <= set(r)
        assert (r["world_size"], r["batch"], r["seq_len"], r["steps"]) == (1, 2, 32, 2)
        assert r["tokens_per_s"] > 0
    # same model, same LoRA, same batch: the first loss (LoRA B = 0) is identical in every variant
    assert len({r["loss_first"] for r in train.values()}) == 1
    assert len({r["trainable_params"] for r in train.values()}) == 1
    (ratio,) = [r for r in records if r["bench"] == "train_ratio"]
    assert {"deepspeed_zero2_over_plain", "deepspeed_zero3_over_plain"} <= set(ratio)


@pytest.mark.integration
def test_bench_generate_counts_every_new_token(tmp_path, capsys):
    from bench import bench_generate

    code = bench_generate.main(["--model", "tiny", "--data-dir", str(tmp_path / "absent"), "--n-prompts", "6",
                                "--max-new-tokens", "8", "--batch-size", "4", "--hf-batch", "4",
                                "--repeats", "1", "--threads", "1", "--device", "cpu"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    gen = {r["variant"]: r for r in records if r["bench"] == "generate"}
    assert set(gen) == {"hf_default", "project"}
    for r in gen.values():
        assert r["prompt_source"] == "sample_data" and r["prompts"] == 6
        assert 6 <= r["new_tokens"] <= r["positions_computed"] <= 6 * 8
        assert r["generate_calls"] == 2
