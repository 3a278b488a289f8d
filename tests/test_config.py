"""Configs are data: every preset and search space YAML loads and validates; bad ones name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_mtup.config import (
    MODELS,
    PRESETS_DIR,
    SEARCH_SPACES_DIR,
    TrainConfig,
    load_preset,
    preset_names,
    resolve_config,
)
from ray_mtup.errors import ConfigError
from ray_mtup.search import documented_optimum, load_search_space
from ray_mtup.trial import apply_sampled

SPACES = sorted(SEARCH_SPACES_DIR.glob("*.yaml"))


def test_presets_match_the_documented_method():
    assert set(preset_names()) == {"quick_test", "fast_iteration", "full_training"}
    q = resolve_config("qwen2.5-3b", preset="quick_test")
    assert (q.max_samples, q.epochs) == (100, 1)
    f = resolve_config("qwen2.5-3b", preset="fast_iteration")
    assert (f.max_samples, f.epochs) == (500, 3)
    full3 = resolve_config("qwen2.5-3b", preset="full_training")
    assert (full3.max_samples, full3.epochs, full3.learning_rate) == (None, 10, 2e-4)
    assert (full3.per_device_batch_size, full3.grad_accum) == (4, 4)
    full7 = resolve_config("qwen2.5-7b", preset="full_training")
    assert (full7.epochs, full7.learning_rate, full7.per_device_batch_size, full7.grad_accum) == (15, 1e-4, 2, 8)
    d = TrainConfig()
    assert (d.val_split, d.weight_decay, d.lora.r, d.lora.alpha, d.lora.dropout) == (0.1, 0.01, 64, 128, 0.05)
    assert d.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_file_validates_and_documents_its_command(path: Path):
    assert path.read_text(encoding="utf-8").startswith("#")
    assert "run_tune.py" in path.read_text(encoding="utf-8").split("\n\n")[0]
    TrainConfig().replace(**load_preset(path.stem))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_validates(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "run_tune.py" in text.splitlines()[1] + text.splitlines()[2]
    space = load_search_space(path)
    assert space.num_samples >= 1 and space.max_epochs >= 1
    base = resolve_config("tiny").replace(**space.overrides)
    point = documented_optimum(space, base)
    assert all(space.params[k].contains(v) for k, v in point.items())
    apply_sampled(base.to_dict(), point)  # the first trial's config is valid


def test_default_space_is_the_documented_region():
    space = load_search_space(SEARCH_SPACES_DIR / "default.yaml")
    lr, ep = space.params["learning_rate"], space.params["epochs"]
    assert (lr.type, lr.low, lr.high) == ("loguniform", 1e-4, 3e-4)
    assert (ep.type, ep.low, ep.high) == ("randint", 8, 15)
    assert set(space.params["lora_r"].values) == {16, 32, 64, 128}
    assert len(space.params["template"].values) == 5
    for model in ("qwen2.5-3b", "qwen2.5-7b"):  # the documented optimum lies inside, unclipped
        point = documented_optimum(space, resolve_config(model))
        assert point["learning_rate"] == MODELS[model].learning_rate
        assert point["epochs"] == MODELS[model].epochs


@pytest.mark.parametrize(
    "mutation, key",
    [
        ({"params": {"learning_rate": {"type": "loguniform", "low": 3e-4, "high": 1e-4}}}, "params.learning_rate"),
        ({"params": {"epochs": {"type": "randint", "low": 15, "high": 8}}}, "params.epochs"),
        ({"params": {"momentum": {"type": "uniform", "low": 0, "high": 1}}}, "params.momentum"),
        ({"params": {"template": {"type": "choice", "values": ["v9_poetic"]}}}, "params.template.values"),
        ({"params": {"lora_r": {"type": "choice", "values": [8], "step": 2}}}, "params.lora_r.step"),
        ({"schedule": "fast"}, "schedule"),
        ({"overrides": {"learning_rate": -1}}, "learning_rate"),
        ({"reduction_factor": 1}, "reduction_factor"),
    ],
)
def test_bad_search_space_names_the_key(tmp_path: Path, mutation: dict, key: str):
    data = yaml.safe_load((SEARCH_SPACES_DIR / "default.yaml").read_text(encoding="utf-8"))
    for k, v in mutation.items():
        if k == "params":
            data["params"].update(v)
        else:
            data[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_search_space(path)
    assert err.value.field == key


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"epochs": 0}, "epochs"),
        ({"zero_stage": 1}, "zero_stage"),
        ({"template": "v0"}, "template"),
        ({"lora.r": 0}, "lora.r"),
        ({"val_split": 1.0}, "val_split"),
        ({"model_path": "/definitely/not/here"}, "model_path"),
        ({"batch": 4}, "batch"),
    ],
)
def test_bad_config_values_name_the_field(overrides: dict, field: str):
    with pytest.raises(ConfigError) as err:
        TrainConfig().replace(**overrides)
    assert err.value.field == field


def test_config_round_trips_through_a_plain_dict():
    cfg = resolve_config("qwen2.5-7b", preset="fast_iteration", overrides={"lora.r": 16, "zero_stage": 3})
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(Exception):
        cfg.epochs = 3  # frozen
