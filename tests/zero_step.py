"""Run by tests/test_devices.py under ``torchrun --nproc_per_node 2``: one optimizer step of the
engine in bf16 on DeepSpeed's CPU accelerator under ZeRO-2 and ZeRO-3 (gradient checkpointing
on), printing per stage the dtypes of the adapter's trainable weights, of the optimizer's master
copy, and the loss before and after the step, as one JSON line from rank 0."""

from __future__ import annotations

import json
import sys


def main(checkpoint: str) -> None:
    import torch

    from ray_mtup.config import TrainConfig
    from ray_mtup.engine import Schedule, build_engine
    from ray_mtup.modeling import WeightsSource, build_tokenizer

    source = WeightsSource(checkpoint)
    tok = build_tokenizer(source)
    out = {}
    for stage in (2, 3):
        cfg = TrainConfig(model="qwen2.5-1.5b", model_path=checkpoint, zero_stage=stage, per_device_batch_size=1,
                          global_batch_size=2, num_workers=2, gradient_checkpointing=stage == 3,
                          learning_rate=1e-2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
        engine, keep, _ = build_engine(cfg, source, tok, 2, False, Schedule(1, 1, 0), bf16=True)
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        dtypes = sorted({str(getattr(p, "ds_tensor", p).dtype) for p in trainable})
        groups = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or getattr(
            engine.optimizer, "fp32_partitioned_groups_flat", None) or []
        master = sorted({str(t.dtype) for t in groups})
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        engine.train()
        losses = []
        for _ in range(2):
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        out[stage] = {"trainable": dtypes, "master": master, "losses": losses}
        del engine, keep
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
