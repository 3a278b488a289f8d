"""Tests of ray_mtup.corpus on the hand-written fixtures and, when present, the VLSP corpus."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import MALFORMED_CORPORA

from ray_mtup.corpus import (
    Example,
    find_duplicate_sentences,
    load_corpus,
    read_amr_file,
    read_amr_file_report,
    read_sentences,
    write_amr_file,
)
from ray_mtup.errors import CorpusError

# --- the mini corpus ---------------------------------------------------------------


def test_mini_corpus_blocks(fixtures_dir):
    examples = read_amr_file(fixtures_dir / "mini_amr.txt")
    assert len(examples) == 12
    first = examples[0]
    assert first == Example(
        id="mini_amr:1",
        sentence="tôi muốn đi học .",
        amr=first.amr,
        source="mini_amr.txt",
        line=1,
    )
    assert first.amr.startswith("(m / muốn\n    :agent(t / tôi)")
    assert "\r" not in first.amr
    assert [e.id for e in examples] == [f"mini_amr:{i}" for i in range(1, 13)]
    # each block: #::snt line + graph lines + blank line
    assert examples[1].line == 1 + len(first.amr.split("\n")) + 2


def test_mini_corpus_lines_point_at_snt(fixtures_dir):
    raw_lines = (fixtures_dir / "mini_amr.txt").read_bytes().decode("utf-8").split("\r\n")
    for example in read_amr_file(fixtures_dir / "mini_amr.txt"):
        assert raw_lines[example.line - 1] == f"#::snt {example.sentence}"


def test_mini_duplicates(fixtures_dir):
    examples = read_amr_file(fixtures_dir / "mini_amr.txt")
    assert find_duplicate_sentences(examples) == {"hôm nay trời mưa to .": ["mini_amr:5", "mini_amr:9"]}


def test_read_sentences(fixtures_dir):
    examples = read_sentences(fixtures_dir / "mini_sentences.txt")
    assert [e.sentence for e in examples][:2] == ["tôi đi chợ .", "trời hôm nay đẹp quá !"]
    assert len(examples) == 5
    assert all(e.amr is None for e in examples)
    assert examples[2].id == "mini_sentences:3" and examples[2].line == 4  # after the blank line


def test_read_sentences_rejects_graph_file(fixtures_dir):
    with pytest.raises(CorpusError, match=r"mini_amr\.txt:1: looks like a graph file"):
        read_sentences(fixtures_dir / "mini_amr.txt")


def test_read_sentences_errors(fixtures_dir):
    with pytest.raises(CorpusError, match=r"empty\.txt:1: empty file"):
        read_sentences(fixtures_dir / "bad" / "empty.txt")
    with pytest.raises(CorpusError, match=r"bad_utf8\.txt:3: not valid UTF-8"):
        read_sentences(fixtures_dir / "bad" / "bad_utf8.txt")


# --- malformed files -----------------------------------------------------------------

MALFORMED = MALFORMED_CORPORA


@pytest.mark.parametrize(("name", "line", "reason"), MALFORMED)
def test_malformed_file_names_file_and_line(fixtures_dir, name, line, reason):
    path = fixtures_dir / "bad" / name
    with pytest.raises(CorpusError) as info:
        read_amr_file(path)
    assert f"{path}:{line}:" in str(info.value)
    assert reason in str(info.value)
    assert info.value.line == line


@pytest.mark.parametrize("name", ["no_snt.txt", "unbalanced.txt", "snt_without_graph.txt"])
def test_lenient_skips_and_reports(fixtures_dir, name, caplog):
    path = fixtures_dir / "bad" / name
    with caplog.at_level(logging.WARNING, logger="ray_mtup.corpus"):
        report = read_amr_file_report(path, lenient=True)
    assert len(report.skipped) == 1
    skipped = report.skipped[0]
    assert skipped.path == str(path)
    assert f"{path}:{skipped.line}" in caplog.text
    assert read_amr_file(path, lenient=True) == report.examples
    assert all(e.amr.startswith("(") for e in report.examples)


def test_lenient_keeps_block_ids_stable(fixtures_dir):
    report = read_amr_file_report(fixtures_dir / "bad" / "unbalanced.txt", lenient=True)
    assert [e.id for e in report.examples] == ["unbalanced:1", "unbalanced:3"]
    assert report.skipped[0].line == 6


@pytest.mark.parametrize("name", ["bad_utf8.txt", "empty.txt", "sentence_only.txt"])
def test_lenient_still_raises_on_file_level_problems(fixtures_dir, name):
    with pytest.raises(CorpusError):
        read_amr_file(fixtures_dir / "bad" / name, lenient=True)


def test_bom_crlf_and_quoted_parentheses(fixtures_dir):
    examples = read_amr_file(fixtures_dir / "bad" / "bom_crlf_ok.txt")
    assert [e.sentence for e in examples] == ["tôi đi .", 'anh nói " vui ( quá " .']
    assert examples[1].amr.endswith(':topic "vui ( quá")')
    assert examples[1].line == 5  # the separator line holds only a space and a tab


def test_mixed_newlines_and_metadata(fixtures_dir):
    examples = read_amr_file(fixtures_dir / "bad" / "mixed_newlines_ok.txt")
    assert [(e.sentence, e.line) for e in examples] == [("tôi đi .", 2), ("mèo ngủ .", 6)]
    assert examples[1].amr == "(n / ngủ\n    :agent(m / mèo))"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("#::snt a .\n(a / b)\n(c / d)\n", 3, "text after the graph closes"),
        ("#::snt a .\n(a / b)) \n", 2, "unexpected ')'"),
        ("#::snt a .\n(a / b :op1 \"x)\n", 2, "unterminated quoted string"),
        ("#::snt a .\na / b\n", 2, "does not start with '('"),
        ("# ::id 1\n\n", 1, "no readable graph"),
    ],
)
def test_more_malformed_blocks(tmp_path, text, line, reason):
    path = tmp_path / "case.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        read_amr_file(path)
    assert f"{path}:{line}:" in str(info.value)
    assert reason in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="file not found"):
        read_amr_file(tmp_path / "nope.txt")


def test_write_then_read_round_trip(tmp_path, fixtures_dir):
    examples = read_amr_file(fixtures_dir / "mini_amr.txt")
    out = tmp_path / "sub" / "out.txt"
    assert write_amr_file(out, ((e.sentence, e.amr) for e in examples)) == len(examples)
    assert b"\r" not in out.read_bytes()
    back = read_amr_file(out)
    assert [(e.sentence, e.amr) for e in back] == [(e.sentence, e.amr) for e in examples]
    assert re.match(r"#::snt tôi muốn đi học \.\n\(m / muốn\n", out.read_text(encoding="utf-8"))


def test_write_rejects_bad_items(tmp_path):
    with pytest.raises(CorpusError, match=r"out\.txt:2: item 2: sentence contains a line break"):
        write_amr_file(tmp_path / "out.txt", [("a", "(a / b)"), ("b\nc", "(c / d)")])
    with pytest.raises(CorpusError, match="empty graph"):
        write_amr_file(tmp_path / "out.txt", [("a", " \n ")])


def test_load_corpus_errors(tmp_path, fixtures_dir):
    with pytest.raises(CorpusError, match="corpus directory not found"):
        load_corpus(tmp_path / "absent")
    with pytest.raises(CorpusError, match="train_amr_1.txt, train_amr_2.txt"):
        load_corpus(tmp_path)
    assert len(load_corpus(fixtures_dir, files=("mini_amr.txt",))) == 12


# --- the VLSP corpus -----------------------------------------------------------------


def test_vlsp_counts(vlsp_dir):
    first = read_amr_file(vlsp_dir / "train_amr_1.txt")
    second = read_amr_file(vlsp_dir / "train_amr_2.txt")
    assert (len(first), len(second)) == (1262, 580)
    assert len(load_corpus(vlsp_dir)) == 1842
    assert len({e.id for e in first + second}) == 1842
    assert all(e.amr.startswith("(") and "\r" not in e.amr for e in first + second)


def test_vlsp_strict_read_skips_nothing(vlsp_dir):
    for name in ("train_amr_1.txt", "train_amr_2.txt"):
        assert read_amr_file_report(vlsp_dir / name, lenient=True).skipped == ()


def test_vlsp_duplicates_found(vlsp_dir):
    duplicates = find_duplicate_sentences(load_corpus(vlsp_dir))
    assert duplicates, "the corpus has repeated sentences"
    assert all(len(ids) >= 2 for ids in duplicates.values())


def test_vlsp_sentence_files(vlsp_dir):
    assert len(read_sentences(vlsp_dir / "public_test.txt")) == 150
    assert len(read_sentences(vlsp_dir / "private_test.txt")) == 1200
    with pytest.raises(CorpusError, match="sentence-only file"):
        read_amr_file(vlsp_dir / "public_test.txt")
