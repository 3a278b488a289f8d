"""The step-2 stopping rule (:class:`ray_mtup.generation.Step2Closed`): O(1) per row per step,
and the same decisions as the whole-text rule (:func:`ray_mtup.generation.step2_closed`) that
it replaces, on token streams of the sample corpus cut by the tiny checkpoint's tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ray_mtup.config import SAMPLE_DATA_DIR
from ray_mtup.corpus import load_corpus
from ray_mtup.dataset import to_mtup
from ray_mtup.generation import Step2Closed, step2_closed
from ray_mtup.modeling import WeightsSource, build_tokenizer
from ray_mtup.prompts import TEMPLATES


@pytest.fixture(scope="module")
def tok(qwen_like_checkpoint: Path):
    return build_tokenizer(WeightsSource(str(qwen_like_checkpoint)))


def _streams(tok, template, n_random: int = 60) -> list[list[int]]:
    """Completions of the sample corpus (with run-on text after the graph, a quote holding a
    bracket, a marker written with odd blanks), and random splices of their tokens."""
    examples = to_mtup(load_corpus(SAMPLE_DATA_DIR))[:40]
    marker = template.step2_marker
    texts = []
    for ex in examples:
        texts.append(f"{ex.task1}{marker}{ex.task2}\nthêm chữ (x / y))")
        texts.append(f"{ex.task1}{marker.replace(' ', '   ')}" + ex.task2.replace("(", '(n / name :op1 "a(" ', 1))
        texts.append(f"{ex.task1}\n{ex.task2}")  # no marker: never closed
    streams = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rng = random.Random(0)
    pool = [t for s in streams for t in s]
    streams += [[rng.choice(pool) for _ in range(rng.randint(5, 80))] for _ in range(n_random)]
    return streams


def _run(rule: Step2Closed, tok, rows: list[list[int]], prompt: list[int]):
    """Feed ``rows`` column by column as transformers does (finished rows padded); per step the
    new rule's decisions, the whole-text rule's, and the characters the new rule decoded."""
    import torch

    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    finished = [False] * len(rows)
    ids = torch.tensor([prompt] * len(rows))
    trace = []
    for step in range(width):
        col = [pad if finished[i] or step >= len(r) else r[step] for i, r in enumerate(rows)]
        ids = torch.cat([ids, torch.tensor(col)[:, None]], dim=1)
        new = rule(ids, None).tolist()
        old = [step2_closed(t, rule.template) for t in tok.batch_decode(ids[:, len(prompt):], skip_special_tokens=True)]
        trace.append((step, [n for n, f in zip(new, finished) if not f], [o for o, f in zip(old, finished) if not f],
                      rule.decoded_chars))
        finished = [f or n for f, n in zip(finished, new)]
    return trace


@pytest.mark.parametrize("name", ["v2_natural", "v4_compact"])
def test_stopping_decisions_equal_the_whole_text_rule(tok, name):
    template = TEMPLATES[name]
    streams = _streams(tok, template)
    prompt = tok("câu:", add_special_tokens=False)["input_ids"]
    closed = 0
    for pos in range(0, len(streams), 16):
        rows = streams[pos:pos + 16]
        for step, new, old, _ in _run(Step2Closed(tok, template, len(prompt)), tok, rows, prompt):
            assert new == old, f"rows {pos}..: step {step}"
            closed += sum(new)
    assert closed > 0  # the streams do close graphs


def test_stopping_rule_decodes_only_new_tokens(tok):
    """The characters decoded per call do not grow with the step number (the whole-text rule
    decoded every row's whole suffix at every step)."""
    template = TEMPLATES["v4_compact"]
    prompt = tok("câu:", add_special_tokens=False)["input_ids"]
    body = tok("(đ / đi :agent (t / tôi) :mod (n / nhanh :degree (r / rất))) " * 12,
               add_special_tokens=False)["input_ids"]  # never closes: no marker
    rows = [body, body[5:] + body[:5]]
    trace = _run(Step2Closed(tok, template, len(prompt)), tok, rows, prompt)
    per_call = [chars for *_, chars in trace]
    longest_token = max(len(tok.decode([t])) for t in body)
    assert len(trace) > 300 and not any(any(new) for _, new, _, _ in trace)
    assert max(per_call) <= 2 * 2 * 4 * longest_token  # rows x (window + previous) x a few split tokens
    assert max(per_call[-50:]) <= max(per_call[:50])
