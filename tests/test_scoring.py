"""Tests of ray_mtup.scoring: corpus-level, deterministic SMATCH.

Triple counts used below (smatch 1.0.4): one instance triple per node, one TOP attribute
on the root, one triple per relation or attribute.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import smatch

from ray_mtup import scoring
from ray_mtup.config import corpus_dir
from ray_mtup.errors import ConfigError, ScoringError
from ray_mtup.scoring import (
    PairCounts,
    Score,
    bootstrap_ci,
    evaluate_files,
    evaluate_predictions,
    score_corpus,
    score_pair,
    score_pairs,
)

# 3 nodes + TOP + 2 relations = 6 triples
DI_CHO = "(đ / đi-01\n    :ARG0(t / tôi)\n    :ARG1(c / chợ))"
DI_NHA = "(đ / đi-01 :ARG0 (t / tôi) :ARG1 (n / nhà))"
# 4 nodes + TOP + 3 relations = 8 triples
AN_CA = "(a / ăn-01 :ARG0 (m / mèo) :ARG1 (c / cá) :time (s / sáng))"
AN = "(a / ăn-01 :ARG0 (m / mèo))"  # 4 triples, all in AN_CA
AN_MEO_CA = "(a / ăn-01 :ARG0 (m / mèo) :ARG1 (c / cá))"  # 3 nodes, like NOI
CHO = "(c / chó)"  # 2 triples
MEO = "(m / mèo)"  # 2 triples; only TOP matches CHO
# 3 nodes + TOP + 2 relations = 6 triples; NOI_SWAPPED matches 5 of them
NOI = "(n / nói-01 :ARG0 (b / bà) :ARG2 (c / cháu))"
NOI_SWAPPED = "(n / nói-01 :ARG1 (c / cháu) :ARG0 (b / bà))"
# re-entrancy and inverse role: 4 nodes + TOP + 4 relations = 9 triples
MUON = "(m / muốn-01 :ARG0 (c / cô_giáo) :ARG1 (d / dạy-01 :ARG0 c :ARG2 (h / học_sinh :ARG1-of (g / giỏi-01))))"


def _data_dir() -> Path | None:
    path = corpus_dir(None, default=Path(__file__).resolve().parents[2] / "shared/data/vlsp2025")
    return path if (path / "train_amr_1.txt").is_file() and (path / "train_amr_2.txt").is_file() else None


needs_corpus = pytest.mark.skipif(
    _data_dir() is None, reason="VLSP 2025 corpus not found (../shared/data/vlsp2025 or RAY_MTUP_DATA_DIR)"
)


# --------------------------------------------------------------------------- single pairs


@pytest.mark.parametrize("mode", scoring.MODES)
@pytest.mark.parametrize("graph", [DI_CHO, AN_CA, CHO, NOI, MUON])
def test_identical_graphs_score_one(graph, mode):
    pair = score_pair(graph, graph, mode)
    assert pair.valid
    assert pair.matched == pair.predicted == pair.gold > 0
    assert score_corpus([graph], [graph], mode).f1 == 1.0


def test_variable_names_do_not_matter():
    renamed = "(x / đi-01 :ARG0 (y / tôi) :ARG1 (z / chợ))"
    assert score_pair(DI_CHO, renamed) == PairCounts(6, 6, 6, True)


def test_partial_overlap_exact_precision_recall():
    assert score_pair(DI_CHO, DI_NHA) == PairCounts(matched=5, predicted=6, gold=6, valid=True)
    s = score_corpus([AN_CA], [AN])
    assert (s.matched, s.predicted, s.gold) == (4, 4, 8)
    assert (s.precision, s.recall) == (1.0, 0.5)
    assert s.f1 == pytest.approx(2 / 3)


@pytest.mark.parametrize("gold,pred", [(DI_CHO, DI_NHA), (AN_CA, AN), (NOI, NOI_SWAPPED), (MUON, DI_CHO), (CHO, MEO)])
def test_official_mode_agrees_with_smatch(gold, pred):
    smatch.match_triple_dict.clear()
    expected = smatch.get_amr_match(scoring._one_line(pred), scoring._one_line(gold))
    smatch.match_triple_dict.clear()
    got = score_pair(gold, pred, "official")
    assert (got.matched, got.predicted, got.gold) == expected


def test_invalid_prediction_counts_as_empty_graph():
    assert score_pair(AN_CA, None) == PairCounts(0, 0, 8, valid=False)
    s = score_corpus([DI_CHO, AN_CA], [DI_CHO, None])
    assert (s.n_pairs, s.n_valid, s.validity) == (2, 1, 0.5)
    assert s.precision == 1.0
    assert s.recall == 6 / 14  # exactly AN_CA's 8 gold triples are lost


def test_unparsable_prediction_text_counts_as_empty_graph():
    for garbage in ["", "(a / ", "không phải đồ thị"]:
        assert score_pair(CHO, garbage) == PairCounts(0, 0, 2, valid=False)


def test_corpus_level_not_average_of_sentence_f():
    golds, preds = [AN_CA, CHO], [AN, MEO]
    per_pair = score_pairs(golds, preds)
    assert per_pair == [PairCounts(4, 4, 8, True), PairCounts(1, 2, 2, True)]
    sentence_average = (2 / 3 + 1 / 2) / 2
    s = score_corpus(golds, preds)
    assert s.f1 == 2 * 5 / (6 + 10)  # summed: 5 matched, 6 predicted, 10 gold
    assert s.f1 != pytest.approx(sentence_average)


def test_duplicate_triples_cannot_push_f_above_one():
    gold = "(n / nói-01 :ARG0 (t / tôi))"  # 4 triples
    doubled = "(n / nói-01 :ARG0 (t / tôi) :ARG0 t)"  # the ARG0 triple twice
    # plain smatch counts the repeated triple twice: recall 5/4
    smatch.match_triple_dict.clear()
    assert smatch.get_amr_match(doubled, gold) == (5, 5, 4)
    smatch.match_triple_dict.clear()
    for g, p in [(gold, doubled), (doubled, gold), (doubled, doubled)]:
        pair = score_pair(g, p)
        assert pair == PairCounts(4, 4, 4, True)
        assert score_corpus([g], [p]).f1 == 1.0
    # repeated attribute values: 'x' and 'X' are the same after smatch's normalisation
    s = score_corpus(['(c / cờ :op1 "x")'], ['(c / cờ :op1 "x" :op1 "X" :op1 "x")'])
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- determinism and state


def test_deterministic_and_leaves_global_random_alone():
    golds = [MUON, NOI, AN_CA, DI_CHO] * 5
    preds = [NOI_SWAPPED, MUON, DI_NHA, AN] * 5
    random.seed(1234)
    expected_next = random.random()
    random.seed(1234)
    state = random.getstate()
    first = score_corpus(golds, preds)
    assert random.getstate() == state
    assert random.random() == expected_next
    second = score_corpus(golds, preds)
    assert first == second
    assert score_pairs(golds, preds) == score_pairs(golds, preds)


def test_stale_cache_cannot_leak_between_pairs():
    # With smatch's cache left from an identical 3-node pair, the mapping (0, 1, 2) of the
    # next 3-node pair is looked up instead of computed: plain smatch then says 6, not 5.
    smatch.match_triple_dict.clear()
    smatch.get_amr_match(AN_MEO_CA, AN_MEO_CA)
    assert smatch.get_amr_match(NOI_SWAPPED, NOI)[0] == 6
    smatch.match_triple_dict.clear()

    alone = score_pair(NOI, NOI_SWAPPED)
    assert alone == PairCounts(5, 6, 6, True)
    after = score_pairs([AN_CA, AN_MEO_CA, NOI], [AN_CA, AN_MEO_CA, NOI_SWAPPED])
    assert after[-1] == alone
    assert smatch.match_triple_dict == {}


def test_smatch_printing_does_not_leak(capsys):
    score_corpus([CHO, CHO], ["(a / b :ARG0", "((("])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert smatch.ERROR_LOG is not None and smatch.veryVerbose is False


# --------------------------------------------------------------------------- modes


def test_modes_differ_on_spaces_inside_concepts():
    gold, pred = "(c / chủ tịch)", "(c / chủ_tịch)"
    official = score_corpus([gold], [pred], "official")
    assert official.mode == "official"
    assert (official.matched, official.gold) == (1, 2)  # 'chủtịch' != 'chủ_tịch'; only TOP matches
    normalised = score_corpus([gold], [pred], "normalised")
    assert normalised.mode == "normalised"
    assert normalised.f1 == 1.0
    # official: the space simply disappears
    assert score_pair(gold, "(c / chủtịch)", "official").matched == 2


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="mode"):
        score_corpus([CHO], [CHO], mode="strict")


def test_mode_is_named_in_dict():
    d = score_corpus([CHO], [CHO], "normalised").to_dict()
    assert d["mode"] == "normalised"
    assert d["validity"] == 1.0
    assert {"precision", "recall", "f1", "n_pairs", "n_valid", "matched", "predicted", "gold"} <= d.keys()


# --------------------------------------------------------------------------- errors


def test_length_mismatch_is_a_scoring_error():
    with pytest.raises(ScoringError, match="2 gold graphs but 1 predictions"):
        score_corpus([CHO, MEO], [CHO])
    with pytest.raises(ScoringError):
        evaluate_predictions([CHO], [])


@pytest.mark.parametrize("mode", scoring.MODES)
def test_unparsable_gold_names_its_index(mode):
    with pytest.raises(ScoringError, match="gold graph 1"):
        score_corpus([CHO, "((("], [CHO, CHO], mode)


# --------------------------------------------------------------------------- repair path


def test_evaluate_predictions_repairs_and_counts_invalid(caplog):
    caplog.set_level("INFO", logger="ray_mtup.scoring")
    score, repairs = evaluate_predictions([DI_CHO, AN_CA, CHO], [DI_NHA, "", CHO])
    assert len(repairs) == 3
    assert [r.valid for r in repairs] == [True, False, True]
    assert (score.n_pairs, score.n_valid) == (3, 2)
    assert (score.matched, score.predicted, score.gold) == (5 + 2, 6 + 2, 6 + 8 + 2)
    assert any("prediction 1" in rec.getMessage() for rec in caplog.records)


def test_evaluate_predictions_scores_repairable_output():
    # a prediction missing its final parenthesis is repaired, not thrown away
    score, repairs = evaluate_predictions([AN], ["(a / ăn-01 :ARG0 (m / mèo)"])
    assert repairs[0].valid
    assert score.n_valid == 1 and score.f1 == 1.0


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_brackets_the_score_and_is_reproducible():
    pairs = [PairCounts(m, 10, 10, True) for m in (2, 4, 5, 6, 7, 8, 9, 10)] * 20
    f1 = Score.from_pairs(pairs, "official").f1
    low, high = bootstrap_ci(pairs, n_resamples=500, seed=3)
    assert low < f1 < high
    assert high - low < 0.2
    assert bootstrap_ci(pairs, n_resamples=500, seed=3) == (low, high)
    assert bootstrap_ci([PairCounts(5, 5, 5, True)] * 7) == (1.0, 1.0)


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(ScoringError):
        bootstrap_ci([])
    with pytest.raises(ConfigError, match="level"):
        bootstrap_ci([PairCounts(1, 1, 1, True)], level=1.5)


# --------------------------------------------------------------------------- files


def _write_corpus(path: Path, graphs: list[str]) -> Path:
    blocks = [f"#::snt câu {i} .\r\n" + g.replace("\n", "\r\n") + "\r\n" for i, g in enumerate(graphs)]
    path.write_bytes("\r\n".join(blocks).encode("utf-8"))
    return path


def test_evaluate_files(tmp_path):
    gold = _write_corpus(tmp_path / "gold.txt", [DI_CHO, AN_CA, "(c / chủ tịch)"])
    pred = _write_corpus(tmp_path / "pred.txt", [DI_NHA, "(((", "(c / chủ_tịch)"])
    result = evaluate_files(gold, pred, bootstrap=200)
    assert result["mode"] == "official"
    assert (result["n_pairs"], result["n_valid"]) == (3, 2)
    assert result["recall"] == (5 + 1) / (6 + 8 + 2)
    assert result["ci_low"] <= result["f1"] <= result["ci_high"]
    assert "noise" in result["ci_note"]
    normalised = evaluate_files(gold, pred, mode="normalised")
    assert normalised["recall"] == (5 + 2) / (6 + 8 + 2)
    assert "ci_low" not in normalised


def test_evaluate_files_count_mismatch_names_files(tmp_path):
    gold = _write_corpus(tmp_path / "gold.txt", [DI_CHO, AN_CA])
    pred = _write_corpus(tmp_path / "pred.txt", [DI_CHO])
    with pytest.raises(ScoringError) as info:
        evaluate_files(gold, pred)
    message = str(info.value)
    assert "gold.txt" in message and "pred.txt" in message and "2" in message and "1" in message


def test_read_graph_blocks_keeps_broken_and_empty_blocks(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("#::snt a\n(c / chó)\n\n#::snt b\n\n\n#::snt c\n(((\n", encoding="utf-8")
    assert scoring.read_graph_blocks(path) == ["(c / chó)", "", "((("]


# --------------------------------------------------------------------------- real corpus


def _corpus_graphs() -> list[str]:
    from ray_mtup.corpus import read_amr_file

    data = _data_dir()
    return [ex.amr for name in ("train_amr_1.txt", "train_amr_2.txt") for ex in read_amr_file(data / name)]


@needs_corpus
@pytest.mark.parametrize("mode", scoring.MODES)
def test_corpus_gold_against_itself_scores_one(mode):
    golds = _corpus_graphs()
    assert len(golds) == 1842
    pairs = score_pairs(golds, golds, mode)
    assert all(p.matched == p.predicted == p.gold for p in pairs)
    s = Score.from_pairs(pairs, mode)
    assert (s.f1, s.n_valid) == (1.0, 1842)


@needs_corpus
@pytest.mark.parametrize("mode", scoring.MODES)
def test_corpus_garbage_lowers_recall_by_the_lost_triples(mode):
    golds = _corpus_graphs()
    gold_triples = [p.gold for p in score_pairs(golds, golds, mode)]
    total = sum(gold_triples)
    removed = set(random.Random(7).sample(range(len(golds)), 25))
    expected_recall = (total - sum(gold_triples[i] for i in removed)) / total

    s = score_corpus(golds, [None if i in removed else g for i, g in enumerate(golds)], mode)
    assert (s.n_valid, s.precision, s.recall) == (len(golds) - 25, 1.0, expected_recall)

    if mode == "normalised":
        # Through repair: a repaired gold copy is canonical PENMAN ('chủ_tịch'), which the
        # official mode would not match against train_amr_2's 'chủ tịch'; normalised does.
        s, repairs = evaluate_predictions(golds, ["(((" if i in removed else g for i, g in enumerate(golds)], mode)
        assert sum(not r.valid for r in repairs) == 25
        assert (s.n_valid, s.precision, s.recall) == (len(golds) - 25, 1.0, expected_recall)


@needs_corpus
def test_corpus_scores_are_reproducible():
    golds = _corpus_graphs()[:300]
    rng = random.Random(11)
    # a partner graph from elsewhere in the corpus: hard alignments, many restarts used
    preds = [golds[rng.randrange(len(golds))] for _ in golds]
    first = score_pairs(golds, preds)
    assert first == score_pairs(golds, preds)
    assert all(p.matched <= min(p.predicted, p.gold) for p in first)


# --------------------------------------------------------------------------- files as they are


def _smatch_corpus_f(gold: Path, pred: Path, monkeypatch) -> float:
    """smatch 1.0.4's own corpus F (its file reader, parser and 5 starts), seeded: its
    per-restart ``random.seed()`` from the OS is disabled for the call."""
    import smatch as smatch_module

    random.seed(0)
    monkeypatch.setattr(smatch_module.random, "seed", lambda *a, **k: None)
    smatch_module.match_triple_dict.clear()
    with pred.open(encoding="utf-8") as f1, gold.open(encoding="utf-8") as f2:
        *_, (_, _, f) = smatch_module.score_amr_pairs(f1, f2)
    monkeypatch.undo()
    return f


def test_evaluate_files_scores_the_file_as_it_is(tmp_path):
    # gold written with spaces, the shared task's convention: against itself it is 1.0 in
    # both modes; only --repair rewrites the prediction's concepts (and then official loses)
    gold = _write_corpus(tmp_path / "gold.txt", ["(c / chủ tịch\n    :mod(x / xã))", DI_CHO, "(t / thuận lợi)"])
    for mode in scoring.MODES:
        assert evaluate_files(gold, gold, mode=mode)["f1"] == 1.0
    repaired = evaluate_files(gold, gold, repair=True)
    assert repaired["f1"] < 1.0 and repaired["repair"] is True
    assert evaluate_files(gold, gold, mode="normalised", repair=True)["f1"] == 1.0


def test_evaluate_files_unreadable_prediction_counts_empty_without_repair(tmp_path):
    gold = _write_corpus(tmp_path / "gold.txt", [AN, CHO])
    pred = _write_corpus(tmp_path / "pred.txt", ["(a / ăn-01 :ARG0 (m / mèo)))", CHO])  # one ")" too many
    plain = evaluate_files(gold, pred)
    assert (plain["n_valid"], plain["recall"]) == (1, 2 / 6)
    fixed = evaluate_files(gold, pred, repair=True)
    assert (fixed["n_valid"], fixed["n_repaired"], fixed["f1"]) == (2, 1, 1.0)


def test_evaluate_files_scores_mismatched_sentences_by_order_and_reports_them(tmp_path):
    """A real submission carried an extra trailing '.' on some #::snt lines: smatch scores it by
    order, and so does evaluate, reporting the lines rather than refusing the file."""
    gold = _write_corpus(tmp_path / "gold.txt", [AN, CHO, MEO])
    preds = [MEO, CHO, AN]
    same = _write_corpus(tmp_path / "same.txt", preds)
    dotted = tmp_path / "dotted.txt"
    dotted.write_text("\n".join(f"#::snt câu {i} .{'.' if i != 1 else ''}\n{g}\n" for i, g in enumerate(preds)),
                      encoding="utf-8")
    plain, marked = evaluate_files(gold, same), evaluate_files(gold, dotted)
    assert plain["sentence_mismatches"] == {"count": 0, "first": None}
    assert marked["sentence_mismatches"]["count"] == 2
    assert marked["sentence_mismatches"]["first"].startswith(f"{dotted}:1: ")
    assert {k: v for k, v in marked.items() if k not in ("pred_path", "sentence_mismatches")} == \
        {k: v for k, v in plain.items() if k not in ("pred_path", "sentence_mismatches")}
    assert 0 < plain["f1"] < 1  # scored by order: the swapped graphs cost, the matching one counts
    with pytest.raises(ScoringError, match="counts must be equal"):
        evaluate_files(gold, _write_corpus(tmp_path / "short.txt", preds[:2]))


def test_paired_bootstrap_needs_the_same_ids():
    a = {"s1": PairCounts(2, 2, 2, True), "s2": PairCounts(1, 3, 2, True)}
    b = {"s1": PairCounts(1, 2, 2, True), "s2": PairCounts(1, 3, 2, True)}
    low, high = bootstrap_ci(a, n_resamples=200, baseline=b)
    assert 0.0 <= low <= high  # a is never worse than b on any sentence
    with pytest.raises(ScoringError, match="different sentences"):
        bootstrap_ci(a, baseline={"s1": b["s1"], "s3": b["s2"]})
    with pytest.raises(ScoringError, match="no gold graph"):
        scoring.score_by_id({"s1": CHO}, {"s1": CHO, "s7": MEO})


@needs_corpus
@pytest.mark.parametrize("name", ["train_amr_1.txt", "train_amr_2.txt"])
@pytest.mark.parametrize("mode", scoring.MODES)
def test_every_corpus_file_against_itself_scores_one(name, mode):
    result = evaluate_files(_data_dir() / name, _data_dir() / name, mode=mode)
    assert (result["f1"], result["validity"]) == (1.0, 1.0)


@needs_corpus
def test_official_matches_smatch_on_real_files(tmp_path, monkeypatch):
    from ray_mtup.corpus import read_amr_file, write_amr_file

    examples = read_amr_file(_data_dir() / "train_amr_2.txt")[:200]
    gold = tmp_path / "gold.txt"
    write_amr_file(gold, [(ex.sentence, ex.amr) for ex in examples])
    rng = random.Random(3)
    # another sentence's graph for every 4th sentence, a renamed root concept for the next
    perturbed = []
    for i, ex in enumerate(examples):
        graph = examples[rng.randrange(len(examples))].amr if i % 4 == 0 else ex.amr
        if i % 4 == 1:
            graph = re.sub(r"^\((\S+) / [^\n:()]+", r"(\1 / khác", graph, count=1)
        perturbed.append((ex.sentence, graph))
    pred = tmp_path / "pred.txt"
    write_amr_file(pred, perturbed)
    ours = evaluate_files(gold, pred)["f1"]
    assert ours < 0.95
    assert abs(ours - _smatch_corpus_f(gold, pred, monkeypatch)) <= 0.005
