"""Evaluation generation outside the ZeRO-3 lockstep (ray_mtup.replica, ray_mtup.memory).

Unit tests: the path choice, the fit check, and the merged replica against the peft model it
copies. The integration test runs ``torchrun -m ray_mtup.worker`` under ZeRO-3 with 2 CPU
workers twice, with ``eval_generation`` replica and synced, and compares the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_mtup.config import TrainConfig
from ray_mtup.errors import ConfigError
from ray_mtup.memory import device_memory, replica_fits
from ray_mtup.replica import choose_path, generation_margin, plan_generation

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode, zero3, world, fits, path", [
    ("auto", True, 2, True, "replica"),
    ("auto", True, 2, False, "synced"),
    ("auto", True, 1, True, "plain"),
    ("auto", False, 4, True, "plain"),
    ("replica", True, 2, False, "replica"),  # forced: the user's call, the reason says it may not fit
    ("replica", False, 2, None, "plain"),
    ("synced", True, 2, True, "synced"),
    ("synced", False, 2, None, "plain"),
])
def test_path_choice(mode, zero3, world, fits, path):
    plan = choose_path(mode, zero3, world, fits)
    assert plan.path == path
    assert plan.synced_gpus == (path == "synced")


def test_eval_generation_is_validated():
    assert TrainConfig().eval_generation == "auto"
    with pytest.raises(ConfigError) as err:
        TrainConfig(eval_generation="fast")
    assert err.value.field == "eval_generation"


def test_fit_check_against_reported_memory():
    free, total = device_memory("cpu")
    assert 0 < free <= total
    assert replica_fits(1_000_000, 4, free, margin=1 << 20)
    assert not replica_fits(free // 4 + 1, 4, free)  # one replica larger than all free memory
    n = int(free * 0.5) // 4  # half the free memory: one rank fits, two on the same host do not
    assert replica_fits(n, 4, free, sharers=1) and not replica_fits(n, 4, free, sharers=2)


def test_margin_grows_with_batch_and_length():
    from transformers import Qwen2Config

    c = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=800)
    base = generation_margin(c, 4, 100, 4)
    assert generation_margin(c, 8, 100, 4) > base and generation_margin(c, 4, 200, 4) > base
    assert generation_margin(c, 4, 100, 2) < base


@pytest.fixture(scope="module")
def lora_model(qwen_like_checkpoint):
    """A peft model on the Qwen-like checkpoint with non-zero LoRA B (as after training)."""
    import torch

    from ray_mtup.modeling import WeightsSource, apply_lora, build_model, build_tokenizer

    source = WeightsSource(str(qwen_like_checkpoint))
    cfg = TrainConfig(model_path=str(qwen_like_checkpoint))
    tokenizer = build_tokenizer(source)
    torch.manual_seed(0)
    model = apply_lora(build_model(source, cfg, tokenizer), cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval(), tokenizer, cfg


def test_replica_is_plain_merged_and_equal(lora_model):
    import torch

    from ray_mtup.replica import merged_replica

    model, tokenizer, _ = lora_model
    ids = torch.tensor([tokenizer("Tôi đi học hôm nay", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            unmerged_base = model(input_ids=ids).logits
        with merged_replica(model, "cpu") as replica:
            names = {n for n, _ in replica.named_parameters()}
            assert not any("lora" in n for n in names)
            assert names == {n.replace(".base_layer", "") for n, _ in model.get_base_model().named_parameters()
                             if "lora_" not in n}
            assert type(replica) is type(model.get_base_model())
            got = replica(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, unmerged_base, atol=1e-3)  # the deltas were merged, not dropped
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # the model is untouched


def test_replica_generates_what_the_peft_model_generates(lora_model):
    from ray_mtup.generation import generate
    from ray_mtup.replica import build_replica

    model, tokenizer, _ = lora_model
    prompts = ["Câu: tôi đi học", "Câu: trời mưa to lắm hôm qua"]
    a = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=12)
    b = generate(build_replica(model, "cpu"), tokenizer, prompts, batch_size=2, max_new_tokens=12)
    assert a.texts == b.texts and a.new_tokens == b.new_tokens


def test_plan_uses_every_ranks_memory(lora_model, monkeypatch):
    """``auto`` under ZeRO-3 takes the replica only when it fits on every rank's device; two
    ranks of one host share its memory."""
    import ray_mtup.replica as replica

    model, _, cfg = lora_model
    peers: list[tuple] = []
    monkeypatch.setattr(replica, "gather", lambda obj, world: [obj, *peers])
    plenty = 64 * 2**30
    monkeypatch.setattr(replica, "device_memory", lambda device: (plenty, plenty))
    peers[:] = [("other-host", "cpu", plenty, 0)]
    assert plan_generation(model, cfg, True, 2, "cpu", 64).path == "replica"
    assert plan_generation(model, cfg, False, 2, "cpu", 64).path == "plain"
    assert plan_generation(model, cfg.replace(eval_generation="synced"), True, 2, "cpu", 64).path == "synced"
    peers[:] = [("other-host", "cpu", 1024, 0)]  # a peer whose device is full
    plan = plan_generation(model, cfg, True, 2, "cpu", 64)
    assert plan.path == "synced" and "rank 1" in plan.reason
    assert plan_generation(model, cfg.replace(eval_generation="replica"), True, 2, "cpu", 64).path == "replica"
    one = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) * 4 + generation_margin(
        model.get_base_model().config, cfg.eval_batch_size, 8, 4)
    free = int(1.5 * one / 0.9)  # room for one replica and its margin, not for two
    monkeypatch.setattr(replica, "device_memory", lambda device: (free, free))
    import socket

    peers[:] = [(socket.gethostname(), "cpu", free, 0)]
    assert plan_generation(model, cfg, True, 2, "cpu", 8).path == "synced"
    peers[:] = [("other-host", "cpu", free, 0)]
    assert plan_generation(model, cfg, True, 2, "cpu", 8).path == "replica"


@pytest.mark.integration
def test_replica_and_synced_generate_the_same_under_zero3(torchrun_runs):
    """torchrun, 2 processes, ZeRO-3, 2 epochs: the runs ``replica`` and ``synced`` of conftest.py's
    ``torchrun_runs``, the same but for ``eval_generation``."""
    runs = {mode: torchrun_runs[mode] for mode in ("replica", "synced")}
    history = {mode: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for mode, run in runs.items()}
    for mode in runs:
        assert [m["eval_generation"] for m in history[mode]] == [mode, mode]
    raws = set()
    for epoch in (1, 2):
        preds = {mode: [json.loads(line) for line in
                        (run / f"checkpoint_{epoch:06d}" / "val_predictions.jsonl").read_text().splitlines()]
                 for mode, run in runs.items()}
        assert len(preds["replica"]) == 5
        assert [p["raw"] for p in preds["replica"]] == [p["raw"] for p in preds["synced"]], epoch
        raws |= {p["raw"] for p in preds["replica"]}
    assert len(raws) > 1  # the outputs move with the adapter: the replica holds its deltas
    # Training after a replica evaluation goes on as after a synced one.
    a, b = (history[mode][1]["train_loss"] for mode in ("replica", "synced"))
    assert abs(a - b) <= 1e-6, (a, b)


def test_merged_in_place_is_the_replica_and_predicts_model_and_restores_exactly(lora_model):
    """Every evaluation path generates from the weights ``predict`` loads: merging in place, into
    a replica and ``predict``'s merge give identical logits, and the engine's model comes back
    bit for bit."""
    import copy

    import torch

    from ray_mtup.replica import build_replica, merge_and_unload, merged_in_place

    model, tokenizer, _ = lora_model
    ids = torch.tensor([tokenizer("Tôi đi học hôm nay", add_special_tokens=False)["input_ids"]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        with merged_in_place(model) as merged:
            in_place = merged(input_ids=ids).logits
        replica = build_replica(model, "cpu")(input_ids=ids).logits
        shipped = merge_and_unload(copy.deepcopy(model))(input_ids=ids).logits
        unmerged = model(input_ids=ids).logits
    assert torch.equal(in_place, replica) and torch.equal(in_place, shipped)
    assert torch.allclose(in_place, unmerged, atol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
