"""Bad input is reported, never half-run: corpora, flags, search spaces, storage; and security.

Every user mistake must fail *before Ray starts any trial*, with exit code 2 and a message
that names the file and line (corpus) or the config field (flags, YAML). The launcher tests
call :func:`ray_mtup.launcher.main` in-process with ``start_ray`` replaced by a tripwire, so
"before Ray starts" is checked, not assumed; a few go through ``python run_tune.py`` to pin
the real exit code and stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MALFORMED_CORPORA

from ray_mtup import launcher, search
from ray_mtup.config import SEARCH_SPACES, TrainConfig, packaged_yaml
from ray_mtup.corpus import find_duplicate_sentences, load_corpus, read_amr_file
from ray_mtup.corpus import normalise_sentence
from ray_mtup.dataset import select_and_split
from ray_mtup.errors import ConfigError, CorpusError
from ray_mtup.dataset import load_examples

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_mtup"


class RayStarted(Exception):
    """Raised by the tripwire that replaces launcher.start_ray."""


@pytest.fixture
def no_ray(monkeypatch):
    """launcher.start_ray raises RayStarted: reaching it means every check before it passed."""
    calls = []

    def tripwire(address):
        calls.append(address)
        raise RayStarted(address)

    monkeypatch.setattr(launcher, "start_ray", tripwire)
    return calls


def run_main(argv, capsys):
    """(exit code, stderr) of launcher.main; argparse errors (SystemExit) count as exit codes."""
    try:
        code = launcher.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def corpus_dir(tmp_path: Path, first: Path | str, second: Path | None = None) -> Path:
    """A corpus directory whose train_amr_1.txt is ``first`` (a path, or literal text)."""
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    target = d / "train_amr_1.txt"
    if isinstance(first, Path):
        shutil.copyfile(first, target)
    else:
        target.write_text(first, encoding="utf-8")
    shutil.copyfile(second or (REPO / "tests/fixtures/mini_amr.txt"), d / "train_amr_2.txt")
    return d


# --- corpus files, read directly -----------------------------------------------------------

BAD_CORPORA = MALFORMED_CORPORA  # the reader's own tests of these are in test_corpus.py
GOOD_CORPORA = ["bom_crlf_ok.txt", "mixed_newlines_ok.txt", "duplicates_ok.txt"]


def test_crlf_lf_cr_mix_and_bom_accepted(fixtures_dir, tmp_path):
    raw = (fixtures_dir / "bad" / "mixed_newlines_ok.txt").read_bytes()
    assert b"\r\n" in raw and b"\r\r\n" in raw and re.search(rb"[^\r]\n", raw)  # the fixture really mixes
    examples = read_amr_file(fixtures_dir / "bad" / "mixed_newlines_ok.txt")
    assert all("\r" not in e.amr for e in examples)
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf#::snt t\xc3\xb4i .\r\n(t / t\xc3\xb4i)\n")
    (example,) = read_amr_file(path)
    assert (example.sentence, example.amr, example.line) == ("tôi .", "(t / tôi)", 1)


def test_duplicates_accepted_and_kept_on_one_side_of_the_split(fixtures_dir, tmp_path):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / "duplicates_ok.txt")
    examples = load_corpus(d)
    dups = find_duplicate_sentences(examples)
    assert sorted(dups["trời mưa ."]) == ["train_amr_1:1", "train_amr_1:3", "train_amr_1:5"]
    assert "hôm nay trời mưa to ." in dups  # mini_amr.txt's own duplicate
    for seed in range(20):
        for val_split in (0.1, 0.3, 0.5):
            train, val = select_and_split(examples, val_split, seed)
            assert len(train) + len(val) == len(examples)
            assert not ({normalise_sentence(e.sentence) for e in train} & {normalise_sentence(e.sentence) for e in val})


def test_sentence_only_file_where_graphs_are_expected(fixtures_dir, tmp_path):
    d = corpus_dir(tmp_path, fixtures_dir / "mini_sentences.txt")
    with pytest.raises(CorpusError, match=r"train_amr_1\.txt:1: looks like a sentence-only file"):
        load_corpus(d)


@pytest.mark.parametrize(("name", "line", "reason"), BAD_CORPORA)
def test_load_examples_names_file_and_line(fixtures_dir, tmp_path, name, line, reason):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / name)
    with pytest.raises(CorpusError) as info:
        load_examples(TrainConfig(data_dir=str(d)))
    assert f"{d / 'train_amr_1.txt'}:{line}:" in str(info.value) and reason in str(info.value)


def test_graph_that_penman_cannot_decode_names_file_and_line(tmp_path):
    # balanced parentheses (passes the reader) but not a graph: the normalisation in
    # load_examples must still name the file and the block's line
    d = corpus_dir(tmp_path, "#::snt a .\n(a / b)\n\n#::snt c .\n(c / d :ARG0 / x)\n")
    with pytest.raises(CorpusError) as info:
        load_examples(TrainConfig(data_dir=str(d), val_split=0.5))
    assert "train_amr_1.txt:4:" in str(info.value)


# --- corpus files, through the launcher ------------------------------------------------------


@pytest.mark.parametrize(("name", "line", "reason"), BAD_CORPORA)
def test_launcher_rejects_bad_corpus_before_ray(fixtures_dir, tmp_path, capsys, no_ray, name, line, reason):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / name)
    code, err = run_main(["--no-search", "--data-dir", str(d), "--storage-path", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err.startswith("error: ")
    assert f"train_amr_1.txt:{line}:" in err and reason in err
    assert not no_ray


@pytest.mark.parametrize("name", ["no_snt.txt", "bad_utf8.txt"])
def test_search_rejects_bad_corpus_before_ray(fixtures_dir, tmp_path, capsys, no_ray, name):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / name)
    code, err = run_main(["--smoke-test", "--data-dir", str(d), "--storage-path", str(tmp_path / "runs")], capsys)
    assert code == 2 and "train_amr_1.txt:" in err
    assert not no_ray


@pytest.mark.parametrize("name", GOOD_CORPORA)
def test_launcher_accepts_good_corpora(fixtures_dir, tmp_path, capsys, no_ray, name):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / name)
    with pytest.raises(RayStarted):  # every check passed: Ray would start now
        launcher.main(["--no-search", "--data-dir", str(d), "--storage-path", str(tmp_path / "runs")])
    assert len(no_ray) == 1


def test_run_tune_script_bad_corpus_exit_2_without_traceback(fixtures_dir, tmp_path):
    d = corpus_dir(tmp_path, fixtures_dir / "bad" / "unbalanced.txt")
    proc = subprocess.run(
        [sys.executable, "run_tune.py", "--no-search", "--data-dir", str(d), "--storage-path", str(tmp_path / "r")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{d / 'train_amr_1.txt'}:6: unbalanced parentheses" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


# --- configuration and flags -----------------------------------------------------------------

CONFIG_ERRORS = [  # (flags, the field the message must name)
    (["--set", "learning_rate=0"], "learning_rate"),
    (["--set", "learning_rate=-1e-4"], "learning_rate"),
    (["--set", "epochs=0"], "epochs"),
    (["--set", "epochs=-3"], "epochs"),
    (["--zero-stage", "1"], "zero_stage"),
    (["--zero-stage", "4"], "zero_stage"),
    (["--set", "zero_stage=0"], "zero_stage"),
    (["--zero-stage", "fast"], "zero_stage: must be 2, 3 or auto"),
    (["--set", "per_device_batch_size=0"], "per_device_batch_size: must be an integer >= 1 or auto"),
    (["--set", "per_device_batch_size=big"], "per_device_batch_size"),
    (["--model-path", "/nonexistent/qwen"], "model_path"),
    (["--set", "no_such_field=1"], "no_such_field"),
    (["--set", "lora.r=0"], "lora.r"),
    (["--set", "lora.rank=8"], "lora.rank"),
    (["--set", "val_split=1.5"], "val_split"),
    (["--set", "template=v9"], "template"),
    (["--set", "inject_fault=boom@x"], "inject_fault"),
    (["--set", "max_new_tokens"], "max_new_tokens"),  # no '='
    (["--set", "lora.target_modules=q_prj"], "lora.target_modules: unknown module 'q_prj'"),
    (["--set", "lora.target_modules=[]"], "lora.target_modules: must not be empty"),
    (["--set", "global_batch_size=10"], "global_batch_size: 10 is not a multiple"),  # smoke: 4 per device
    (["--set", "epochs=many"], "epochs: expected an integer, got 'many'"),
    (["--preset", "no_such_preset"], "preset: unknown name 'no_such_preset'"),
    (["--cpus-per-worker", "0"], "cpus_per_worker"),
    (["--gpus-per-trial", "3", "--workers-per-trial", "2"], "gpus_per_trial"),
    (["--num-samples", "0"], "num_samples"),
    (["--resume"], "name"),
    (["--config", "/nonexistent/best_config.yaml"], "/nonexistent/best_config.yaml"),
    (["--search-space", "/nonexistent/space.yaml"], "/nonexistent/space.yaml"),
]


@pytest.mark.parametrize(("flags", "field"), CONFIG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_flag_exit_2_names_field_before_ray(tmp_path, capsys, no_ray, flags, field):
    code, err = run_main(["--model", "tiny", "--smoke-test", "--storage-path", str(tmp_path / "r"), *flags], capsys)
    assert code == 2
    assert err.startswith("error: ") and field in err, err
    assert not no_ray


def test_one_target_module_from_the_command_line(tmp_path, monkeypatch, no_ray):
    """``--set lora.target_modules=q_proj`` is one module, not the characters of its name."""
    seen = {}

    def fake_run_search(base, space, settings):
        seen["cfg"] = base
        raise RayStarted("search")

    monkeypatch.setattr(launcher, "start_ray", lambda address: None)
    monkeypatch.setattr(search, "run_search", fake_run_search)
    with pytest.raises(RayStarted):
        launcher.main(["--smoke-test", "--storage-path", str(tmp_path / "r"), "--set", "lora.target_modules=q_proj"])
    assert seen["cfg"].lora.target_modules == ("q_proj",)


def test_unknown_model_is_usage_error(tmp_path, capsys, no_ray):
    code, err = run_main(["--model", "qwen9-1t", "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "model: unknown model 'qwen9-1t'" in err and "qwen2.5-7b" in err and "hub id" in err
    assert not no_ray


def test_unknown_model_in_config_file(tmp_path, capsys, no_ray):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: llama-70b\n", encoding="utf-8")
    code, err = run_main(["--no-search", "--config", str(cfg), "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2 and "model: unknown model 'llama-70b'" in err
    assert not no_ray


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


SPACE_ERRORS = [  # (YAML, the key the message must name)
    ("params:\n  learning_rate: {type: loguniform, low: 1.0e-3, high: 1.0e-4}\n", "params.learning_rate"),
    ("params:\n  epochs: {type: randint, low: 5, high: 2}\n", "params.epochs"),
    ("params:\n  learning_rate: {type: loguniform, low: 0, high: 1.0e-3}\n", "params.learning_rate.low"),
    ("params:\n  batch_size: {type: choice, values: [4, 8]}\n", "params.batch_size"),
    ("params:\n  learning_rate: {type: loguniform, lo: 1.0e-4, high: 1.0e-3}\n", "params.learning_rate.lo"),
    ("params:\n  learning_rate: {type: gaussian, low: 1.0e-4, high: 1.0e-3}\n", "params.learning_rate.type"),
    ("params:\n  template: {type: choice, values: [v2_natural, v7_poetic]}\n", "params.template.values"),
    ("params:\n  lora_r: {type: choice, values: []}\n", "params.lora_r.values"),
    ("params:\n  learning_rate: {type: uniform, low: abc, high: 1}\n", "params.learning_rate.low"),
    ("params:\n  lora_r: {type: choice, values: [8]}\nsearch_alg: random\n", "search_alg"),
    ("params:\n  lora_r: {type: choice, values: [8]}\noverrides: {batch: 4}\n", "batch"),
    ("params:\n  lora_r: {type: choice, values: [8]}\noverrides: {epochs: 0}\n", "epochs"),
    ("params:\n  lora_r: {type: choice, values: [8]}\nreduction_factor: 1\n", "reduction_factor"),
    ("params:\n  lora_r: {type: choice, values: [8]}\ngrace_period: 0\n", "grace_period"),
    ("params: {}\n", "params"),
    ("- not a mapping\n", "space.yaml"),
    ("params: [unclosed\n", "space.yaml"),
]


@pytest.mark.parametrize(("text", "key"), SPACE_ERRORS)
def test_bad_search_space_exit_2_names_key(tmp_path, capsys, no_ray, text, key):
    code, err = run_main(["--search-space", _space(tmp_path, text), "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.startswith("error: ") and key in err, err
    assert not no_ray


def test_more_gpus_than_cluster_no_search(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "start_ray", lambda address: None)
    monkeypatch.setattr(launcher, "_cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr("ray_mtup.trial.run_single", lambda *a, **k: pytest.fail("a run started"))
    code, err = run_main(["--no-search", "--gpus-per-trial", "2", "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "gpus_per_trial: one trial needs 2 GPU(s)" in err


@pytest.mark.parametrize("flags", [["--resume", "--name", "x"], ["--num-samples", "4"], ["--search-space", "smoke"],
                                   ["--smoke-test"]])
def test_search_only_flags_are_errors_with_no_search(flags, tmp_path, capsys, no_ray):
    code, err = run_main(["--no-search", *flags, "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2 and not no_ray
    assert err.startswith(f"error: {flags[0]}: applies to a search only") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written either


def test_tracker_applies_to_a_single_run(tmp_path, capsys, no_ray):
    """--tracker is no search-only flag: a single run is tracked too (the run starts)."""
    with pytest.raises(RayStarted):
        launcher.main(["--no-search", "--tracker", "tensorboard", "--storage-path", str(tmp_path / "r")])
    code, err = run_main(["--no-search", "--tracker", "neptune", "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2 and "invalid choice: 'neptune'" in err


def test_more_gpus_than_cluster_search(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(launcher, "start_ray", lambda address: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    code, err = run_main(["--smoke-test", "--gpus-per-trial", "2", "--set", "global_batch_size=16",
                          "--storage-path", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "gpus_per_trial: one trial needs 2 GPU(s)" in err
    assert not list((tmp_path / "r").glob("*/trial_*"))


def test_check_resources_counts():
    assert search.check_resources({"CPU": 2.0}, TrainConfig(num_workers=2, cpus_per_worker=0.95)) == 1
    with pytest.raises(ConfigError, match="workers_per_trial"):
        search.check_resources({"CPU": 2.0}, TrainConfig(num_workers=3, cpus_per_worker=0.95, global_batch_size=12))
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        search.check_resources({"CPU": 64.0, "GPU": 1.0}, TrainConfig(num_workers=2, use_gpu=True))


def test_flags_win_over_search_space_overrides(tmp_path, monkeypatch, no_ray):
    """The smoke space fixes max_new_tokens=96 and cpus_per_worker=0.95; flags must still win."""
    seen = {}

    def fake_run_search(base, space, settings):
        seen["cfg"] = base  # what run_search hands its trials (they add only their sampled values)
        raise RayStarted("search")

    monkeypatch.setattr(launcher, "start_ray", lambda address: None)
    monkeypatch.setattr(search, "run_search", fake_run_search)
    with pytest.raises(RayStarted):
        launcher.main(["--smoke-test", "--storage-path", str(tmp_path / "r"), "--cpus-per-worker", "0.5",
                       "--set", "max_new_tokens=16", "--set", "tiny.hidden_size=32"])
    cfg = seen["cfg"]
    assert (cfg.max_new_tokens, cfg.cpus_per_worker, cfg.tiny.hidden_size) == (16, 0.5, 32)
    fixed = search.load_search_space(packaged_yaml(SEARCH_SPACES, launcher.SMOKE_SPACE)).overrides
    # the space's other overrides stay
    assert (cfg.eval_max_samples, cfg.tiny.num_layers) == (fixed["eval_max_samples"], fixed["tiny"]["num_layers"])


# --- storage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["under_a_file", "proc"])
def test_unwritable_storage_exit_2_names_storage_path(tmp_path, capsys, no_ray, kind):
    if kind == "under_a_file":  # tests run as root: chmod would not stop mkdir, a file in the path does
        (tmp_path / "plain_file").write_text("x")
        storage = str(tmp_path / "plain_file" / "runs")
    else:
        storage = "/proc/ray_mtup_runs"  # procfs: mkdir fails even for root
    code, err = run_main(["--smoke-test", "--storage-path", storage], capsys)
    assert code == 2
    assert err.startswith("error: storage_path: ") and storage in err
    assert not no_ray


# --- security --------------------------------------------------------------------------------

UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
    (re.compile(r"\bjoblib\.load\("), "joblib.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\bUnpickler\("), "Unpickler"),
]


def _calls(source: str, name: str) -> list[str]:
    """The argument text of every ``name(`` call in ``source`` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[m.end(): i - 1])
    return out


