"""The memory plan: ZeRO stage and micro-batch from the device's memory (ray_mtup.memory)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mtup import memory
from ray_mtup.config import LoraSettings, TrainConfig, resolve_config
from ray_mtup.errors import ConfigError
from ray_mtup.launcher import build_parser, config_from_args
from ray_mtup.memory import ModelShape, plan_memory
from ray_mtup.models import shape_from_config

from conftest import card_dir

#: The registry's Qwen2.5 shapes, from their config.json.
SHAPES = {name: shape_from_config(json.loads((card_dir(name) / "config.json").read_text()))
          for name in ("qwen2.5-1.5b", "qwen2.5-7b")}
Q7 = SHAPES["qwen2.5-7b"]
GPU = dict(on_gpu=True, seq_len=1024, global_batch_size=16, lora=LoraSettings())


def _plan(shape=Q7, free=80e9, world=1, stage="auto", micro="auto", **kw):
    args = {**GPU, **kw}
    return plan_memory(shape, world=world, free_bytes=free, total_bytes=free, zero_stage=stage, micro_batch=micro,
                       **args)


def test_the_7b_base_in_bf16_is_about_15_gb():
    assert 15.1e9 < memory.base_weight_bytes(Q7, 2, 1, 2) < 15.3e9
    assert 30.2e9 < memory.base_weight_bytes(Q7, 4, 1, 2) < 30.6e9  # fp32 on CPU
    assert memory.base_weight_bytes(Q7, 2, 4, 3) == pytest.approx(memory.base_weight_bytes(Q7, 2, 1, 2) / 4, abs=1)


def test_shape_counts_match_the_built_model_and_its_adapter():
    """The arithmetic's parameter counts are those of a real Qwen2 model and peft adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)
    shape = memory.shape_from_config(config.to_dict())
    model = Qwen2ForCausalLM(config)
    assert shape.base_params() == sum(p.numel() for p in model.parameters())
    targets = ("q_proj", "k_proj", "down_proj")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    assert shape.lora_params(4, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_shape_is_read_from_the_checkpoint_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}))
    assert memory.model_shape("qwen2.5-7b", str(tmp_path)) == ModelShape(128, 256, 2, 4, 2, 1000, True)
    assert memory.model_shape("qwen2.5-7b", str(card_dir("qwen2.5-7b"))) == Q7
    assert memory.model_shape(str(card_dir("qwen2.5-7b"))) == Q7  # the directory as the model itself


def test_7b_picks_zero2_on_80gb_and_zero3_on_24gb():
    big = _plan(free=80e9)
    assert (big.zero_stage, big.fits) == (2, True)
    small = _plan(free=24e9, world=4)
    assert (small.zero_stage, small.fits) == (3, True)
    assert any(e.zero_stage == 2 for e in small.considered)  # ZeRO-2 was tried first and did not fit
    assert "ZeRO-3" in small.explain() and "does not fit" in small.explain()


def test_micro_batch_shrinks_as_memory_shrinks():
    micros = [_plan(free=gb * 1e9, stage=2).micro_batch_size for gb in (200, 141, 80, 60, 40, 30)]
    assert micros == sorted(micros, reverse=True) and micros[0] > micros[-1]


def test_gradient_checkpointing_allows_a_larger_micro_batch():
    plain = _plan(free=40e9, stage=2)
    ckpt = _plan(free=40e9, stage=2, gradient_checkpointing=True)
    assert ckpt.micro_batch_size > plain.micro_batch_size
    assert ckpt.chosen.activations / ckpt.micro_batch_size < plain.chosen.activations / plain.micro_batch_size


@settings(max_examples=200, deadline=None)
@given(world=st.sampled_from([1, 2, 4, 8]), per_worker=st.integers(1, 64), free_gb=st.floats(1, 300),
       seq=st.integers(32, 4096), stage=st.sampled_from(["auto", 2, 3]),
       name=st.sampled_from(sorted(SHAPES)), ckpt=st.booleans())
def test_accumulation_x_micro_x_world_is_the_global_batch(world, per_worker, free_gb, seq, stage, name, ckpt):
    global_batch = world * per_worker
    plan = plan_memory(SHAPES[name], world=world, free_bytes=free_gb * 1e9, total_bytes=free_gb * 1e9,
                       on_gpu=True, seq_len=seq, global_batch_size=global_batch, zero_stage=stage,
                       micro_batch="auto", lora=LoraSettings(), gradient_checkpointing=ckpt)
    assert plan.grad_accum * plan.micro_batch_size * world == global_batch
    assert plan.zero_stage in ((2, 3) if stage == "auto" else (stage,))
    assert plan.fits == (plan.chosen.needed <= free_gb * 1e9)
    if plan.fits and plan.micro_batch_size < per_worker:  # the next larger candidate did not fit
        larger = [e for e in plan.considered if e.zero_stage == plan.zero_stage and e.micro_batch_size > plan.micro_batch_size]
        assert larger and all(e.needed > free_gb * 1e9 for e in larger)


