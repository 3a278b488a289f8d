"""Any causal LM (ray_mtup.models): registry names, hub ids and checkpoint directories; shapes
read from config.json; defaults derived from the size; LoRA on all-linear; the chat template.

The Qwen3, Llama 3.1 and Gemma 3 checkpoints are random-init and tiny (conftest.family_checkpoints);
the released models' config.json files are written by hand from their cards (fixtures/configs/)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mtup import memory
from ray_mtup.config import MODELS, LoraSettings, TrainConfig, resolve_config
from ray_mtup.errors import ConfigError
from ray_mtup.launcher import build_parser, config_from_args
from ray_mtup.models import DECODER_LINEARS, model_optimum
from ray_mtup.modeling import WeightsSource, apply_lora, build_model, build_tokenizer

from conftest import REPO_ROOT, card_dir

FAMILIES = ("qwen3", "llama", "gemma3")
#: (end-of-turn token, pad token) each family's tokenizer and generation config give.
TURN_AND_PAD = {"qwen3": ("<|im_end|>", "<|endoftext|>"), "llama": ("<|eot_id|>", "<|eot_id|>"),
                "gemma3": ("<end_of_turn>", "<pad>")}


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_from_config_counts_the_built_model_and_its_all_linear_adapter(family_checkpoints, family):
    """The arithmetic's counts (head_dim, q/k norms, four norms, tied or untied head) are the
    real model's, and peft's all-linear adapts exactly the layer's seven linears, never lm_head."""
    directory = family_checkpoints[family]
    shape = memory.model_shape(str(directory))
    source = WeightsSource(str(directory))
    model = build_model(source, TrainConfig(model=str(directory)), build_tokenizer(source), "cpu")
    assert shape.base_params() == sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, LoraSettings(r=4))
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DECODER_LINEARS)
    assert shape.lora_params(4, ("all-linear",)) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("card, params, lr, epochs", [
    ("qwen3-8b", 8.19e9, 1e-4, 15), ("qwen3-14b", 14.77e9, 1e-4, 15), ("llama-3.1-8b", 8.03e9, 1e-4, 15),
    ("gemma-3-1b", 1.00e9, 2e-4, 10),
])
def test_defaults_are_derived_from_the_size_in_config_json(card, params, lr, epochs, caplog):
    with caplog.at_level(logging.INFO, logger="ray_mtup.config"):
        cfg = resolve_config(str(card_dir(card)))
    found = model_optimum(str(card_dir(card)))
    assert found.params == pytest.approx(params, rel=0.005) and not found.documented
    assert (cfg.learning_rate, cfg.epochs, cfg.global_batch_size, cfg.per_device_batch_size) == (lr, epochs, 16, "auto")
    assert "no documented optimum: derived defaults" in caplog.text


def test_registry_lists_qwen3_by_hub_id_and_qwen25_keeps_its_documented_optimum():
    assert {n: MODELS[n].hub_id for n in ("qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b")} == {
        "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B",
        "qwen3-14b": "Qwen/Qwen3-14B"}
    assert not any(MODELS[n].documented for n in MODELS if n.startswith("qwen3"))
    seven = resolve_config("qwen2.5-7b")  # no config.json read: documented
    assert (seven.learning_rate, seven.epochs) == (1e-4, 15)
    # a registry name with its weights elsewhere: the shape (and so the defaults) from there
    q8 = resolve_config("qwen3-8b", overrides={"model_path": str(card_dir("qwen3-8b"))})
    assert (q8.learning_rate, q8.epochs) == (1e-4, 15)


def test_model_is_a_registry_name_a_hub_id_or_a_directory(tmp_path):
    assert TrainConfig(model="Qwen/Qwen3-8B").spec.hub_id == "Qwen/Qwen3-8B"
    assert TrainConfig(model=str(card_dir("llama-3.1-8b"))).spec.hub_id is None
    with pytest.raises(ConfigError, match="model: unknown model 'llama'"):
        TrainConfig(model="llama")
    with pytest.raises(ConfigError, match="lora.target_modules"):
        TrainConfig(lora={"target_modules": ["all-linear", "q_proj"]})
    # a directory's own linears decide its targets, before Ray starts
    args = build_parser().parse_args(["--model", str(card_dir("gemma-3-1b")), "--set", "lora.target_modules=qkv_proj"])
    with pytest.raises(ConfigError, match="lora.target_modules: unknown module 'qkv_proj'"):
        config_from_args(args)


