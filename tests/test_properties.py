"""Property tests: whatever a model generates, evaluation never raises and F stays in [0, 1].

Random and mutated generations (truncated, unbalanced, prompt echo, repeated roles,
duplicate variables, empty, binary noise, ...) are built from a few hand-written gold
graphs and fed through the evaluation path of the training loop:
``generation.parse_outputs`` (split + ``amr.repair`` / ``amr.repair_task1``), then
``scoring.score_corpus`` in both modes. More than 10,000 generations are checked, in
batches of 250 per hypothesis example.
"""

from __future__ import annotations

import penman
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_mtup import amr, scoring
from ray_mtup.generation import parse_outputs
from ray_mtup.prompts import TEMPLATES, render_inference

# Hand-written gold graphs: re-entrancy, a quoted constant with a parenthesis, a
# multi-word concept, polarity, a number, a deeper nesting.
GOLD = [
    ("tôi muốn đi học .", "(m / muốn :agent (t / tôi) :theme (đ / đi :agent t :destination (h / học)))"),
    ('anh nói " vui ( quá " .', '(n / nói :agent (a / anh) :topic "vui ( quá" :polarity -)'),
    ("chủ tịch nước .", "(c / chủ tịch :mod (n / nước))"),
    ("hôm nay trời mưa to .", "(m / mưa :time (h / hôm nay) :manner (t / to))"),
    ("ba con mèo ngủ .", "(n / ngủ :agent (m / mèo :quant 3))"),
    ("cô ấy bảo tôi rằng nó không đến .",
     "(b / bảo :agent (c / cô ấy) :recipient (t / tôi) :topic (đ / đến :agent (n / nó) :polarity -))"),
]
TEMPLATE_NAMES = sorted(TEMPLATES)
BATCH = 250
EXAMPLES = 42  # 42 * 250 = 10,500 generations


def _gold_forms(index: int) -> tuple[str, str, str]:
    sentence, graph = GOLD[index]
    task2 = amr.normalise(graph)
    return sentence, amr.to_task1(task2), task2


def _perfect(template_name: str, index: int) -> str:
    _, task1, task2 = _gold_forms(index)
    return task1 + TEMPLATES[template_name].step2_marker + task2


def _mutate(draw, text: str, kind: str) -> str:
    n = len(text)
    if kind == "truncate":
        return text[: draw(st.integers(0, n))]
    if kind == "drop_close":
        k = draw(st.integers(1, 4))
        out = text
        for _ in range(k):
            i = out.rfind(")")
            out = out[:i] + out[i + 1:] if i >= 0 else out
        return out
    if kind == "extra_close":
        i = draw(st.integers(0, n))
        return text[:i] + ")" * draw(st.integers(1, 3)) + text[i:]
    if kind == "extra_open":
        i = draw(st.integers(0, n))
        return text[:i] + "(" * draw(st.integers(1, 3)) + text[i:]
    if kind == "repeat_role":
        i = text.find(":")
        if i < 0:
            return text + " :agent :agent"
        j = text.find(")", i)
        chunk = text[i: j + 1 if j > 0 else n]
        return text[:i] + chunk + " " + chunk + " " + text[i:]
    if kind == "duplicate_vars":
        # every variable becomes the same name: each node redefines 'x'
        import re

        return re.sub(r"\((\s*)[^\s()/:\"]+(\s*)/", r"(\1x\2/", text)
    if kind == "delete_span":
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, n))
        return text[:i] + text[j:]
    if kind == "insert_noise":
        i = draw(st.integers(0, n))
        noise = draw(st.text(alphabet=st.sampled_from('()/:"~<>#\\ \n\tabx0123-'), max_size=12))
        return text[:i] + noise + text[i:]
    if kind == "swap_slash":
        return text.replace("/", draw(st.sampled_from(["", "//", ":", "/ /"])))
    if kind == "label_junk":
        return text.replace("(", draw(st.sampled_from(["(<1> ", "(<99> ", "( <1>", "(\"q\" "])), 2)
    if kind == "repeat":
        return text * draw(st.integers(2, 4))
    return text


MUTATIONS = ("none", "truncate", "drop_close", "extra_close", "extra_open", "repeat_role", "duplicate_vars",
             "delete_span", "insert_noise", "swap_slash", "label_junk", "repeat")


