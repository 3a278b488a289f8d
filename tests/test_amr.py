"""Tests of ray_mtup.amr: normalisation, task-1 round trip and repair."""

from __future__ import annotations

import re

import penman
import pytest
import smatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_mtup.amr import Repair, normalise, repair, repair_task1, restore, to_task1
from ray_mtup.corpus import load_corpus, read_amr_file
from ray_mtup.errors import AmrError


def canonical_triples(text: str) -> set[tuple[str, str, str]]:
    """Triples with variables renamed v0, v1, ... in order of definition.

    Equal results mean equal triples up to renaming (the converse needs equal layouts,
    which the round trips tested here keep).
    """
    graph = penman.decode(text)
    names = {var: f"v{i}" for i, var in enumerate(v for v, _, _ in graph.instances())}
    return {
        (names[s], role, t if role == ":instance" else names.get(t, t)) for s, role, t in graph.triples
    }


def smatch_f1(test: str, gold: str) -> float:
    """Plain smatch 1.0.4 F1 of two graphs (one line each)."""
    smatch.match_triple_dict.clear()
    best, test_num, gold_num = smatch.get_amr_match(" ".join(test.split()), " ".join(gold.split()))
    smatch.match_triple_dict.clear()
    return smatch.compute_f(best, test_num, gold_num)[2]


@pytest.fixture(scope="module")
def mini_graphs(fixtures_dir):
    return [e.amr for e in read_amr_file(fixtures_dir / "mini_amr.txt")]


@pytest.fixture(scope="module")
def vlsp_graphs(vlsp_dir):
    return [(e.id, normalise(e.amr)) for e in load_corpus(vlsp_dir)]


# --- normalise ------------------------------------------------------------------------


def test_normalise_joins_multiword_concepts_only():
    text = '(l / làm việc\r\n    :location(t / thành phố\r\n        :name(n / name :op1 "Hà Nội")))'
    assert normalise(text) == (
        "(l / làm_việc\n"
        "    :location (t / thành_phố\n"
        '        :name (n / name\n            :op1 "Hà Nội")))'
    )


def test_normalise_is_idempotent_on_fixtures(mini_graphs):
    for graph in mini_graphs:
        once = normalise(graph)
        assert normalise(once) == once
        assert ":agent(" not in once and "\r" not in once
    assert "(c / cà_phê)" in normalise(mini_graphs[2])
    assert ":polarity -" in normalise(mini_graphs[2])


def test_normalise_gives_a_variable_to_a_node_without_one():
    assert normalise("(d / date-entity :year( / 1900))") == "(d / date-entity\n    :year (x / 1900))"


def test_normalise_drops_a_repeated_edge():
    graph = normalise("(g / giếng :pivot-of (c / có :pivot g))")
    assert graph == "(g / giếng\n    :pivot-of (c / có))"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty graph"),
        ("   ", "empty graph"),
        ("(a / b", "cannot decode"),
        ("a / b)", "cannot decode"),
        ("(a / b :ARG0)", "has no value"),
        ("(a / b :ARG0 (a / c))", "defined twice"),
        ("(a :ARG0 (b / c))", "has no concept"),
        ("(a / b ~ c)", "unexpected"),
        ("(a / b) (c / d)", "text after the graph"),
    ],
)
def test_normalise_rejects(text, message):
    with pytest.raises(AmrError, match=message):
        normalise(text)


# --- task 1 ---------------------------------------------------------------------------


def test_to_task1_plain_and_reentrant(mini_graphs):
    assert to_task1(mini_graphs[0]) == "(muốn :agent (tôi <1>) :theme (đi :agent <1> :purpose (học)))"
    assert to_task1(mini_graphs[2]) == (
        "(thích :polarity - :experiencer (bà <1> :poss (tôi)) :theme (uống :agent <1> :patient (cà_phê)))"
    )
    assert to_task1(mini_graphs[7]) == "(khỏe :domain (bạn) :mode interrogative)"


def test_to_task1_labels_in_order_of_first_appearance():
    text = "(a / and :op1 (c / cười :agent b) :op2 (n / nói :agent (b / bé) :topic c))"
    assert to_task1(text) == "(and :op1 (cười <1> :agent <2>) :op2 (nói :agent (bé <2>) :topic <1>))"
    assert canonical_triples(restore(to_task1(text))) == canonical_triples(normalise(text))


def test_to_task1_refuses_label_like_constant():
    with pytest.raises(AmrError, match="unexpected '<1>'"):
        to_task1("(a / b :op1 <1>)")


def test_restore_names_variables():
    graph = restore('(đi :agent (anh) :time (1990) :manner ("x") :destination (ấp :mod (an)))')
    assert re.findall(r"\((\S+) /", graph) == ["đ", "a", "x", "x1", "ấ", "a1"]


