"""After training: a single run's results on remote storage, and ``export`` of its merged model.

One ``run_tune.py --no-search`` run of the tiny model (1 epoch, 40 graphs of the sample corpus) with
``--storage-path file://...``: pyarrow treats it as remote storage, as it does s3://, so the run
directory is written locally and copied up. The export is loaded back with transformers'
``from_pretrained`` and must parse exactly as ``predict`` does from the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mtup.cli import main

REPO = Path(__file__).resolve().parents[1]
NAME = "exp1"
SENTENCES = ["tôi đi học .", "anh ấy đọc sách ở thư viện .", "con mèo ngủ trên ghế ."]
TINY = ["--set", "max_samples=40", "--set", "eval_max_samples=4", "--set", "max_new_tokens=48",
        "--set", "tiny.hidden_size=64", "--set", "tiny.num_layers=2", "--set", "tiny.num_heads=2",
        "--set", "tiny.intermediate_size=128", "--set", "tiny.vocab_size=600"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    work, bucket = root / "work", root / "bucket"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "run_tune.py"), "--model", "tiny", "--preset", "quick_test",
                           "--no-search", *TINY, "--storage-path", f"file://{bucket}", "--name", NAME],
                          cwd=work, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"local": work / "runs" / NAME, "remote": bucket / NAME, "uri": f"file://{bucket}/{NAME}",
            "stdout": proc.stdout}


@pytest.mark.integration
def test_single_run_copies_its_run_directory_to_the_storage_path(single_run):
    local, remote = single_run["local"], single_run["remote"]
    for name in ("config.yaml", "metrics.csv", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/README.md", "adapter/trainer_state.json"):
        assert (remote / name).is_file(), f"{name} was not copied to the storage path"
        assert (remote / name).read_bytes() == (local / name).read_bytes()
    assert list(remote.glob("checkpoint_*")), "Ray Train's checkpoints are beside the run's files"
    assert f"results: {single_run['uri']} (" in single_run["stdout"]
    # the adapter's card is the project's, with the test figure of summary.json, not peft's blank template
    card = (remote / "adapter" / "README.md").read_text(encoding="utf-8")
    summary = json.loads((remote / "summary.json").read_text(encoding="utf-8"))
    assert "More Information Needed" not in card and "# Vietnamese AMR parser (MTUP)" in card
    assert f"| {summary['test']['task2_f1']:.4f} | {summary['test']['ci95'][0]:.4f} - " in card
    assert "sample corpus" in card and "say nothing about Vietnamese AMR" in card


@pytest.mark.integration
def test_export_of_a_single_run_loads_in_transformers_and_parses_like_predict(single_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ray_mtup.config import TrainConfig, load_yaml
    from ray_mtup.generation import generate, prompts_for
    from ray_mtup.predict import parse_sentences, predict_file, write_parses
    from ray_mtup.prompts import get_template

    run, out = single_run["remote"], tmp_path / "merged"
    assert main(["export", "--run", str(run), "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # DeepSpeed's import logs to stdout
    assert report["adapter"] == str(run / "adapter") and report["dtype"] == "float32"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "ray_mtup_config.yaml"} <= set(report["files"])
    assert not (out / "adapter_config.json").exists() and not list(out.glob("*.bin")), "a plain, merged model"

    model = AutoModelForCausalLM.from_pretrained(out)  # no peft, no ray_mtup
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = TrainConfig.from_dict(load_yaml(out / "ray_mtup_config.yaml"))
    decoding = GenerationConfig.from_pretrained(out)
    assert (decoding.do_sample, decoding.num_beams, decoding.repetition_penalty) == (False, 1, 1.0)
    assert decoding.max_new_tokens == cfg.max_new_tokens == 48
    eos = decoding.eos_token_id  # the tokenizer's EOS, with the chat template's end of turn where it differs
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    # the LoRA update is in the weights: they differ from the base checkpoint the run trained on
    state = json.loads((run / "adapter" / "trainer_state.json").read_text(encoding="utf-8"))
    base = AutoModelForCausalLM.from_pretrained(state["base_source"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])

    sentences = tmp_path / "in.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    predict_file(run, sentences, tmp_path / "predict.txt", batch_size=2)
    graphs = parse_sentences(model, tokenizer, cfg, SENTENCES, batch_size=2, progress=False).graphs
    write_parses(tmp_path / "exported.txt", SENTENCES, graphs, "space")
    assert (tmp_path / "exported.txt").read_text(encoding="utf-8") == (tmp_path / "predict.txt").read_text(
        encoding="utf-8")
    # plain model.generate with the exported generation_config.json decodes as the project does (which
    # also stops a row once its step-2 graph has closed: its text is a prefix of the plain one)
    template = get_template(cfg.template)
    prompt = prompts_for(template, SENTENCES[:1])[0]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    plain = tokenizer.decode(model.generate(**ids)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    ours = generate(model, tokenizer, [prompt], 1, cfg.max_new_tokens, stop_template=template).texts[0]
    assert plain.startswith(ours) and ours

    card = (out / "README.md").read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert "library_name: transformers" in card and state["base_source"] in card
    assert f"| {summary['test']['task2_f1']:.4f} | {summary['test']['ci95'][0]:.4f} - " in card
    # a single run's summary has no validation interval: it is measured from the saved predictions
    validation = next(line for line in card.splitlines() if line.startswith("| validation"))
    assert f"| {summary['best']['task2_f1']:.4f} | " in validation and " - " in validation


def test_export_refuses_a_non_empty_output_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(tmp_path / "no-such-run"), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: output: {out} exists and is not an empty directory; " \
                                              "choose a new one"
    assert (out / "keep.txt").read_text() == "mine"


def test_export_of_a_directory_without_an_adapter_is_an_error(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "no adapter found in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
