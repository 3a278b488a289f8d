"""bench/gpu_check.sh (the one-shot GPU check) in its CPU tiny mode, and its helpers."""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402


STEPS = ("imports", "train", "generate", "checkpoint", "loop", "replica", "resume", "speedups")


def _run_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the check in tiny CPU mode with ``$OUT`` set, as on the GPU machine; its results come
    from ``$OUT/gpu_check.json``."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    full_env = {**os.environ, "GPU_CHECK_SHAPE": "tiny", "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SKIP_INSTALL": "1",
                "GPU_CHECK_PYTHON": sys.executable, "OUT": str(out),
                "GPU_CHECK_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": str(os.cpu_count() or 1), **env}
    full_env.pop("GPU_CHECK_RESULTS", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=full_env, capture_output=True,
                          text=True, timeout=900)
    return done, json.loads((out / "gpu_check.json").read_text())


def _wheel(folder: Path, name: str, version: str, real: bool) -> None:
    """A wheel file of ``name`` ``version``: a valid one holding only its metadata (``real``), or an
    empty file standing for a distribution this venv has at that version (never installed)."""
    dist = re.sub(r"[-_.]+", "_", name)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    if not real:
        path.write_bytes(b"")
        return
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _complete_wheels(folder: Path) -> Path:
    """A wheels folder with every required distribution and its MANIFEST: those this venv has, at
    its version (nothing to install), the others as metadata-only wheels (installed)."""
    folder.mkdir()
    lines = []
    for name in gpu_check.REQUIRED_WHEELS:
        version, real = (_version(name), False) if _version(name) else ("0.0.1", True)
        _wheel(folder, name, version, real)
        lines.append(f"{re.sub(r'[-_.]+', '_', name)}=={version}")
    (folder / gpu_check.MANIFEST).write_text("\n".join(lines) + "\n")
    return folder


def test_helpers_doctests():
    assert doctest.testmod(gpu_check, optionflags=doctest.ELLIPSIS).failed == 0


def test_a_step_past_the_budget_is_recorded_as_an_error_and_the_check_goes_on(tmp_path):
    done, results = _run_check(tmp_path, GPU_CHECK_BUDGET_S="3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]
    for step in STEPS:
        assert results[step]["rc"] == 124
        assert "no time left" in results[step]["error"]
        assert results[step]["records"] == []
    assert results["env"]["shape"] == "tiny" and results["env"]["torch"]
    assert results["projection"]["targets_met"] == dict.fromkeys(gpu_check.TARGETS)


def test_the_gpu_caps_add_up_to_at_most_420_s():
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    caps = re.findall(r"^\s*CAPS=\((.*)\)", script, re.M)
    assert len(caps) == 2  # the tiny (CPU test) line, then the GPU line
    gpu = {k: int(v) for k, v in (kv.split("=") for kv in caps[1].split())}
    assert set(gpu) == {"install", *STEPS} and sum(gpu.values()) <= 420


def test_missing_wheels_fail_the_install_step_naming_the_folder(tmp_path):
    done, results = _run_check(tmp_path, GPU_CHECK_SKIP_INSTALL="0", GPU_CHECK_STEPS="install",
                               GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert results["install"]["rc"] == 1
    assert f"{tmp_path / 'no_wheels'} is missing" in results["install"]["error"]
    assert "bench/build_wheels.sh" in results["install"]["error"]
    assert "is missing" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert set(results) == {"env", "install", "projection"}  # GPU_CHECK_STEPS ran only the install


def test_an_incomplete_wheels_folder_names_what_is_missing(tmp_path):
    folder = _complete_wheels(tmp_path / "wheels")
    assert gpu_check.missing_wheels(folder) == []
    next(folder.glob("liger_kernel-*.whl")).unlink()
    manifest = (folder / gpu_check.MANIFEST).read_text().splitlines()
    (folder / gpu_check.MANIFEST).write_text("\n".join(m for m in manifest if not m.startswith("smatch=")) + "\n")
    problems = gpu_check.missing_wheels(folder)
    assert problems == [f"liger-kernel==0.0.1: no wheel in {folder}", f"smatch: not in {folder / 'MANIFEST'}"]
    (folder / gpu_check.MANIFEST).unlink()
    assert gpu_check.missing_wheels(folder) == [f"{folder / 'MANIFEST'} is missing: {folder} was not filled by "
                                                "bench/build_wheels.sh"]


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
def test_gpu_check_cpu_tiny_mode_returns_every_step_under_out(tmp_path):
    wheels = _complete_wheels(tmp_path / "wheels")
    done, results = _run_check(tmp_path, GPU_CHECK_SKIP_INSTALL="0", GPU_CHECK_WHEELS=str(wheels))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]
    for step in ("install", *STEPS):
        assert results[step]["rc"] == 0 and "error" not in results[step], (step, results[step].get("error"))
    install = results["install"]["records"][0]
    lacking = [n for n in gpu_check.REQUIRED_WHEELS if _version(n) is None]  # this venv's missing ones
    assert install["installed"] == sorted(f"{re.sub(r'[-_.]+', '_', n)}-0.0.1-py3-none-any.whl" for n in lacking)
    assert "deepspeed" in install["already_present"]
    assert results["imports"]["records"][0]["ray_imported"] is False
    train = {r["variant"]: r for r in results["train"]["records"] if r["bench"] == "train_micro_batch"}
    assert set(train) == {"micro_auto", "plain_peft"}
    assert train["micro_auto"]["zero_stage"] in (2, 3) and train["micro_auto"]["micro"] * train["micro_auto"]["accum"] == 4
    assert all(r["tokens_per_s"] > 0 for r in train.values())
    generate = {r["variant"]: r for r in results["generate"]["records"] if r["bench"] == "generate"}
    assert set(generate) == {"hf_default", "project"} and all(r["real_lengths"] for r in generate.values())
    assert generate["project"]["new_tokens"] == generate["hf_default"]["new_tokens"]  # every row ends at its length
    loop = next(r for r in results["loop"]["records"] if r["bench"] == "loop")
    assert loop["tokens_per_s"] > 0 and loop["epoch"] == 1 and loop["stop_reason"] == ""
    assert loop["n_eval"] == gpu_check.LOOP_OVERRIDES["eval_max_samples"] and loop["adapter_written"]
    for option in ("zero_stage", "micro_batch_size", "grad_accum", "packing", "liger_kernel", "eval_generation",
                   "attn_implementation"):
        assert loop[option] is not None, option
    assert loop["requested"]["zero_stage"] == "auto" and loop["requested"]["packing"] is True
    replica = next(r for r in results["replica"]["records"] if r["bench"] == "loop")  # 2 gloo ranks
    assert (replica["zero_stage"], replica["eval_generation"], replica["world_size"]) == (3, "replica", 2)
    assert replica["epochs_recorded"] == [1]
    resume = next(r for r in results["resume"]["records"] if r["bench"] == "loop")
    assert resume["epochs_recorded"] == [1, 2] and resume["resumed_from_epoch"] == 1
    ratio = next(r for r in results["speedups"]["records"] if r["bench"] == "packing_ratio")
    assert ratio["packed_over_padded"] > 0 and abs(ratio["first_loss_packed_minus_padded"]) < 1e-4
    projection = results["projection"]
    assert projection["shape"] == "tiny" and projection["minutes"] > 0
    assert projection["train_tokens_per_s_planned"] == train["micro_auto"]["tokens_per_s"]
    assert projection["arithmetic"].endswith(f"= {projection['minutes']:.2f} min")
