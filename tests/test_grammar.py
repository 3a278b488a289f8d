"""Grammar-constrained step-2 decoding: the grammar admits the corpus, the decoder emits only valid graphs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import penman
import pytest

from ray_mtup import generation, grammar
from ray_mtup.config import TrainConfig
from ray_mtup.generation import generate, prompts_for
from ray_mtup.modeling import base_source, build_model, build_tokenizer
from ray_mtup.prompts import get_template, parse_generation
from ray_mtup.dataset import load_examples, tokenizer_texts, with_retrieval

REPO = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 600}


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model, its tokenizer and the sample corpus split (k = 1 neighbour)."""
    cfg = TrainConfig(tiny=SMALL, retrieval_k=1, seed=3)
    train, val = with_retrieval(cfg, *load_examples(cfg)[:2])
    source = base_source(cfg, tokenizer_texts(train))
    tok = build_tokenizer(source)
    return build_model(source, cfg, tok), tok, train, val


def test_grammar_admits_every_gold_graph_and_never_bans_its_next_token(tiny):
    import llguidance

    model, tok, train, _ = tiny
    g = grammar.grammar_for(tok, model.get_output_embeddings().weight.shape[0])
    for ex in train:
        ids = tok(ex.task2, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        matcher = llguidance.LLMatcher(g.ll_tokenizer, g.compiled)
        text = b""
        for tid in ids:
            assert tid not in g.fresh.banned(text), (ex.id, text)
            assert matcher.consume_token(tid), (ex.id, text, matcher.get_error())
            text += g.token_bytes[tid] if tid != tok.eos_token_id else b""
        assert matcher.is_stopped() or matcher.is_accepting(), ex.id


def test_batched_processor_masks_every_row_in_one_call_and_admits_gold(tiny):
    """The processor fills all rows' masks in one llguidance call and masks the scores in one
    op: teacher-forced on gold graphs, every row keeps its gold next token and nothing the
    grammar forbids; a finished row may only write EOS."""
    import llguidance.torch as lt
    import torch

    model, tok, train, _ = tiny
    g = grammar.grammar_for(tok, model.get_output_embeddings().weight.shape[0])
    rows = [tok(ex.task2, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ex in train[:6]]
    prompt = [tok.pad_token_id] * 3
    proc = grammar.PenmanLogitsProcessor(g, len(rows), len(prompt), budget=10_000)
    calls = []

    class Counting:  # llguidance's torch helpers, counting the batched mask fills
        @staticmethod
        def fill_next_token_bitmask_par(executor, matchers, bitmask):
            calls.append(len(matchers))
            lt.fill_next_token_bitmask_par(executor, matchers, bitmask)

        apply_token_bitmask_inplace = staticmethod(lt.apply_token_bitmask_inplace)

    proc._lt = Counting
    ids = torch.tensor([prompt] * len(rows))
    n_vocab = model.get_output_embeddings().weight.shape[0]
    for step in range(max(len(r) for r in rows)):
        scores = proc(ids, torch.zeros(len(rows), n_vocab))
        assert len(calls) == step + 1  # one batched call per step
        for i, r in enumerate(rows):
            if step < len(r):
                assert scores[i, r[step]] == 0, (i, step)
            else:
                assert (scores[i] > float("-inf")).nonzero().flatten().tolist() == [tok.eos_token_id]
        col = [r[step] if step < len(r) else tok.pad_token_id for r in rows]
        ids = torch.cat([ids, torch.tensor(col)[:, None]], dim=1)
        assert not (scores[:, :n_vocab] > float("-inf")).all(dim=1).any()  # the grammar masks something


def test_fresh_variables_bans_completing_a_used_variable():
    tokens = [b"a", b"a ", b"a /", b"ab ", b"b ", b" /", b"(", b"x"]
    fresh = grammar.FreshVariables(tokens)
    assert sorted(fresh.banned(b"(a / b :ARG0 (")) == [1, 2]        # "a " and "a /" complete "a"
    assert sorted(fresh.banned(b"(a / b :ARG0 (a")) == [5]          # " /" completes "a"
    assert sorted(fresh.banned(b"(a / b :ARG0 (ab / c) :ARG1 (a")) == [4, 5]  # "b " would complete "ab"
    assert fresh.banned(b"(a / b :ARG0 (c / d)") == []              # not in variable position
    short = grammar.FreshVariables([b"ab", b"b", b"abc", b" "], max_len=2)
    assert sorted(short.banned(b"(ab / c :ARG0 (a")) == [1]        # "b" would reach "ab" and a dead end
    assert sorted(short.banned(b"(ab / c :ARG0 (")) == [0]


def test_constrained_generation_of_random_model_is_always_valid(tiny):
    model, tok, _, val = tiny
    template = get_template("v2_natural")
    prompts = prompts_for(template, [ex.sentence for ex in val], [ex.context for ex in val])
    stats = grammar.ConstrainedStats()
    raw = generation.generate_constrained(model, tok, prompts, template, batch_size=8, max_new_tokens=40,
                                       stats=stats)
    assert len(raw) == len(val) == stats.rows
    for text in raw:
        step2 = parse_generation(template, text)[1]
        assert grammar.well_formed(step2), step2
        graph = penman.decode(step2)
        variables = [v for v, _, _ in graph.instances()]
        assert len(variables) == len(set(variables))
        assert all(role.startswith(":") for _, role, _ in graph.edges() + graph.attributes())
        assert step2.count("(") == step2.count(")")
    # The unconstrained random model writes no graph at all: the constraint is what makes them valid.
    plain = generate(model, tok, prompts, batch_size=8, max_new_tokens=40).texts
    assert not any(grammar.well_formed(parse_generation(template, t)[1]) for t in plain)


def test_close_partial_closes_every_prefix_of_a_graph():
    gold = '(a / and\n    :op1 (đ / đúng_đắn\n        :polarity -)\n    :op2 (q / "x y"))'
    for cut in range(len(gold)):
        closed = grammar.close_partial(gold[:cut])
        assert closed == "" or grammar.well_formed(closed), (cut, closed)
    assert grammar.close_partial(gold) == re.sub(r"\s+", " ", gold).replace(" )", ")")


@pytest.mark.integration
def test_run_tune_with_retrieval_and_constrained_decoding(ray_cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, "run_tune.py", "--model", "tiny", "--preset", "quick_test", "--no-search",
         "--set", "retrieval_k=1", "--set", "constrained_decoding=true", "--set", "max_samples=40",
         "--set", "eval_max_samples=4", "--set", "max_new_tokens=48", "--set", "tiny.hidden_size=64",
         "--set", "tiny.num_layers=2", "--set", "tiny.num_heads=2", "--set", "tiny.intermediate_size=128",
         "--set", "tiny.vocab_size=600", "--storage-path", str(tmp_path), "--name", "rc"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})  # on the session's cluster
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "rc" / "summary.json").read_text(encoding="utf-8"))
    assert summary["config"]["retrieval_k"] == 1 and summary["config"]["constrained_decoding"] is True
    assert summary["final"]["validity"] == 1.0
    assert summary["final"]["n_eval"] == 4
    # predict: retrieval from the run's own training split, constrained step 2
    from ray_mtup.predict import predict_file

    sentences = tmp_path / "in.txt"
    sentences.write_text("tôi đi học .\nanh ấy đọc sách ở thư viện .\n", encoding="utf-8")
    report = predict_file(tmp_path / "rc", sentences, tmp_path / "out.txt", max_new_tokens=48)
    assert (report.n_sentences, report.n_task2, report.n_minimal) == (2, 2, 0)
    for block in (tmp_path / "out.txt").read_text(encoding="utf-8").strip().split("\n\n"):
        assert grammar.well_formed(block.split("\n", 1)[1])
