"""Padding-free packing (``packing``) against padded batches, and Liger's fallback without CUDA.

Packed and padded micro-batches of real encoded examples of the shipped sample corpus, chosen by
the training loop's own sampler, give the same loss and the same LoRA gradients; the loop's
integration test (torchrun, 2 processes) gives the same first-step loss with packing on.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from ray_mtup import dataset  # noqa: E402
from ray_mtup.config import TrainConfig  # noqa: E402
from ray_mtup.modeling import (PACKING_ATTENTION, WeightsSource, apply_lora, build_model,  # noqa: E402
                               build_tokenizer, effective_packing, liger_applied)
from ray_mtup.prompts import get_template  # noqa: E402
from ray_mtup.training import forward_loss, micro_batch, prepare_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 800}
LOSS_TOL = 1e-4
#: LoRA gradients: packed and padded sum the same terms in a different order (a longer row, other
#: matrix shapes, so other BLAS blockings, masked-out scores), which in fp32 moves each gradient by
#: ~2e-7 of the largest (measured); 1e-4 of the largest leaves room for that and still fails on
#: any real difference (a packed row attending across its sequences, as it does when the forward
#: keeps a cache, moves them by 30-60 % of the largest and the loss by ~4e-3).
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_run():
    cfg = TrainConfig(max_samples=60, per_device_batch_size=4, global_batch_size=4, tiny=SMALL,
                      lora={"r": 8, "alpha": 16, "dropout": 0.0})
    data, source, tok = prepare_data(cfg)
    return cfg, data, source, tok


def _micro_batches(cfg, data, n=4):
    sampler = dataset.LengthGroupedBatches([len(e) for e in data.train_encoded], cfg.per_device_batch_size,
                                           seed=cfg.seed)
    sampler.set_epoch(1)
    return [[data.train_encoded[i] for i in idx] for idx in list(sampler)[:n]]


def _lora_model(cfg, source, tok, attn):
    torch.manual_seed(0)
    model = apply_lora(build_model(source, cfg, tok), cfg.lora)
    model.get_base_model().config._attn_implementation = attn
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.train()
    return model


def _loss_and_grads(model, items, pad_id, packing):
    model.zero_grad()
    loss = forward_loss(model, micro_batch(items, pad_id, packing, on_gpu=False), torch.device("cpu"))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_lora_gradients(tiny_run, attn):
    cfg, data, source, tok = tiny_run
    model = _lora_model(cfg, source, tok, attn)
    batches = _micro_batches(cfg, data)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    for items in batches:
        packed = micro_batch(items, tok.pad_token_id, True, on_gpu=False)
        assert packed["input_ids"].shape == (1, sum(len(x) for x in items)) and "attention_mask" not in packed
        padded_loss, padded_grads = _loss_and_grads(model, items, tok.pad_token_id, packing=False)
        packed_loss, packed_grads = _loss_and_grads(model, items, tok.pad_token_id, packing=True)
        assert abs(packed_loss - padded_loss) <= LOSS_TOL, (attn, packed_loss, padded_loss)
        scale = max(float(g.abs().max()) for g in padded_grads.values())
        assert scale > 0 and all(float(g.abs().max()) > 0 for n, g in padded_grads.items() if "lora_A" in n)
        worst = max(float((packed_grads[n] - g).abs().max()) for n, g in padded_grads.items())
        assert worst <= GRAD_RTOL * scale, (attn, worst, scale)


def test_the_same_on_a_qwen_format_checkpoint(tiny_run, qwen_like_checkpoint):
    cfg, data, _, _ = tiny_run
    source = WeightsSource(str(qwen_like_checkpoint))
    tok = build_tokenizer(source)
    qcfg = TrainConfig(model="qwen2.5-1.5b", model_path=str(qwen_like_checkpoint), lora=cfg.lora.model_dump())
    encoded, _ = dataset.encode_all(tok, get_template(qcfg.template), data.train[:12], qcfg.max_seq_len)
    model = _lora_model(qcfg, source, tok, "sdpa")
    for start in (0, 4, 8):
        items = encoded[start:start + 4]
        padded, _ = _loss_and_grads(model, items, tok.pad_token_id, packing=False)
        packed, _ = _loss_and_grads(model, items, tok.pad_token_id, packing=True)
        assert abs(packed - padded) <= LOSS_TOL, (packed, padded)


def test_the_mean_is_over_the_same_label_tokens():
    items = [dataset.Encoded([5, 6, 7, 8], [-100, -100, 7, 8]), dataset.Encoded([9, 10, 11], [-100, 10, 11])]
    padded = dataset.collate(items, pad_id=0)
    packed = dataset.collate_packed(items)

    def targets(labels):  # what the causal-LM loss averages over: labels shifted left by one
        return sorted(int(x) for x in labels[:, 1:].flatten() if x != dataset.IGNORE_INDEX)

    assert targets(packed["labels"]) == targets(padded["labels"]) == [7, 8, 10, 11]


def test_an_attention_without_packed_positions_falls_back_to_padding_with_a_warning(caplog):
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flex_attention"))
    with caplog.at_level(logging.WARNING, logger="ray_mtup.modeling"):
        assert effective_packing(TrainConfig(packing=True), model) is False
    assert "packing" in caplog.text and "flex_attention" in caplog.text
    assert effective_packing(TrainConfig(packing=False), SimpleNamespace(config=SimpleNamespace(
        _attn_implementation="sdpa"))) is False
    assert all(effective_packing(TrainConfig(packing=True), SimpleNamespace(config=SimpleNamespace(
        _attn_implementation=a))) for a in PACKING_ATTENTION)


def test_liger_without_cuda_warns_and_builds_the_plain_model(tiny_run, caplog):
    cfg, data, source, tok = tiny_run
    before = type(build_model(source, cfg, tok)).forward
    with caplog.at_level(logging.WARNING, logger="ray_mtup.modeling"):
        model = build_model(source, cfg.replace(liger_kernel=True), tok, "cpu")
    assert "liger_kernel" in caplog.text and "no CUDA" in caplog.text
    assert not liger_applied(model) and not liger_applied(apply_lora(model, cfg.lora))
    assert "forward" not in vars(model) and type(model).forward is before  # nothing patched
    items = _micro_batches(cfg, data, 1)[0]
    assert torch.isfinite(forward_loss(model, micro_batch(items, tok.pad_token_id, False, False), "cpu"))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.integration
def test_the_loop_trains_packed_with_the_first_step_loss_of_padded(torchrun_runs):
    """torchrun, 2 processes, ZeRO-2: one optimizer step per run, so train_loss is the first step's
    (the runs ``padded`` and ``packed`` of conftest.py's ``torchrun_runs``)."""
    padded = _summary(torchrun_runs["padded"])["history"][0]
    packed = _summary(torchrun_runs["packed"])["history"][0]
    assert (padded["packing"], packed["packing"], packed["liger_kernel"]) == (False, True, False)  # no CUDA here
    assert abs(packed["train_loss"] - padded["train_loss"]) <= LOSS_TOL, (packed["train_loss"], padded["train_loss"])
    assert packed["useful_token_fraction"] == 1.0 > padded["useful_token_fraction"]
    assert packed["global_step"] == 1 and (torchrun_runs["packed"] / "adapter" / "adapter_model.safetensors").is_file()
    # the step trained the same adapter: the validation loss after it agrees too (padded in both)
    assert abs(packed["val_loss"] - padded["val_loss"]) <= 1e-3, (packed["val_loss"], padded["val_loss"])


@pytest.mark.integration
def test_bench_packing_prints_both_variants_with_equal_first_losses():
    from ray_mtup.config import SAMPLE_DATA_DIR

    cmd = [sys.executable, str(REPO / "bench" / "bench_packing.py"), "--model", "tiny", "--data-dir",
           str(SAMPLE_DATA_DIR), "--max-samples", "40", "--batches", "2", "--rounds", "1", "--lora-r", "8", "--liger"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    rows = {r["variant"]: r for r in lines if "variant" in r}
    assert set(rows) == {"padded", "packed"} and any("--liger skipped: no CUDA" in r.get("note", "") for r in lines)
    assert rows["packed"]["useful_token_fraction"] == 1.0 and rows["packed"]["real_tokens"] == rows["padded"]["real_tokens"]
    assert abs(rows["packed"]["first_loss"] - rows["padded"]["first_loss"]) <= LOSS_TOL
    ratio = next(r for r in lines if r["bench"] == "packing_ratio")
    assert ratio["packed_over_padded"] > 0
