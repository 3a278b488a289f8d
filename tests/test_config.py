"""Configs are data: every preset and search space YAML loads and validates; bad ones name the key."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from ray_mtup.config import (
    MODELS,
    PACKAGE_DIR,
    PRESETS,
    SEARCH_SPACES,
    TrainConfig,
    load_preset,
    packaged_names,
    packaged_yaml,
    preset_names,
    resolve_config,
)
from ray_mtup.engine import grad_accum
from ray_mtup.errors import ConfigError
from ray_mtup.search import documented_optimum, load_search_space
from ray_mtup.trial import apply_sampled

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[1] / SEARCH_SPACES  # top of the repository
SPACES = sorted(SEARCH_SPACES_DIR.glob("*.yaml"))
SMOKE_TRIALS = yaml.safe_load((SEARCH_SPACES_DIR / "smoke.yaml").read_text(encoding="utf-8"))["num_samples"]


def test_presets_match_the_documented_method():
    assert set(preset_names()) == {"quick_test", "fast_iteration", "full_training"}
    q = resolve_config("qwen2.5-3b", preset="quick_test")
    assert (q.max_samples, q.epochs) == (100, 1)
    f = resolve_config("qwen2.5-3b", preset="fast_iteration")
    assert (f.max_samples, f.epochs) == (500, 3)
    full3 = resolve_config("qwen2.5-3b", preset="full_training")
    assert (full3.max_samples, full3.epochs, full3.learning_rate) == (None, 10, 2e-4)
    # real models: the micro-batch and the ZeRO stage are planned from the device's memory
    assert (full3.per_device_batch_size, full3.global_batch_size, full3.zero_stage) == ("auto", 16, "auto")
    full7 = resolve_config("qwen2.5-7b", preset="full_training")
    assert (full7.epochs, full7.learning_rate, full7.per_device_batch_size, full7.global_batch_size) == (
        15, 1e-4, "auto", 16)
    assert all(spec.global_batch_size == 16 for spec in MODELS.values())  # the method's global batch
    d = TrainConfig()
    assert (d.val_split, d.weight_decay, d.lora.r, d.lora.alpha, d.lora.dropout) == (0.1, 0.01, 64, 128, 0.05)
    assert d.lora.target_modules == ("all-linear",)  # peft's: every linear layer but the output head


@pytest.mark.parametrize("path", sorted((PACKAGE_DIR / PRESETS).glob("*.yaml")), ids=lambda p: p.name)
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
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.epochs = 3
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.lora.r = 3


def test_presets_and_spaces_are_package_data_or_paths(tmp_path: Path):
    assert set(packaged_names(SEARCH_SPACES)) == {"default", "smoke", "tiny_cpu"}
    assert load_search_space(packaged_yaml(SEARCH_SPACES, "smoke")).num_samples == SMOKE_TRIALS
    own = tmp_path / "mine.yaml"
    own.write_text("epochs: 2\n", encoding="utf-8")
    assert resolve_config("tiny", preset=str(own)).epochs == 2  # a path works as well as a name
    with pytest.raises(ConfigError) as err:
        load_preset("no_such_preset")
    assert err.value.field == "preset" and "quick_test" in err.value.message


@pytest.mark.parametrize(
    "value, expected",
    [("q_proj", ("q_proj",)), (["q_proj", "v_proj"], ("q_proj", "v_proj"))],
)
def test_target_modules_take_one_name_or_a_list(value, expected):
    assert TrainConfig().replace(**{"lora.target_modules": value}).lora.target_modules == expected


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"lora.target_modules": "q_prj"}, "lora.target_modules", "unknown module 'q_prj'"),
        ({"lora.target_modules": []}, "lora.target_modules", "must not be empty"),
        ({"epochs": "many"}, "epochs", "expected an integer, got 'many'"),
        ({"epochs": 2.5}, "epochs", "expected an integer, got 2.5"),
        ({"use_gpu": "maybe"}, "use_gpu", "expected true or false"),
        ({"tiny": 3}, "tiny", "expected a mapping, got 3"),
        ({"tiny.num_heads": 3}, "tiny.hidden_size", "divisible by tiny.num_heads (3)"),
        ({"lora.rank": 8}, "lora.rank", "unknown key; valid keys: ['alpha', 'dropout', 'r'"),
        ({"max_new_tokens": 4}, "max_new_tokens", "must be >= 8, got 4"),
        ({"global_batch_size": 10}, "global_batch_size", "not a multiple of per_device_batch_size x num_workers"),
        ({"num_workers": 3}, "global_batch_size", "(4 x 3 = 12)"),
    ],
)
def test_config_errors_name_the_dotted_field(overrides: dict, field: str, message: str):
    with pytest.raises(ConfigError) as err:
        TrainConfig().replace(**overrides)
    assert err.value.field == field and message in err.value.message, str(err.value)


def test_values_are_coerced_by_type():
    cfg = TrainConfig.from_dict({"learning_rate": "1e-3", "epochs": 3.0, "max_new_tokens": None})
    assert (cfg.learning_rate, cfg.epochs, cfg.max_new_tokens) == (1e-3, 3, None)
    assert type(cfg.epochs) is int


def _accum(cfg: TrainConfig) -> int:
    return grad_accum(cfg, cfg.num_workers)


def test_grad_accum_is_derived_from_the_global_batch():
    assert _accum(resolve_config("qwen2.5-3b", overrides={"per_device_batch_size": 4})) == 4
    assert _accum(resolve_config("qwen2.5-7b", overrides={"per_device_batch_size": 2})) == 8
    assert _accum(resolve_config("tiny")) == 2
    assert _accum(resolve_config("qwen2.5-7b", overrides={"num_workers": 4, "per_device_batch_size": 2})) == 2
    with pytest.raises(ConfigError, match="^per_device_batch_size: auto is resolved"):
        _accum(resolve_config("qwen2.5-7b"))  # planned on the workers, not here
    with pytest.raises(ConfigError, match="^global_batch_size: "):
        resolve_config("qwen2.5-7b", overrides={"num_workers": 3})


def test_resolution_order_flags_over_space_over_file_over_preset(tmp_path: Path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 4\nseed: 4\nweight_decay: 0.4\n", encoding="utf-8")
    cfg = resolve_config("qwen2.5-3b", preset="quick_test", config_file=config_file,
                         space_overrides={"seed": 5, "weight_decay": 0.5}, overrides={"weight_decay": 0.6})
    assert (cfg.max_samples, cfg.learning_rate) == (100, 2e-4)  # preset, model optimum
    assert (cfg.epochs, cfg.seed, cfg.weight_decay) == (4, 5, 0.6)  # file > preset, space > file, flags > space


@pytest.mark.integration
def test_a_non_editable_install_finds_presets_and_search_spaces(tmp_path: Path):
    """Build the wheel, install it elsewhere and resolve a preset and a search space from there."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "*.egg-info", "build",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ray_mtup-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   timeout=300)
    code = ("import ray_mtup.config as c, ray_mtup.search as s; "
            "print(c.__file__, c.preset_names(), c.resolve_config('tiny', preset='quick_test').max_samples, "
            "s.load_search_space(c.packaged_yaml(c.SEARCH_SPACES, 'smoke')).num_samples)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and out[-2:] == ["100", str(SMOKE_TRIALS)], out
    assert "'quick_test']" in out


def test_a_config_of_the_grad_accum_era_still_loads(tmp_path: Path):
    old = resolve_config("qwen2.5-7b").to_dict()
    del old["global_batch_size"]
    old.update(grad_accum=8, num_workers=1, per_device_batch_size=2)  # that era's configs held an int
    assert TrainConfig.from_dict(old).global_batch_size == 16  # 8 x 2 per device x 1 worker
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(old), encoding="utf-8")
    assert _accum(resolve_config(config_file=path)) == 8
    with pytest.raises(ConfigError, match="^grad_accum: no longer a field"):
        resolve_config("tiny", overrides={"grad_accum": 2})  # on the command line: say what replaced it


def test_search_spaces_live_at_the_top_and_the_wheel_maps_them_into_the_package():
    """search_spaces/ is a top-level folder of the repository; pyproject.toml ships it as
    ray_mtup/search_spaces/ (the wheel test above installs it), and a checkout reads it in place."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    on_disk = sorted(p.stem for p in (repo / "search_spaces").glob("*.yaml"))
    assert not (repo / "ray_mtup" / "search_spaces").exists()
    assert packaged_names(SEARCH_SPACES) == on_disk and "smoke" in on_disk
    assert Path(str(packaged_yaml(SEARCH_SPACES, "smoke"))) == repo / "search_spaces" / "smoke.yaml"
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setuptools["package-dir"]["ray_mtup.search_spaces"] == "search_spaces"
    assert "ray_mtup.search_spaces" in setuptools["packages"]
    assert setuptools["package-data"]["ray_mtup.search_spaces"] == ["*.yaml"]