def test_library_never_unpickles():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            assert not pattern.search(text), f"{path}: {what}"
        for args in _calls(text, "torch.load"):
            assert re.search(r"weights_only\s*=\s*True", args), f"{path}: torch.load({args}) without weights_only=True"
    # the resume path reads safetensors
    assert "load_file(" in (PACKAGE / "checkpointing.py").read_text(encoding="utf-8")


def _tiny_cfg() -> TrainConfig:
    return TrainConfig(model="tiny", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                          "intermediate_size": 64, "vocab_size": 300},
                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})


@pytest.fixture
def saved_adapter(tmp_path):
    """A checkpoint directory written by checkpointing.save_checkpoint for a tiny model."""
    import torch

    from ray_mtup import checkpointing
    from ray_mtup.modeling import WeightsSource, apply_lora, build_model, build_tokenizer, write_tiny_checkpoint

    cfg = _tiny_cfg()
    source = WeightsSource(str(write_tiny_checkpoint(cfg.tiny, 0, ["tôi đi học", "(m / muốn :agent (t / tôi))"] * 20,
                                                     cache_dir=tmp_path)))
    tok = build_tokenizer(source)
    model = apply_lora(build_model(source, cfg, tok, "cpu"), cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)  # LoRA B starts at zero: make the weights distinguishable
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"epoch": 3, "global_step": 9, "history": [{"epoch": e} for e in (1, 2, 3)], "config": cfg.to_dict()}
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    checkpointing.save_checkpoint(ckpt, model, tok, state, weights, [])
    return SimpleNamespace(cfg=cfg, tokenizer=tok, weights=weights, dir=ckpt, source=source)


