"""The one path every model takes, without Ray: the tiny checkpoint directory, loading it with
``from_pretrained``, the project's decoding settings, the token budget and the batch arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ray_mtup.config import TinyModelSettings, TrainConfig, resolve_config
from ray_mtup.engine import deepspeed_config, grad_accum
from ray_mtup.errors import ConfigError
from ray_mtup.generation import Step2Closed, derived_max_new_tokens, generate, prompts_for
from ray_mtup.modeling import (
    QWEN_SAMPLING_DEFAULTS,
    WeightsSource,
    build_model,
    build_tokenizer,
    count_parameters,
    write_tiny_checkpoint,
)
from ray_mtup.prompts import TEMPLATES, get_template
from ray_mtup.training import plan_schedule, prepare_data


def test_tiny_checkpoint_is_laid_out_like_qwen_instruct(qwen_like_checkpoint: Path):
    names = {p.name for p in qwen_like_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((qwen_like_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    gen = json.loads((qwen_like_checkpoint / "generation_config.json").read_text())
    assert {k: gen[k] for k in QWEN_SAMPLING_DEFAULTS} == QWEN_SAMPLING_DEFAULTS
    tok = build_tokenizer(WeightsSource(str(qwen_like_checkpoint)))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "xin chào"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nxin chào<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_checkpoint_is_cached_by_its_settings(tmp_path):
    settings = TinyModelSettings(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64, vocab_size=300)
    texts = ["tôi đi học", "(đ / đi :agent (t / tôi))"] * 10
    first = write_tiny_checkpoint(settings, 0, texts, cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_checkpoint(settings, 0, texts, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not written again
    assert write_tiny_checkpoint(settings, 1, texts, cache_dir=tmp_path) != first  # another seed, another model


def test_decoding_ignores_the_checkpoints_sampling_defaults(qwen_like_checkpoint: Path, tmp_path):
    """Qwen2.5-Instruct ships do_sample, top-k/p and a 1.05 repetition penalty: the project decodes
    greedily without them, so a checkpoint carrying them generates exactly what a plain one does."""
    plain = tmp_path / "plain"
    shutil.copytree(qwen_like_checkpoint, plain)
    gen = json.loads((plain / "generation_config.json").read_text())
    for key in QWEN_SAMPLING_DEFAULTS:
        gen.pop(key)
    (plain / "generation_config.json").write_text(json.dumps(gen))
    cfg = TrainConfig()
    template = get_template("v4_compact")
    prompts = prompts_for(template, ["tôi đi học .", "anh ấy muốn về nhà .", "trời mưa to ."])
    outputs = []
    for directory in (qwen_like_checkpoint, plain):
        source = WeightsSource(str(directory))
        tok = build_tokenizer(source)
        model = build_model(source, cfg, tok, "cpu")
        assert (model.generation_config.do_sample, model.generation_config.repetition_penalty) == (False, 1.0)
        outputs.append(generate(model, tok, prompts, batch_size=2, max_new_tokens=24).texts)
    assert outputs[0] == outputs[1]
    assert any(outputs[0])


def test_step2_stopping_rule_marks_rows_whose_graph_closed(qwen_like_checkpoint: Path):
    import torch

    tok = build_tokenizer(WeightsSource(str(qwen_like_checkpoint)))
    template = TEMPLATES["v2_natural"]
    prompt = tok("câu:", add_special_tokens=False)["input_ids"]
    rows = [f"(đi){template.step2_marker}(đ / đi :agent (t / tôi))", f"(đi){template.step2_marker}(đ / đi :agent (t"]
    ids = [prompt + tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(x) for x in ids)
    batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    done = Step2Closed(tok, template, len(prompt))(batch, None)
    assert done.tolist() == [True, False]


def test_generation_budget_comes_from_the_training_data(qwen_like_checkpoint):
    cfg = resolve_config("qwen2.5-1.5b", overrides={"model_path": str(qwen_like_checkpoint), "max_samples": 30})
    assert cfg.max_new_tokens is None
    data, source, _ = prepare_data(cfg)
    longest = max(e.completion_length for e in data.train_encoded)
    assert data.max_new_tokens == derived_max_new_tokens([longest]) > longest
    assert source.path == str(qwen_like_checkpoint)
    fixed = prepare_data(cfg.replace(max_new_tokens=40))[0]
    assert fixed.max_new_tokens == 40


def test_global_batch_is_the_documented_one_at_any_world_size():
    """7B's recipe is a global batch of 16 (2 x 8): on 4 workers accumulation drops to 2, so the
    number of optimizer steps per epoch stays the same."""
    one = resolve_config("qwen2.5-7b", overrides={"num_workers": 1, "per_device_batch_size": 2, "zero_stage": 3})
    four = resolve_config("qwen2.5-7b", overrides={"num_workers": 4, "per_device_batch_size": 2, "zero_stage": 3})
    assert (grad_accum(one, 1), grad_accum(four, 4)) == (8, 2)
    micro_batches = 1658 // 2  # the VLSP training split at micro-batch 2 on one worker
    steps_1 = plan_schedule(one, micro_batches, 1).steps_per_epoch
    steps_4 = plan_schedule(four, micro_batches // 4, 4).steps_per_epoch
    assert steps_1 == 104 and abs(steps_4 - steps_1) <= 1
    assert deepspeed_config(four, 4, True)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match="global_batch_size"):
        resolve_config("qwen2.5-7b", overrides={"num_workers": 3})


def test_parameter_count_reads_partitioned_sizes():
    """Under ZeRO-3 a partitioned tensor's numel() is 0; its full size is ds_numel."""
    import torch

    full = torch.nn.Parameter(torch.zeros(4, 5))
    partitioned = torch.nn.Parameter(torch.zeros(0))
    partitioned.ds_numel = 20
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    model = torch.nn.Module()
    model.a, model.b, model.c = full, partitioned, frozen
    assert count_parameters(model, trainable_only=True) == 40
    assert count_parameters(model) == 43
