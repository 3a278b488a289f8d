"""bench/gpu_check.sh (issue 13's one-shot GPU check) in its CPU tiny mode, and its helpers."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402


def _run_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    results = tmp_path / "h200.json"
    full_env = {**os.environ, "GPU_CHECK_SHAPE": "tiny", "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SKIP_INSTALL": "1",
                "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(results),
                "GPU_CHECK_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": str(os.cpu_count() or 1), **env}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=full_env, capture_output=True,
                          text=True, timeout=600)
    return done, json.loads(results.read_text())


def test_helpers_doctests():
    assert doctest.testmod(gpu_check, optionflags=doctest.ELLIPSIS).failed == 0


def test_a_step_past_the_budget_is_recorded_as_an_error_and_the_check_goes_on(tmp_path):
    done, results = _run_check(tmp_path, GPU_CHECK_BUDGET_S="3")
    assert done.returncode == 0, done.stderr[-2000:]
    for step in ("imports", "train", "generate", "loop", "speedups"):
        assert results[step]["rc"] == 124
        assert "no time left" in results[step]["error"]
        assert results[step]["records"] == []
    assert results["env"]["shape"] == "tiny" and results["env"]["torch"]
    assert results["projection"]["targets_met"] == dict.fromkeys(gpu_check.TARGETS)


def test_wheels_to_install_skips_what_is_installed_and_foreign_platforms(tmp_path):
    from importlib import metadata

    installed = metadata.version("pyyaml")
    names = [f"PyYAML-{installed}-py3-none-any.whl",              # installed at this version: skipped
             "PyYAML-9999.0-py3-none-any.whl",                    # newer than installed: chosen
             "no_such_dist_xyz-1.0-py3-none-any.whl",             # missing: chosen
             "no_such_dist_abc-1.0-cp27-cp27m-win_amd64.whl"]     # another platform: skipped
    for name in names:
        (tmp_path / name).write_bytes(b"")
    chosen = [p.name for p in gpu_check.wheels_to_install(tmp_path)]
    assert chosen == ["PyYAML-9999.0-py3-none-any.whl", "no_such_dist_xyz-1.0-py3-none-any.whl"]


def test_random_checkpoint_takes_a_real_vocab_size_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_mtup.errors import ModelError
    from ray_mtup.modeling import write_random_checkpoint

    texts = ["xin chào thế giới", "(c / chào-01 :ARG0 (t / thế_giới))"] * 20
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True)
    write_random_checkpoint(tmp_path / "ckpt", texts, 300, 0, shape)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert len(tokenizer) <= 300 < model.get_input_embeddings().weight.shape[0] == 1000
    assert tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ModelError, match="vocab_size"):
        write_random_checkpoint(tmp_path / "small", texts, 300, 0, {**shape, "vocab_size": 10})


def test_loop_config_takes_set_overrides(tmp_path):
    cfg = gpu_check.loop_config(tmp_path, "cpu", ["zero_stage=3", "lora.r=8"])
    assert (cfg.model, cfg.zero_stage, cfg.lora.r, cfg.epochs, cfg.use_gpu) == ("qwen2.5-1.5b", 3, 8, 1, False)
    assert cfg.model_path == str(tmp_path.resolve())
    assert gpu_check.loop_config(tmp_path, "cuda", []).use_gpu is True


@pytest.mark.integration
def test_gpu_check_cpu_tiny_mode_measures_the_three_steps(tmp_path):
    done, results = _run_check(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in ("imports", "train", "generate", "loop", "speedups"):
        assert results[step]["rc"] == 0 and "error" not in results[step], (step, results[step].get("error"))
    assert results["imports"]["records"][0]["ray_imported"] is False
    train = {r["variant"]: r for r in results["train"]["records"] if r["bench"] == "train"}
    assert set(train) == {"plain_peft", "deepspeed_zero2", "deepspeed_zero3"}
    assert all(isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0 for r in train.values())
    generate = {r["variant"]: r for r in results["generate"]["records"] if r["bench"] == "generate"}
    assert set(generate) == {"hf_default", "project"}
    assert all(r["new_tokens_per_s"] > 0 for r in generate.values())
    loop = next(r for r in results["loop"]["records"] if r["bench"] == "loop")
    assert loop["tokens_per_s"] > 0 and loop["epoch"] == 1 and loop["stop_reason"] == ""
    assert loop["n_eval"] == gpu_check.LOOP_OVERRIDES["eval_max_samples"] and loop["adapter_written"]
    ratio = next(r for r in results["speedups"]["records"] if r["bench"] == "packing_ratio")
    assert ratio["packed_over_padded"] > 0 and abs(ratio["first_loss_packed_minus_padded"]) < 1e-4
    projection = results["projection"]
    assert projection["shape"] == "tiny" and projection["minutes"] > 0
    assert projection["train_tokens_per_s_zero2"] == train["deepspeed_zero2"]["tokens_per_s"]