def test_restore_avoids_constants():
    # an undefined reference ('t' below) is a constant; no variable may take its name
    task1 = "(tin :agent t :theme (tôi))"
    graph = restore(task1)
    assert re.findall(r"\((\S+) /", graph) == ["t1", "t2"]
    assert to_task1(graph) == task1


@pytest.mark.parametrize(
    ("task1", "message"),
    [
        ("", "expected '\\('"),
        ("(nói", "expected '\\)'"),
        ("(nói :agent)", "expected a value"),
        ("(nói) (đi)", "end of input"),
        ("(:agent (x))", "a concept"),
        ("(nói :agent <1>)", "refers to no node"),
        ("(nói <1> :agent (tôi <1>))", "given to two nodes"),
        ("(n / nói)", "a role or"),
    ],
)
def test_restore_rejects(task1, message):
    with pytest.raises(AmrError, match=message):
        restore(task1)


def test_fixture_round_trips(mini_graphs):
    for graph in mini_graphs:
        gold = normalise(graph)
        task1 = to_task1(gold)
        restored = restore(task1)
        assert to_task1(restored) == task1
        assert canonical_triples(restored) == canonical_triples(gold)
        assert smatch_f1(restored, gold) == 1.0


# --- repair ---------------------------------------------------------------------------


def test_repair_leaves_valid_graphs_alone(mini_graphs):
    for graph in mini_graphs:
        result = repair(normalise(graph))
        assert result == Repair(graph=normalise(graph), valid=True, repaired=False, notes=())
        # corpus dialect is normalisation, not repair
        assert repair(graph).repaired is False


def test_repair_duplicate_variable():
    result = repair("(c / có :pivot (e / em) :theme (s / sách :mod (e / mới)))")
    assert result.valid and result.repaired
    assert result.graph == normalise("(c / có :pivot (e / em) :theme (s / sách :mod (m / mới)))")
    assert result.notes == ("renamed duplicate variable 'e' to 'm'",)
    assert smatch_f1(result.graph, result.graph) == 1.0


def test_repair_prompt_echo_and_trailing_text():
    gold = "(m / mưa :time (h / hôm_nay))"
    text = f"Câu: hôm nay (trời) mưa .\nAMR: {gold}\n\nGiải thích: (không)"
    result = repair(text)
    assert result.graph == normalise(gold)
    assert result.notes == ("dropped text before the graph", "dropped text after the graph")


def test_repair_truncated_output():
    result = repair("(m / muốn :agent (t / tôi) :theme (đ / đi :agent t :purpose (h / h")
    assert result.valid
    assert result.graph == normalise("(m / muốn :agent (t / tôi) :theme (đ / đi :agent t :purpose (h / h)))")
    assert result.notes == ("closed 3 unclosed parentheses",)


@pytest.mark.parametrize(
    ("text", "expected", "note"),
    [
        ("(a / ăn :agent)", "(a / ăn)", "dropped role :agent without a value"),
        ("(a / ăn :agent :theme (c / cơm))", "(a / ăn :theme (c / cơm))", "dropped role :agent"),
        ("(a / ăn :theme (c / cơm)))) ))", "(a / ăn :theme (c / cơm))", "dropped text after the graph"),
        ("(a / ăn :theme (c / ))", "(a / ăn)", "dropped a node without a concept"),
        ("(a / ăn :theme (cơm))", "(a / ăn :theme (c / cơm))", "gave a variable to node 'cơm'"),
        ("(a / ăn cơm ngon)", "(a / ăn_cơm_ngon)", None),
        ("(a / ăn :quant 2 3)", "(a / ăn :quant 2)", "dropped stray '3'"),
        ('(a / ăn :name "Hà', '(a / ăn :name "Hà")', "closed an unterminated string"),
        ("(a / ăn (c / cơm))", "(a / ăn)", "dropped a subgraph without a role"),
        ("(a / ăn :agent <1>)", "(a / ăn)", "pointing at task-1 label"),
    ],
)
def test_repair_cases(text, expected, note):
    result = repair(text)
    assert result.valid
    assert result.graph == normalise(expected)
    if note is None:
        assert not result.repaired
    else:
        assert result.repaired and any(note in n for n in result.notes)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "no graph", ")))", "( / )", "(:agent)", "\x00\xff\ud800", "(" * 5000, "(a / b " * 3000],
)
def test_repair_invalid_or_extreme_inputs(text):
    result = repair(text)
    assert result.valid == (result.graph is not None)
    if not result.valid:
        assert result.repaired and result.notes
    result1 = repair_task1(text)
    assert result1.valid == (result1.graph is not None)


