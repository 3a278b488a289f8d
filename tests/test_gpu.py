"""GPU checks (``gpu`` marker): run where CUDA is present, skipped with the reason elsewhere.

bf16 forward and backward through the DeepSpeed engine, generation on the device, and the
per-worker loop over NCCL with 2 processes when 2 GPUs exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def single_process_group(monkeypatch):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(key, value)


def test_bf16_step_through_the_deepspeed_engine(qwen_like_checkpoint, single_process_group):
    from ray_mtup.config import TrainConfig
    from ray_mtup.engine import Schedule, build_engine
    from ray_mtup.modeling import WeightsSource, build_tokenizer

    cfg = TrainConfig(model="qwen2.5-1.5b", model_path=str(qwen_like_checkpoint), use_gpu=True,
                      per_device_batch_size=2, global_batch_size=2, zero_stage=2)
    source = WeightsSource(str(qwen_like_checkpoint))
    tok = build_tokenizer(source)
    engine, _keep, _ = build_engine(cfg, source, tok, 1, True, Schedule(4, 4, 0))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, len(tok), (2, 32), device="cuda")
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


def test_generation_on_the_gpu(qwen_like_checkpoint):
    from ray_mtup.config import TrainConfig
    from ray_mtup.generation import generate, prompts_for
    from ray_mtup.modeling import WeightsSource, build_model, build_tokenizer
    from ray_mtup.prompts import get_template

    source = WeightsSource(str(qwen_like_checkpoint))
    tok = build_tokenizer(source)
    model = build_model(source, TrainConfig(), tok, "cuda").cuda()
    out = generate(model, tok, prompts_for(get_template("v2_natural"), ["tôi đi học ."] * 3), batch_size=3,
                   max_new_tokens=16)
    assert len(set(out.texts)) == 1 and all(1 <= n <= 16 for n in out.new_tokens)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL with 2 processes")
def test_the_loop_over_nccl_with_two_processes(qwen_like_checkpoint, tmp_path):
    from ray_mtup.config import resolve_config

    cfg = resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(qwen_like_checkpoint), "epochs": 1, "max_samples": 40, "num_workers": 2, "use_gpu": True,
        "per_device_batch_size": 4, "global_batch_size": 8, "eval_max_samples": 2, "max_new_tokens": 16})
    cfg.write_yaml(tmp_path / "run.yaml", "NCCL check")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "ray_mtup.worker", "--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "out"),
                           "--device", "gpu"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_liger_kernel_gives_the_loss_without_it(qwen_like_checkpoint):
    """Liger's fused linear cross-entropy and kernels (bf16) against the plain model on the same batch.

    The plain model runs first: Liger patches transformers' Qwen2 module for the whole process.
    """
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (extra `gpu`)")
    from ray_mtup.config import TrainConfig
    from ray_mtup.modeling import WeightsSource, build_model, build_tokenizer, liger_applied
    from ray_mtup.training import forward_loss, micro_batch
    from ray_mtup.dataset import Encoded

    source = WeightsSource(str(qwen_like_checkpoint))
    tok = build_tokenizer(source)
    g = torch.Generator().manual_seed(0)
    items = [Encoded(ids, [-100] * 8 + ids[8:]) for ids in
             (torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (40, 64, 23, 57))]
    losses = {}
    for liger in (False, True):
        cfg = TrainConfig(model="qwen2.5-1.5b", model_path=str(qwen_like_checkpoint), use_gpu=True,
                          liger_kernel=liger)
        model = build_model(source, cfg, tok, "cuda").cuda().train()
        assert liger_applied(model) == liger
        for packing in (False, True):
            losses[liger, packing] = float(forward_loss(model, micro_batch(items, tok.pad_token_id, packing, True),
                                                        "cuda"))
    # bf16 activations, logits chunked and reduced in another order: a few 1e-3 of a loss near ln(vocab)
    for packing in (False, True):
        assert abs(losses[True, packing] - losses[False, packing]) <= 2e-2 * losses[False, packing], losses
