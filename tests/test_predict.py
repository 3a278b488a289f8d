"""After training, in-process (no Ray): ``predict`` and the held-out test figure on an adapter
saved by the project's own checkpoint writer over a Qwen-like checkpoint on disk (the
loading and generation path of a real run).

* the test figure is scored by the objective's rule (an unreadable output is an empty,
  invalid graph), with the written file's figure beside it under its own name;
* ``predict`` checks its output path before it loads a model;
* ``predict`` feeds the model the corpus form of its input (``--raw-input`` not), keeps the
  sentence as given in ``#::snt``, warns on raw segmented/capitalised input, and reads gold files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_mtup import cli, corpus, holdout, predict, scoring
from ray_mtup.config import resolve_config
from ray_mtup.evaluation import score_epoch
from ray_mtup.generation import Parsed

GOLD = ["(c / chó)", "(m / mèo :mod (đ / đen))", "(t / tôi)"]


@pytest.fixture(scope="module")
def adapter(qwen_like_checkpoint, tmp_path_factory) -> Path:
    """An (untrained) adapter of ``--model qwen2.5-1.5b --model-path <Qwen-like checkpoint>``
    on the sample corpus, saved as a run's checkpoint: its outputs are mostly unreadable."""
    import torch

    from ray_mtup.checkpointing import save_checkpoint, trainable_state
    from ray_mtup.modeling import WeightsSource, apply_lora, build_model, build_tokenizer

    cfg = resolve_config("qwen2.5-1.5b", overrides={
        "model_path": str(qwen_like_checkpoint), "max_samples": 60, "test_split": 0.1, "max_new_tokens": 12,
        "eval_batch_size": 8, "lora.r": 4, "lora.alpha": 8})
    source = WeightsSource(str(qwen_like_checkpoint))
    tokenizer = build_tokenizer(source)
    torch.manual_seed(0)
    model = apply_lora(build_model(source, cfg, tokenizer, "cpu"), cfg.lora)
    state = {"epoch": 1, "global_step": 1, "history": [{"epoch": 1}], "config": cfg.to_dict(),
             "base_source": str(qwen_like_checkpoint), "max_new_tokens": 12}
    directory = tmp_path_factory.mktemp("run") / "adapter"
    save_checkpoint(directory, model, tokenizer, state, trainable_state(model), [])
    return directory


# --------------------------------------------------------------------------- the test figure


def test_placeholders_earn_no_credit_in_the_test_figure_only_in_the_submitted_one():
    """The issue's case: every output unreadable, so predict writes the placeholder for each."""
    test = [corpus.Example(f"t:{i}", "x", g, "t.txt", i) for i, g in enumerate(GOLD)]
    result = holdout.score_parses(test, [None] * 3, [predict.FALLBACK_GRAPH] * 3, "official")
    assert result["task2_f1"] == 0.0 and result["validity"] == 0.0
    assert result["submitted"]["task2_f1"] == pytest.approx(
        scoring.score_corpus(GOLD, [predict.FALLBACK_GRAPH] * 3).f1) and result["submitted"]["task2_f1"] > 0.2
    assert all(r["task2_f1"] == 0.0 and r["gold"] for r in result["predictions"])
    line = holdout.format_test_line(0.0, {**result, "test_set": "test split"})
    assert "test Task 2 F1 0.0000" in line and "placeholders included" in line


def test_test_figure_and_validation_follow_one_rule():
    """The same outputs score the same in validation (score_epoch) and as the test figure."""
    test = [corpus.Example(f"t:{i}", "x", g, "t.txt", i) for i, g in enumerate(GOLD)]
    task2 = ["(c / chó)", None, "(x / tôi :mod (y / to))"]
    parsed = [Parsed("", None, g, False) for g in task2]
    metrics, pairs = score_epoch(resolve_config("tiny"), GOLD, parsed, val_loss=1.0)
    result = holdout.score_parses(test, task2, [g or predict.FALLBACK_GRAPH for g in task2], metrics["scoring_mode"])
    assert result["task2_f1"] == pytest.approx(metrics["task2_f1"])
    assert result["validity"] == pytest.approx(metrics["validity"]) == pytest.approx(2 / 3)
    assert [r["task2_f1"] for r in result["predictions"]] == [p.f1 for p in pairs]


def test_test_figure_of_an_adapter_scores_unreadable_outputs_as_empty(adapter, tmp_path):
    result = holdout.score_on_test(adapter, out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / holdout.TEST_PREDICTIONS).read_text().splitlines()]
    assert result["predictions_file"] == str(tmp_path / holdout.TEST_PREDICTIONS) and "predictions" not in result
    assert len(records) == result["n_graphs"] > 0
    rescored = scoring.score_corpus([r["gold"] for r in records], [r["task2_graph"] for r in records],
                                    mode=result["scoring_mode"])
    assert result["task2_f1"] == pytest.approx(rescored.f1)
    assert result["validity"] == pytest.approx(rescored.validity)
    assert result["n_minimal"] == sum(r["submitted_graph"] == predict.FALLBACK_GRAPH for r in records) > 0
    assert all(r["task2_graph"] is None for r in records if r["submitted_graph"] == predict.FALLBACK_GRAPH)
    assert result["validity"] <= 1 - result["n_minimal"] / len(records)  # a placeholder is invalid
    assert {"id", "sentence", "model_input", "raw", "task2_f1", "submitted_f1"} <= set(records[0])