def test_nothing_fits_falls_back_to_micro_batch_one_and_says_so():
    plan = _plan(free=5e9)
    assert (plan.zero_stage, plan.micro_batch_size, plan.grad_accum, plan.fits) == (3, 1, 16, False)
    assert "micro-batch 1 for want of one that fits" in plan.explain()


def test_explicit_ints_are_never_changed():
    tight = _plan(free=5e9, stage=2, micro=4)
    assert (tight.zero_stage, tight.micro_batch_size, tight.grad_accum, tight.fits) == (2, 4, 4, False)
    cfg = resolve_config("qwen2.5-7b", overrides={"zero_stage": 3, "per_device_batch_size": 2})
    plan = memory.plan_for_config(cfg, Q7, world=1, free_bytes=500e9, total_bytes=500e9, on_gpu=True, seq_len=512)
    assert memory.resolved(cfg, plan) == cfg  # room for 16, but 2 and ZeRO-3 were asked for


def test_resolved_config_holds_ints_downstream():
    from ray_mtup.engine import deepspeed_config, grad_accum

    cfg = resolve_config("qwen2.5-7b", overrides={"num_workers": 2})
    with pytest.raises(ConfigError, match="^zero_stage: auto is resolved"):
        deepspeed_config(cfg, 2, True)
    plan = memory.plan_for_config(cfg, Q7, world=2, free_bytes=80e9, total_bytes=80e9, on_gpu=True, seq_len=700)
    ready = memory.resolved(cfg, plan)
    ds = deepspeed_config(ready, 2, True)
    assert isinstance(ready.zero_stage, int) and isinstance(ready.per_device_batch_size, int)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == plan.zero_stage
    assert grad_accum(ready, 2) == plan.grad_accum
    assert TrainConfig.from_dict(ready.to_dict()) == ready  # a valid config, as it is written to checkpoints


def test_resolve_auto_on_this_cpu(tmp_path):
    import torch

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 500}))
    free, total = memory.device_memory(torch.device("cpu"))
    assert 0 < free <= total
    cfg = TrainConfig(per_device_batch_size="auto", global_batch_size=8)
    ready, plan = memory.resolve_auto(cfg, [40, 90, 77], str(tmp_path), {}, 1, torch.device("cpu"), False)
    assert (ready.zero_stage, ready.per_device_batch_size, plan.seq_len, plan.dtype_bytes) == (2, 8, 90, 4)
    assert plan.device_free_bytes <= free * 1.5  # what this host reported (give or take other jobs)


@pytest.mark.parametrize("overrides, field", [
    ({"zero_stage": 1}, "zero_stage"), ({"zero_stage": "fast"}, "zero_stage"), ({"zero_stage": 2.5}, "zero_stage"),
    ({"per_device_batch_size": 0}, "per_device_batch_size"), ({"per_device_batch_size": "max"}, "per_device_batch_size"),
    ({"per_device_batch_size": "auto", "num_workers": 3}, "global_batch_size"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig().replace(**overrides)
    assert err.value.field == field


def test_auto_and_ints_from_yaml_and_flags():
    assert TrainConfig.from_dict({"zero_stage": "3", "per_device_batch_size": "auto"}).zero_stage == 3
    args = build_parser().parse_args(["--model", "qwen2.5-7b", "--zero-stage", "auto", "--set",
                                      "per_device_batch_size=auto"])
    cfg = config_from_args(args)
    assert (cfg.zero_stage, cfg.per_device_batch_size) == ("auto", "auto")
    args = build_parser().parse_args(["--model", "qwen2.5-7b", "--zero-stage", "3", "--set", "per_device_batch_size=2"])
    assert (config_from_args(args).zero_stage, config_from_args(args).per_device_batch_size) == (3, 2)
    smoke = resolve_config("tiny", space_overrides={"per_device_batch_size": 4, "global_batch_size": 4})
    assert smoke.per_device_batch_size == 4  # a search space's overrides still set ints


def test_entry_point_prints_a_plan_without_a_device(capsys):
    seven = str(card_dir("qwen2.5-7b"))
    assert memory.main(["--model", "qwen2.5-7b", "--model-path", seven, "--device-memory", "141e9", "--world", "1",
                        "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["zero_stage"] == 2 and plan["micro_batch_size"] * plan["grad_accum"] == 16
    assert plan["device_total_bytes"] == 141e9 and plan["chosen"]["needed"] <= 141e9
    assert memory.main(["--model", "qwen2.5-7b", "--model-path", seven, "--device-memory", "1e9", "--set",
                        "zero_stage=5"]) == 2
    assert "zero_stage" in capsys.readouterr().err