def test_repair_huge_output():
    text = "(a / ăn " + " ".join(f":op{i} (c{i} / cơm)" for i in range(3000)) + ")"
    result = repair(text)
    assert result.valid and not result.repaired
    junk = repair("(a / ăn " + "x " * 200_000)
    assert junk.valid and junk.graph == "(a / ăn_x" + "_x" * 199_999 + ")"
    strays = repair("(a / ăn :op1 b " + "c " * 1000 + ")")
    assert strays.valid and len(strays.notes) == 20 and strays.notes[-2] == "... and 981 more fixes"


def test_repair_non_str():
    assert repair(None).valid is False  # type: ignore[arg-type]
    assert repair_task1(b"(a / b)").valid is False  # type: ignore[arg-type]


def test_repair_task1():
    result = repair_task1("Output: (nói :agent (tôi <1>) :theme (đi :agent <1> :time <2> :mod")
    assert result.valid
    assert to_task1(result.graph) == "(nói :agent (tôi <1>) :theme (đi :agent <1>))"
    assert result.notes == (
        "dropped text before the graph",
        "dropped role :mod without a value",
        "closed 2 unclosed parentheses",
        "dropped role :time pointing at unknown label <2>",
    )


def test_repair_task1_duplicate_label_and_variables():
    result = repair_task1("(nói <1> :agent (tôi <1>) :theme (n / nhà))")
    assert result.valid
    assert to_task1(result.graph) == "(nói :agent (tôi) :theme (nhà))"
    assert "dropped second use of label <1>" in result.notes
    assert "dropped variable 'n'" in result.notes


def test_repair_task1_leaves_valid_task1_alone(mini_graphs):
    for graph in mini_graphs:
        task1 = to_task1(graph)
        result = repair_task1(task1)
        assert result == Repair(graph=restore(task1), valid=True, repaired=False, notes=())


_PIECES = st.sampled_from(
    ["(", ")", "/", " ", ":ARG0", ":mod(", "a", "b", "đ", "<1>", "<2>", '"', '"x y"', "-", "\n", "#", "~", "ấy "]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(_PIECES, max_size=80).map("".join)))
def test_repair_never_raises(text):
    for result in (repair(text), repair_task1(text)):
        assert result.valid == (result.graph is not None)
        if result.valid:
            assert normalise(result.graph) == result.graph
        else:
            assert result.repaired


# --- the VLSP corpus ------------------------------------------------------------------


def test_vlsp_all_graphs_normalise(vlsp_graphs):
    assert len(vlsp_graphs) == 1842
    for gid, graph in vlsp_graphs:
        assert normalise(graph) == graph, gid


def test_vlsp_task1_round_trip(vlsp_graphs):
    reentrant = 0
    for gid, graph in vlsp_graphs:
        task1 = to_task1(graph)
        assert "\n" not in task1 and " / " not in task1, gid
        restored = restore(task1)
        assert to_task1(restored) == task1, gid
        assert canonical_triples(restored) == canonical_triples(graph), gid
        reentrant += "<1>" in task1
    assert reentrant >= 334 + 61 - 10  # the README counts 334 + 61 graphs with re-entrancy


def test_vlsp_round_trip_smatch_sample(vlsp_graphs):
    for gid, graph in vlsp_graphs[::37]:
        assert smatch_f1(restore(to_task1(graph)), graph) == 1.0, gid


def test_vlsp_repair_keeps_gold(vlsp_graphs):
    for gid, graph in vlsp_graphs:
        result = repair(graph)
        assert result.valid and not result.repaired and result.graph == graph, (gid, result.notes)
        result1 = repair_task1(to_task1(graph))
        assert result1.valid and not result1.repaired, (gid, result1.notes)


def test_vlsp_repair_mutations(vlsp_graphs):
    for gid, graph in vlsp_graphs:
        root_end = graph.index("\n") if "\n" in graph else len(graph)
        for fraction in (0.3, 0.6, 0.9):
            cut = max(root_end, int(len(graph) * fraction))
            truncated = repair(graph[:cut])
            assert truncated.valid, (gid, fraction, truncated.notes)
        echoed = repair(f"Câu: (xem) ví dụ .\nAMR:\n{graph}\nHết (1).")
        assert echoed.valid and echoed.graph == graph, gid
        same_vars = re.sub(r"\((\S+) /", "(a /", graph)
        renamed = repair(same_vars)
        assert renamed.valid, gid
        if graph.count(" / ") > 1:
            assert any("renamed duplicate variable" in n for n in renamed.notes), gid
        task1 = to_task1(graph)
        assert repair_task1(task1[: max(len(task1) // 2, task1.find(" ") + 1)]).valid, gid