def _forbid_pickle(monkeypatch):
    import pickle

    import torch

    def boom(*args, **kwargs):
        raise AssertionError("a checkpoint load went through pickle")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)


def test_saved_adapter_is_safetensors_only(saved_adapter):
    names = {p.name for p in saved_adapter.dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], names


def test_resume_state_loads_without_pickle(saved_adapter, monkeypatch):
    import torch

    from ray_mtup import checkpointing
    from ray_mtup.modeling import apply_lora, build_model

    torch.manual_seed(1)
    model = apply_lora(build_model(saved_adapter.source, saved_adapter.cfg, saved_adapter.tokenizer, "cpu"),
                       saved_adapter.cfg.lora)
    _forbid_pickle(monkeypatch)
    state = checkpointing.load_resume_state(model, [saved_adapter.dir])
    assert (state["epoch"], state["global_step"]) == (3, 9)
    loaded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.keys() == saved_adapter.weights.keys()
    for n, w in saved_adapter.weights.items():
        assert torch.equal(loaded[n], w), n


def test_load_adapter_without_pickle(saved_adapter, monkeypatch):
    import torch

    from ray_mtup.modeling import build_model, load_adapter

    base = build_model(saved_adapter.source, saved_adapter.cfg, saved_adapter.tokenizer, "cpu")
    _forbid_pickle(monkeypatch)
    model = load_adapter(base, saved_adapter.dir)
    params = dict(model.named_parameters())
    for n, w in saved_adapter.weights.items():
        assert torch.equal(params[n], w), n