@st.composite
def generation(draw, template_name: str) -> tuple[int, str]:
    """(gold index, raw model output) for one validation sentence."""
    index = draw(st.integers(0, len(GOLD) - 1))
    template = TEMPLATES[template_name]
    sentence, task1, task2 = _gold_forms(index)
    shape = draw(st.sampled_from(["mtup", "mtup", "task2_only", "task1_only", "echo", "empty", "noise",
                                  "binary", "marker_only", "other_gold"]))
    if shape == "empty":
        raw = draw(st.sampled_from(["", " ", "\n\n", "\t"]))
    elif shape == "noise":
        raw = draw(st.text(max_size=80))
    elif shape == "binary":
        raw = draw(st.binary(max_size=80)).decode("latin-1")
    elif shape == "marker_only":
        raw = template.step1_marker + template.step2_marker
    else:
        if shape == "other_gold":
            task1, task2 = _gold_forms((index + 1) % len(GOLD))[1:]
        kind1 = draw(st.sampled_from(MUTATIONS))
        kind2 = draw(st.sampled_from(MUTATIONS))
        t1 = _mutate(draw, task1, kind1)
        t2 = _mutate(draw, task2, kind2)
        if shape == "task2_only":
            raw = t2
        elif shape == "task1_only":
            raw = t1
        elif shape == "echo":  # the model repeats the prompt (and maybe its markers) first
            raw = render_inference(template, sentence) + t1 + template.step2_marker + t2
        else:
            raw = t1 + template.step2_marker + t2
    return index, raw


def _check_batch(template_name: str, batch: list[tuple[int, str]]) -> None:
    template = TEMPLATES[template_name]
    golds = [GOLD[i][1] for i, _ in batch]
    raws = [raw for _, raw in batch]
    parsed = parse_outputs(template, raws)  # never raises
    assert len(parsed) == len(raws)
    for p, raw in zip(parsed, raws):
        assert p.raw == raw
        for graph in (p.task1_graph, p.task2_graph):
            if graph is not None:  # a graph that is returned is decodable, canonical PENMAN
                penman.decode(graph)
                assert amr.normalise(graph) == graph
    for mode in scoring.MODES:
        for preds in ([p.task2_graph for p in parsed], [p.task1_graph for p in parsed]):
            score = scoring.score_corpus(golds, preds, mode=mode)
            assert 0.0 <= score.f1 <= 1.0
            assert 0.0 <= score.precision <= 1.0 and 0.0 <= score.recall <= 1.0
            assert 0.0 <= score.validity <= 1.0
            n_invalid = sum(1 for g in preds if g is None)
            assert score.n_pairs == len(batch)
            # an output repair gives up on is counted invalid, never dropped
            assert score.n_valid <= len(batch) - n_invalid
            assert score.n_valid + (score.n_pairs - score.n_valid) == len(batch)
            assert score.matched <= min(score.predicted, score.gold)


def test_mutated_generations_never_raise_and_f1_in_range():
    checked: list[int] = []
    batches = st.sampled_from(TEMPLATE_NAMES).flatmap(
        lambda name: st.tuples(st.just(name), st.lists(generation(name), min_size=BATCH, max_size=BATCH)))

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches)
    def run(case: tuple[str, list[tuple[int, str]]]) -> None:
        template_name, batch = case
        _check_batch(template_name, batch)
        checked.append(len(batch))

    run()
    assert sum(checked) >= 10_000, f"only {sum(checked)} generations were checked"


@given(st.text(max_size=300), st.sampled_from(TEMPLATE_NAMES))
@settings(max_examples=300, deadline=None, database=None)
def test_any_text_is_repaired_or_counted_invalid(raw, template_name):
    (p,) = parse_outputs(TEMPLATES[template_name], [raw])
    r = amr.repair(raw)
    assert r.valid == (r.graph is not None)
    if not r.valid:
        assert r.notes, "an invalid output says why"
    score = scoring.score_corpus([GOLD[0][1]], [p.task2_graph])
    assert 0.0 <= score.f1 <= 1.0
    assert score.n_pairs == 1
    assert score.n_valid <= (0 if p.task2_graph is None else 1)


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_unmutated_generations_score_one(template_name):
    raws = [_perfect(template_name, i) for i in range(len(GOLD))]
    parsed = parse_outputs(TEMPLATES[template_name], raws)
    golds = [g for _, g in GOLD]
    score = scoring.score_corpus(golds, [p.task2_graph for p in parsed], mode="normalised")
    assert (score.f1, score.n_valid) == (1.0, len(GOLD))
    assert not any(p.task2_repaired for p in parsed)


def test_invalid_outputs_are_counted_not_dropped():
    template = TEMPLATES["v2_natural"]
    raws = ["", "\x00\xff\xfe", "không phải đồ thị", _perfect("v2_natural", 2)]
    parsed = parse_outputs(template, raws)
    golds = [GOLD[2][1]] * 4
    score = scoring.score_corpus(golds, [p.task2_graph for p in parsed], mode="normalised")
    assert (score.n_pairs, score.n_valid) == (4, 1)
    assert score.validity == 0.25
    assert score.recall == 0.25 and score.precision == 1.0  # the three invalid ones count as empty
