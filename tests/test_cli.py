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


# --------------------------------------------------------------------------- two systems, worst sentences


def test_compare_two_files_reports_both_f_the_difference_and_a_paired_interval(files, capsys):
    gold, pred = files
    args = ["evaluate", "--gold", str(gold), "--pred", str(pred), "--pred", str(gold), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    a, b = result["systems"]
    assert (a["pred_path"], b["pred_path"]) == (str(pred), str(gold))
    assert a["f1"] == pytest.approx(2 * 8 / (10 + 18)) and b["f1"] == 1.0
    assert result["delta_f1"] == pytest.approx(a["f1"] - b["f1"])
    assert result["ci_resamples"] == 1000 and result["n_pairs"] == 3
    # every sentence of A scores below gold on itself, so every resample's difference is negative
    assert result["delta_ci_low"] <= result["delta_f1"] <= result["delta_ci_high"] < 0
    assert result["beyond_noise"] is True
    # each system keeps its own (unpaired) interval, from the same resamples' count
    assert a["ci_low"] <= a["f1"] <= a["ci_high"] and b["ci_low"] == b["ci_high"] == 1.0


def test_compare_a_file_with_itself_is_a_zero_difference_within_noise(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--pred", str(pred), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "A - B     +0.0000  95% CI [+0.0000, +0.0000]" in out and "50 resamples" in out
    assert "within noise" in out and str(pred) in out


def test_compare_reports_a_file_in_another_order_and_scores_it_by_order(files, tmp_path, capsys):
    gold, pred = files
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(f"#::snt câu {i} .\n{PRED[i]}\n" for i in (1, 0, 2)), encoding="utf-8")
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--pred", str(shuffled), "--json"]) == 0
    a, b = json.loads(capsys.readouterr().out)["systems"]
    assert a["sentence_mismatches"]["count"] == 0 and b["sentence_mismatches"]["count"] == 2
    assert "shuffled.txt" in b["sentence_mismatches"]["first"]
    assert b["f1"] < a["f1"]  # pairs by position, as smatch: the swapped graphs score against the wrong gold


def test_more_than_two_predictions_is_an_error(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold)] + ["--pred", str(pred)] * 3) == 2
    assert "error: pred: give one --pred file, or two to compare; got 3" in capsys.readouterr().err


def test_show_lists_the_worst_sentences_with_gold_prediction_and_f(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--show", "2", "--json"]) == 0
    worst = json.loads(capsys.readouterr().out)["worst"]
    # the invalid prediction (F 0), then 'chủ_tịch' (3 of 4: F 0.75); 'đi chợ' (5 of 6: F 0.909) is not shown
    assert [w["id"] for w in worst] == ["gold:3", "gold:2"]
    assert worst[0] == {"id": "gold:3", "sentence": "câu 2 .", "gold": GOLD[2], "prediction": PRED[2], "f1": 0.0,
                        "matched": 0, "predicted_triples": 0, "gold_triples": 8, "valid": False}
    assert worst[1]["f1"] == pytest.approx(2 * 3 / (4 + 4)) and worst[1]["prediction"] == PRED[1]
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "worst 1 of 3 sentences" in out and "gold:3  F 0.0000" in out and "not a graph" in out
    assert "sentence    câu 2 ." in out and "prediction  không phải đồ thị" in out
    assert "gold        (a / ăn-01 :ARG0 (m / mèo)" in out and "gold:2" not in out


def test_show_with_two_files_lists_each_files_worst(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--pred", str(gold), "--show", "1",
                 "--json"]) == 0
    a, b = json.loads(capsys.readouterr().out)["systems"]
    assert [w["id"] for w in a["worst"]] == ["gold:3"]
    assert b["worst"][0]["f1"] == 1.0  # gold against itself: its "worst" is still perfect


def test_show_negative_is_an_error(files, capsys):
    gold, pred = files
    assert main(["evaluate", "--gold", str(gold), "--pred", str(pred), "--show", "-1"]) == 2
    assert "error: show: must be >= 0" in capsys.readouterr().err