def test_embedded_ray_dashboard_on_loopback(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    launcher.start_ray(None)
    (kwargs,) = calls
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs.get("include_dashboard") is True  # the dashboard runs (it cleans up placement groups)
    assert kwargs["address"] == "local"  # a new instance, never a `ray start` cluster found on the machine
    # Ray's own State-API clients (Train's PlacementGroupCleaner) must find this instance, not another
    assert re.fullmatch(r"127\.0\.0\.1:\d+", kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"])
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # set only while Ray starts
    calls.clear()
    launcher.start_ray("127.0.0.1:6379")
    assert calls[0]["address"] == "127.0.0.1:6379" and "dashboard_host" not in calls[0]


def test_wrapping_and_loading_an_adapter_raise_no_future_warning(saved_adapter):
    """LoRA wrapping (with and without gradient checkpointing) and adapter loading raise no
    FutureWarning: transformers 5's is_gradient_checkpointing deprecation stays out of make demo."""
    import warnings

    from ray_mtup.modeling import apply_lora, build_model, load_adapter

    a = saved_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for cfg in (a.cfg, a.cfg.replace(gradient_checkpointing=True)):
            model = apply_lora(build_model(a.source, cfg, a.tokenizer, "cpu"), cfg.lora)
            assert any(p.requires_grad for p in model.parameters())
        assert load_adapter(build_model(a.source, a.cfg, a.tokenizer, "cpu"), a.dir) is not None
