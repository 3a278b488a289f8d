"""Batched greedy generation of MTUP outputs, and their conversion to graphs.

Used by evaluation in the training loop (on every rank, each on its shard) and by
``predict``. Prompts are sorted by length so a batch pads little, each sequence stops at
EOS, and the KV cache is on. Under ZeRO-3 every rank must run the same number of forward
passes, so the caller passes ``synced_gpus=True`` and equal-sized shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import amr
from .prompts import Template, parse_generation, render_inference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parsed:
    """A generation split into both tasks and repaired into graphs (None when invalid)."""

    raw: str
    task1_graph: str | None
    task2_graph: str | None
    task2_repaired: bool


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    progress: bool = False,
    cache: str = "dynamic",
    template: Template | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (in input order), decoded without special tokens.

    ``cache="static"`` pre-allocates the KV cache, which lets transformers compile the decode
    step (worth it on a GPU; on CPU it is not, see docs/benchmarks.md). A ``template`` turns on
    constrained decoding (:mod:`ray_mtup.grammar`): step 1 free, then ``template``'s step-2
    marker and a well-formed PENMAN graph with fresh variables.
    """
    if not prompts:
        return []
    if template is not None:
        from .grammar import generate_constrained

        return generate_constrained(model, tokenizer, prompts, template, batch_size, max_new_tokens,
                                    synced_gpus=synced_gpus, progress=progress)
    return _generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, synced_gpus, progress,
                             cache)


def _generate_batches(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]], batch_size: int,
                      max_new_tokens: int, synced_gpus: bool = False, progress: bool = False,
                      cache: str = "dynamic", processor_factory: Callable[[int, int], Any] | None = None,
                      stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy, length-sorted batches of ``model.generate`` over prompts (texts or token ids).

    ``processor_factory(prompt_width, rows)`` makes each batch's ``logits_processor``; a row
    also stops after any of ``stop_strings``.
    """
    import torch

    device = next(model.parameters()).device
    encoded = [p if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", unit="batch")
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    try:
        for batch in iterator:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: generation continues at the right edge
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced_gpus,
                    **({"cache_implementation": "static"} if cache == "static" else {}),
                    **({"logits_processor": processor_factory(width, len(batch))} if processor_factory else {}),
                    **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
                )
            new = out[:, width:].cpu()
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def parse_outputs(template: Template, raw_outputs: Sequence[str]) -> list[Parsed]:
    """Split each generation into (task 1, task 2), repair both, restore task 1's variables."""
    parsed = []
    for raw in raw_outputs:
        task1, task2 = parse_generation(template, raw)
        r1 = amr.repair_task1(task1)
        r2 = amr.repair(task2)
        parsed.append(Parsed(raw, r1.graph if r1.valid else None, r2.graph if r2.valid else None,
                             r2.repaired))
    return parsed


def prompts_for(template: Template, sentences: Sequence[str],
                contexts: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[str]:
    """Inference prompts; ``contexts`` (one per sentence) are retrieved training pairs."""
    if contexts is None:
        return [render_inference(template, s) for s in sentences]
    return [render_inference(template, s, c) for s, c in zip(sentences, contexts, strict=True)]