def test_hub_id_without_network_exits_2_naming_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "run_tune.py", "--model", "Qwen/Qwen3-8B", "--no-search", "--dry-run",
                           "--storage-path", str(tmp_path / "runs")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot read the hub for 'Qwen/Qwen3-8B'" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_ends_each_turn_with_the_familys_token(family_checkpoints, family, tmp_path):
    from ray_mtup.dataset import IGNORE_INDEX, MtupExample, encode
    from ray_mtup.generation import decoding_config
    from ray_mtup.prompts import TEMPLATES, end_of_turn_id, render_inference

    tok = build_tokenizer(WeightsSource(str(family_checkpoints[family])))
    turn, pad = TURN_AND_PAD[family]
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == turn and tok.pad_token == pad
    assert end_of_turn_id(tok) in decoding_config(tok).eos_token_id  # generation stops at the end of turn
    ex = MtupExample("x", "tôi đi học .", "f", "(đi :agent (tôi))", "(đ / đi :agent (t / tôi))")
    chat, plain = encode(tok, TEMPLATES["v2_natural"], ex, chat=True), encode(tok, TEMPLATES["v2_natural"], ex)
    assert tok.convert_ids_to_tokens(chat.labels[-1]) == turn and plain.labels[-1] == tok.eos_token_id
    prompt_len = chat.labels.count(IGNORE_INDEX)
    assert chat.input_ids[prompt_len:] == plain.input_ids[plain.labels.count(IGNORE_INDEX):-1] + [chat.labels[-1]]
    prompt = render_inference(TEMPLATES["v2_natural"], ex.sentence, chat=tok)
    assert prompt.endswith(TEMPLATES["v2_natural"].step1_marker) and "tôi đi học ." in prompt
    assert ("<think>\n\n</think>" in prompt) == (family == "qwen3")  # Qwen3's thinking block is off


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_prints_each_architectures_memory_plan(family_checkpoints, family, capsys):
    from ray_mtup import launcher

    directory = family_checkpoints[family]
    assert launcher.main(["--model", str(directory), "--no-search", "--dry-run", "--json", "--device", "gpu",
                          "--num-gpus", "1", "--device-memory", "80e9"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["memory_plan"]
    assert plan["model_shape"]["model_type"] == json.loads((directory / "config.json").read_text())["model_type"]
    assert plan["base_params"] == memory.model_shape(str(directory)).base_params() and plan["fits"]
    assert plan["lora_targets"] == list(DECODER_LINEARS)


def test_pad_token_comes_from_the_generation_config(family_checkpoints, tmp_path):
    """Llama 3.1's tokenizer has no pad token: its generation_config.json's one is used, else EOS."""
    directory = tmp_path / "llama"
    shutil.copytree(family_checkpoints["llama"], directory)
    tok = build_tokenizer(WeightsSource(str(directory)))
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"
    gen = json.loads((directory / "generation_config.json").read_text())
    gen["pad_token_id"] = tok.convert_tokens_to_ids("<|end_of_text|>")
    (directory / "generation_config.json").write_text(json.dumps(gen))
    assert build_tokenizer(WeightsSource(str(directory))).pad_token == "<|end_of_text|>"


def test_default_search_centres_on_the_derived_defaults():
    from ray_mtup.config import SEARCH_SPACES, packaged_yaml
    from ray_mtup.search import documented_optimum, load_search_space

    space = load_search_space(packaged_yaml(SEARCH_SPACES, "default"))
    for card, (lr, epochs) in {"qwen3-14b": (1e-4, 15), "gemma-3-1b": (2e-4, 10)}.items():
        base = resolve_config(str(card_dir(card))).replace(**space.overrides)
        point = documented_optimum(space, base)
        assert (point["learning_rate"], point["epochs"]) == (lr, epochs)


@pytest.mark.parametrize("card", ["qwen3-8b", "qwen3-14b", "llama-3.1-8b"])
def test_memory_plan_of_released_models_on_one_h200(card, capsys):
    """The plan these models get on one H200 (141 GB) at 1024 tokens, from their cards' config.json."""
    assert memory.main(["--model", str(card_dir(card)), "--device-memory", "141e9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["micro_batch_size"] * plan["grad_accum"] == 16
    assert plan["lora_targets"] == list(DECODER_LINEARS)
    print(plan["explain"])


#: One run per architecture, each through run_tune.py and the same loading path as a hub checkpoint
#: (from_pretrained of the directory): Qwen3 with its chat template (thinking off), Llama under
#: ZeRO-3 on two workers, Gemma 3 with its chat template (<end_of_turn>, sliding-window layers).
E2E = {"qwen3": ["--set", "chat_template=true"],
       "llama": ["--workers-per-trial", "2", "--zero-stage", "3"],
       "gemma3": ["--set", "chat_template=true"]}


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_run_tune_and_predict_on_each_architecture(family_checkpoints, family, tmp_path):
    from ray_mtup.predict import predict_file

    directory = family_checkpoints[family]
    proc = subprocess.run(
        [sys.executable, "run_tune.py", "--model", str(directory), "--preset", "quick_test", "--no-search",
         "--set", "max_samples=24", "--set", "eval_max_samples=2", "--set", "max_new_tokens=24",
         "--set", "max_steps_per_epoch=1", "--device", "cpu", "--storage-path", str(tmp_path), "--name", family,
         *E2E[family]],
        cwd=REPO_ROOT, env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no documented optimum: derived defaults" in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / family / "summary.json").read_text(encoding="utf-8"))
    plan = summary["memory_plan"]
    assert summary["config"]["model"] == str(directory) and plan["lora_targets"] == list(DECODER_LINEARS)
    assert plan["model_shape"]["model_type"] == json.loads((directory / "config.json").read_text())["model_type"]
    assert (plan["world_size"], plan["zero_stage"]) == ((2, 3) if family == "llama" else (1, plan["zero_stage"]))
    assert summary["final"]["n_eval"] == 2  # the validation split of 24 graphs
    sentences = tmp_path / "in.txt"
    sentences.write_text("tôi đi học .\nanh ấy đọc sách ở thư viện .\n", encoding="utf-8")
    report = predict_file(tmp_path / family, sentences, tmp_path / "out.txt", max_new_tokens=24, device="cpu")
    assert report.n_sentences == 2
    blocks = (tmp_path / "out.txt").read_text(encoding="utf-8").strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["#::snt tôi đi học .", "#::snt anh ấy đọc sách ở thư viện ."]
