"""Tests of the command line's ``evaluate`` subcommand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mtup.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

GOLD = [
    "(đ / đi-01\n    :ARG0(t / tôi)\n    :ARG1(c / chợ))",  # 6 triples
    "(c / chủ tịch\n    :mod(n / nước))",  # 4 triples
    "(a / ăn-01 :ARG0 (m / mèo) :ARG1 (c / cá) :time (s / sáng))",  # 8 triples
]
PRED = [
    "(đ / đi-01 :ARG0 (t / tôi) :ARG1 (n / nhà))",  # 5 of 6
    "(c / chủ_tịch :mod (n / nước))",  # official: 3 of 4 (concept differs); normalised: 4 of 4
    "không phải đồ thị",  # invalid: 0 of 8
]


def _write(path: Path, graphs: list[str]) -> Path:
    text = "\n".join(f"#::snt câu {i} .\n{g}\n" for i, g in enumerate(graphs))
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))  # CRLF, like the corpus
    return path


@pytest.fixture
def files(tmp_path):
    return _write(tmp_path / "gold.txt", GOLD), _write(tmp_path / "pred.txt", PRED)


def test_evaluate_json(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "official"
    assert (result["n_pairs"], result["n_valid"]) == (3, 2)
    assert result["recall"] == (5 + 3) / (6 + 4 + 8)
    assert result["precision"] == (5 + 3) / (6 + 4)


def test_evaluate_normalised_mode(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--mode", "normalised", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "normalised"
    assert result["recall"] == (5 + 4) / (6 + 4 + 8)


def test_evaluate_table_names_mode_and_interval(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "mode: official" in out
    assert "f1" in out and "95% CI" in out and "noise" in out
    assert "valid graphs: 2" in out


def test_count_mismatch_is_error_exit_2(tmp_path, capsys):
    gold = _write(tmp_path / "gold.txt", GOLD)
    pred = _write(tmp_path / "pred.txt", PRED[:2])
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "gold.txt" in err and "pred.txt" in err


def test_missing_file_is_error_exit_2(tmp_path, capsys):
    gold = _write(tmp_path / "gold.txt", GOLD)
    assert main(["evaluate", "--gold", str(gold), "--pred", str(tmp_path / "nope.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["evaluate", "--gold", "g.txt", "--pred", "p.txt", "--mode", "strict"]) == 2


def test_parser_accepts_more_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "evaluate" in sub.choices


def test_python_dash_m_evaluate_json(files):
    gold, pred = files
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_mtup", "evaluate", "--gold", str(gold), "--pred", str(pred), "--json"],
        capture_output=True, text=True, encoding="utf-8", cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["mode"] == "official"
    assert (result["n_pairs"], result["n_valid"]) == (3, 2)
    assert result["f1"] == pytest.approx(2 * 8 / (10 + 18))


@pytest.mark.parametrize("mode", ["official", "normalised"])
def test_evaluate_gold_against_itself_is_one_and_repair_is_opt_in(files, capsys, mode):
    gold, _ = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(gold), "--mode", mode, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == 1.0
    assert main(["evaluate", "--gold", str(gold), "--pred", str(gold), "--mode", mode, "--repair", "--json"]) == 0
    repaired = json.loads(capsys.readouterr().out)
    # repair joins 'chủ tịch' into 'chủ_tịch': official charges it, normalised does not
    assert repaired["repair"] is True and (repaired["f1"] == 1.0) == (mode == "normalised")


def test_evaluate_reports_sentence_lines_that_differ_from_gold(files, capsys, tmp_path):
    gold, pred = files
    dotted = tmp_path / "dotted.txt"
    dotted.write_text(pred.read_text(encoding="utf-8").replace("câu 2 .", "câu 2 .."), encoding="utf-8")
    assert main(["evaluate", "--gold", str(gold), "--pred", str(dotted)]) == 0
    out = capsys.readouterr().out
    assert "1 #::snt lines differ from the gold sentences" in out and f"{dotted}:" in out
    assert main(["evaluate", "--gold", str(gold), "--pred", str(dotted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sentence_mismatches"]["count"] == 1