# --------------------------------------------------------------------------- the output path


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_predict_checks_its_output_before_loading_a_model(adapter, fixtures_dir, tmp_path, monkeypatch, capsys,
                                                           where):
    monkeypatch.setattr(predict, "load_merged", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("x")
    output = tmp_path if where == "directory" else tmp_path / "file" / "out.txt"
    code = cli.main(["predict", "--adapter", str(adapter), "--input", str(fixtures_dir / "mini_sentences.txt"),
                     "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: output: ") and str(output if where == "directory" else tmp_path / "file") in err


# --------------------------------------------------------------------------- the input


def test_corpus_form_of_the_vlsp_test_files_style():
    assert corpus.to_corpus_form("Cả phòng nhao_nhao : - Quan về !") == "cả phòng nhao nhao : - quan về !"
    assert corpus.to_corpus_form('Anh nói: "Đi thôi."') == 'anh nói : " đi thôi . "'
    assert corpus.to_corpus_form("Đi vắng mãi!") == "đi vắng mãi !"
    assert corpus.to_corpus_form("giá 3,5 triệu ở tp. hcm ...") == "giá 3,5 triệu ở tp. hcm ..."


def test_corpus_sentences_are_their_own_corpus_form(fixtures_dir):
    """The training sentences (here the hand-written fixture's) are left as they are, but for case."""
    for ex in corpus.read_amr_file(fixtures_dir / "mini_amr.txt"):
        assert corpus.to_corpus_form(ex.sentence) == ex.sentence.lower()


def test_vlsp_training_sentences_are_their_own_corpus_form_and_the_test_files_are_not(vlsp_dir):
    train = [ex.sentence for f in ("train_amr_1.txt", "train_amr_2.txt") for ex in corpus.read_amr_file(vlsp_dir / f)]
    beyond_case = [s for s in train if corpus.to_corpus_form(s) != " ".join(s.lower().replace("_", " ").split())]
    assert beyond_case == [next(s for s in train if "hơn," in s)]  # the corpus's one 'word,' typo
    assert sum(map(corpus.looks_unlike_corpus, train)) < 0.02 * len(train)
    private = [ex.sentence for ex in corpus.read_sentences(vlsp_dir / "private_test.txt")]
    assert sum(map(corpus.looks_unlike_corpus, private)) > 0.9 * len(private)
    assert not any(map(corpus.looks_unlike_corpus, map(corpus.to_corpus_form, private)))


@given(st.text(alphabet="aăđeêoơTHÊ_ .,!?:\"(-", max_size=40))
def test_corpus_form_is_idempotent_and_keeps_every_letter(text):
    once = corpus.to_corpus_form(text)
    assert corpus.to_corpus_form(once) == once
    assert once.replace(" ", "").replace("_", "") == text.lower().replace(" ", "").replace("_", "")
    assert not any(c.isupper() for c in once)


def test_raw_input_warns_when_over_a_tenth_looks_segmented_or_capitalised(caplog):
    plain = ["tôi đi học ."] * 18
    with caplog.at_level(logging.WARNING, logger="ray_mtup.predict"):
        assert predict.model_inputs(plain + ["Tôi đi ."] * 2, raw_input=True)[-1] == "Tôi đi ."  # 10%: quiet
        assert not caplog.records
        predict.model_inputs(plain + ["Tôi đi ."] * 2 + ["thế_thì sao ?"], raw_input=True)
    assert "3 of 21 input lines" in caplog.text and "--raw-input" in caplog.text


def _spy(monkeypatch) -> list[list[str]]:
    """Record what parse_sentences (unchanged) is given: the sentences the model reads."""
    seen: list[list[str]] = []
    real = predict.parse_sentences

    def spy(model, tokenizer, cfg, sentences, *args, **kwargs):
        seen.append(list(sentences))
        return real(model, tokenizer, cfg, sentences, *args, **kwargs)

    monkeypatch.setattr(predict, "parse_sentences", spy)
    return seen


def test_predict_feeds_the_corpus_form_and_writes_the_sentence_as_given(adapter, tmp_path, monkeypatch, caplog):
    lines = ["Hắn trợn mắt lên quát : - Thế_thì thằng nào ăn đi ?", "Cậu làm gì?", "tôi đi chợ ."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen = _spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ray_mtup.predict"):
        report = predict.predict_file(adapter, tmp_path / "in.txt", tmp_path / "out.txt", max_new_tokens=4, device="cpu")
    assert seen == [["hắn trợn mắt lên quát : - thế thì thằng nào ăn đi ?", "cậu làm gì ?", "tôi đi chợ ."]]
    assert "input normalised" in caplog.text and "2 of 3 lines changed" in caplog.text
    assert (report.input_normalised, report.n_input_changed) == (True, 2)
    assert [b.sentence for b in scoring.read_blocks(tmp_path / "out.txt")] == lines
    raw = predict.predict_file(adapter, tmp_path / "in.txt", tmp_path / "raw.txt", max_new_tokens=4, raw_input=True,
                                 device="cpu")
    assert seen[-1] == lines and not raw.input_normalised


def test_predict_reads_the_sentences_of_a_gold_file(adapter, fixtures_dir, tmp_path):
    gold = corpus.read_amr_file(fixtures_dir / "mini_amr.txt")
    report = predict.predict_file(adapter, fixtures_dir / "mini_amr.txt", tmp_path / "out.txt", max_new_tokens=4,
                                  device="cpu")
    assert report.n_sentences == len(gold)
    assert [b.sentence for b in scoring.read_blocks(tmp_path / "out.txt")] == [ex.sentence for ex in gold]
    # and so the written file scores against that gold file, aligned by sentence
    assert scoring.evaluate_files(fixtures_dir / "mini_amr.txt", tmp_path / "out.txt")["n_pairs"] == len(gold)
