"""Selection apart from reporting: the test split, the fixed evaluation subset, one schedule
horizon for every trial of a search, and the noise analysis paired by sentence id."""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import pytest

from ray_mtup import scoring
from ray_mtup.amr import concept_style
from ray_mtup.config import SAMPLE_DATA_DIR, TinyModelSettings, TrainConfig
from ray_mtup.corpus import Example, load_corpus, normalise_sentence, write_amr_file
from ray_mtup.dataset import corpus_splits, split_corpus, stratified_indices
from ray_mtup.errors import ConfigError, ScoringError
from ray_mtup.search import ParamSpec, SearchSpace, common_horizon
from ray_mtup.training import plan_schedule
from ray_mtup.trial import apply_sampled


def _corpus(n_lit: int = 126, n_news: int = 60, dup_every: int = 9) -> list[Example]:
    lit = [Example(f"lit:{i}", f"câu {i // 2 if i % dup_every == 0 else i}", "(x / y)", "lit.txt", i)
           for i in range(n_lit)]
    news = [Example(f"news:{i}", f"tin {i}", "(x / y)", "news.txt", i) for i in range(n_news)]
    return lit + news


def test_test_split_is_seeded_stratified_and_keeps_duplicates_on_one_side():
    examples = _corpus()
    train, val, test = split_corpus(examples, 0.1, 0.1, seed=5)
    assert sorted(e.id for e in train + val + test) == sorted(e.id for e in examples)
    assert Counter(e.source for e in test) == {"lit.txt": 13, "news.txt": 6}  # 10% of each file
    sides = [{normalise_sentence(e.sentence) for e in part} for part in (train, val, test)]
    assert not (sides[0] & sides[2] or sides[1] & sides[2] or sides[0] & sides[1])
    assert split_corpus(examples, 0.1, 0.1, seed=5) == (train, val, test)
    assert [e.id for e in split_corpus(examples, 0.1, 0.1, seed=6)[2]] != [e.id for e in test]


def test_test_file_replaces_the_split(tmp_path):
    gold = tmp_path / "public_gold.txt"
    write_amr_file(gold, [("chủ tịch nói .", "(n / nói\n    :agent(c / chủ tịch))")])
    cfg = TrainConfig(test_file=str(gold))
    train, val, test = corpus_splits(cfg)
    assert [e.sentence for e in test] == ["chủ tịch nói ."]
    assert len(train) + len(val) == len(load_corpus(SAMPLE_DATA_DIR))  # nothing else held out
    with pytest.raises(ConfigError, match="test_split"):
        TrainConfig(val_split=0.5, test_split=0.5)
    with pytest.raises(ConfigError, match="test_file"):
        TrainConfig(test_file=str(tmp_path / "missing.txt"))


def test_evaluation_subset_is_stratified_and_the_same_for_every_trial():
    # a validation split ordered by source file, as the corpus is: a prefix would be all 'lit'
    sources = ["lit.txt"] * 126 + ["news.txt"] * 24
    idx = stratified_indices(sources, 60, seed=42)
    assert Counter(sources[i] for i in idx) == {"lit.txt": 50, "news.txt": 10}
    base = TrainConfig(eval_max_samples=40, test_split=0.1)  # the sample corpus: 20 news graphs in 470
    a = apply_sampled(base.to_dict(), {"learning_rate": 1e-3, "epochs": 2})
    b = apply_sampled(base.to_dict(), {"learning_rate": 5e-4, "epochs": 3, "lora_r": 16})
    first_a, first_b = corpus_splits(a)[1][:40], corpus_splits(b)[1][:40]
    assert first_a == first_b and len({e.source for e in first_a}) == 2


def _lr_multipliers(cfg: TrainConfig, steps: int) -> list[float]:
    """The learning-rate multiplier of each optimizer step, as the training loop schedules it
    (10 steps per epoch: 40 micro-batches at accumulation 4)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    schedule = plan_schedule(cfg, 40, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, schedule.warmup_steps, schedule.total_steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_trials_of_different_lengths_share_the_learning_rate_at_every_step():
    space = SearchSpace("s.yaml", {"epochs": ParamSpec("epochs", "randint", 4, 6),
                                   "learning_rate": ParamSpec("learning_rate", "loguniform", 1e-4, 1e-3)})
    base = common_horizon(TrainConfig(), space)
    short = apply_sampled(base.to_dict(), {"epochs": 4, "learning_rate": 1e-3})
    long = apply_sampled(base.to_dict(), {"epochs": 6, "learning_rate": 1e-3})
    assert (short.epochs, long.epochs, short.schedule_epochs, long.schedule_epochs) == (4, 6, 6, 6)
    f_short, f_long = _lr_multipliers(short, 40), _lr_multipliers(long, 40)
    assert f_short == f_long
    assert f_short[39] > 0.2  # at the short trial's last step the LR has not decayed to 0
    own = _lr_multipliers(TrainConfig(epochs=4), 40)  # the old per-trial schedule, for contrast
    assert own[30] < f_short[30]


def _record(tmp_path, name: str, preds: list[dict], cfg: TrainConfig):
    from ray_mtup.reporting import TrialRecord
    from ray_mtup.checkpointing import PREDICTIONS_JSONL

    ckpt = tmp_path / name
    ckpt.mkdir()
    (ckpt / PREDICTIONS_JSONL).write_text("".join(json.dumps(p) + "\n" for p in preds), encoding="utf-8")
    history = [{"epoch": 1, "objective": 0.5, "task2_f1": 0.5, "checkpoint_path": str(ckpt)}]
    return TrialRecord(name, 1, {}, cfg, history, "TERMINATED", "", 1.0)


def test_noise_analysis_pairs_predictions_with_gold_by_sentence_id(tmp_path):
    from ray_mtup.reporting import noise_analysis

    cfg = TrainConfig()
    val = corpus_splits(cfg)[1]
    preds = [{"id": e.id, "task2_graph": e.amr} for e in val]
    shuffled = list(reversed(preds))
    shuffled[0] = {**shuffled[0], "task2_graph": None}  # one invalid prediction in the other trial
    out = noise_analysis(_record(tmp_path, "best", preds, cfg), _record(tmp_path, "first", shuffled, cfg))
    assert out["task2_f1"] == 1.0 and out["n_sentences"] == len(val)  # order does not matter: ids do
    low, high = out["vs_documented_optimum"]["delta_ci95"]
    assert 0.0 <= low <= high
    stray = preds[:-1] + [{"id": "train_amr_1:99999", "task2_graph": "(x / y)"}]
    with pytest.raises(ScoringError, match="train_amr_1:99999"):
        noise_analysis(_record(tmp_path, "stray", stray, cfg), None)
    with pytest.raises(ScoringError, match="different sentences"):
        noise_analysis(_record(tmp_path, "b2", preds, cfg), _record(tmp_path, "f2", preds[1:], cfg))


def test_space_concepts_are_what_the_shared_task_scores(tmp_path):
    gold_graph = "(n / nói\n    :agent(c / chủ tịch))"
    ours = "(n / nói\n    :agent (c / chủ_tịch))"  # a repaired, canonical prediction
    golds = {"s:1": gold_graph}
    official = {style: scoring.Score.from_pairs(list(scoring.score_by_id(
        golds, {"s:1": concept_style(ours, style)}, "official").values()), "official").f1 for style in ("space", "_")}
    assert official["space"] == 1.0 and official["_"] < 1.0


def test_predict_writes_space_concepts_by_default(tmp_path):
    from ray_mtup.cli import build_parser
    from ray_mtup.predict import write_parses

    args = build_parser().parse_args(["predict", "--run", "r", "--input", "i", "--output", "o"])
    assert args.concept_style == "space"
    gold = tmp_path / "gold.txt"
    write_amr_file(gold, [("chủ tịch nói .", "(n / nói\n    :agent(c / chủ tịch))")])
    ours = ["(n / nói\n    :agent (c / chủ_tịch))"]
    f1 = {style: scoring.evaluate_files(gold, write_parses(tmp_path / f"{style}.txt", ["chủ tịch nói ."], ours,
                                                          style))["f1"] for style in ("space", "_")}
    assert f1["space"] == 1.0 and f1["_"] < 1.0


def _small_corpus(directory: Path, n1: int, n2: int) -> Path:
    """A corpus directory laid out like the VLSP one: the sample corpus's first graphs."""
    from ray_mtup.corpus import DEFAULT_TRAIN_FILES

    directory.mkdir()
    examples = load_corpus(SAMPLE_DATA_DIR)
    for name, part in zip(DEFAULT_TRAIN_FILES, (examples[:n1], examples[n1:n1 + n2])):
        write_amr_file(directory / name, [(e.sentence, e.amr) for e in part])
    return directory


def test_one_corpus_lookup_for_the_splits_the_launcher_and_the_worker(tmp_path, monkeypatch, caplog):
    """data_dir, else $RAY_MTUP_DATA_DIR, else the sample corpus: in corpus_splits, in the
    launcher's config and in ``python -m ray_mtup.worker``'s, which warns when it falls back."""
    from ray_mtup.config import DATA_DIR_ENV
    from ray_mtup.launcher import build_parser, config_from_args
    from ray_mtup.worker import corpus_config

    env_dir = _small_corpus(tmp_path / "env", 30, 10)
    flag_dir = _small_corpus(tmp_path / "flag", 20, 10)
    monkeypatch.setenv(DATA_DIR_ENV, str(env_dir))
    train, val, test = corpus_splits(TrainConfig(val_split=0.2, test_split=0.1))
    assert len(train) + len(val) + len(test) == 40  # the environment's corpus, not the sample
    launched = config_from_args(build_parser().parse_args(["--model", "tiny"]))
    assert launched.data_dir == str(env_dir) == corpus_config(TrainConfig()).data_dir
    flagged = config_from_args(build_parser().parse_args(["--model", "tiny", "--data-dir", str(flag_dir)]))
    assert corpus_config(flagged).data_dir == flagged.data_dir == str(flag_dir)  # data_dir beats the variable
    assert sum(map(len, corpus_splits(flagged))) == 30

    monkeypatch.delenv(DATA_DIR_ENV)
    with caplog.at_level("WARNING", logger="ray_mtup.worker"):
        assert corpus_config(TrainConfig()).data_dir is None
    assert "sample corpus" in caplog.text and DATA_DIR_ENV in caplog.text
    assert sum(map(len, corpus_splits(TrainConfig()))) == len(load_corpus(SAMPLE_DATA_DIR))


def test_the_evaluation_subset_is_cut_in_one_place():
    """The loop scores, and the search's baseline answers, the same validation graphs:
    dataset.evaluation_subset of the validation split."""
    from ray_mtup.dataset import evaluation_subset, load_examples
    from ray_mtup.reporting import most_frequent_graph_baseline
    from ray_mtup.training import prepare_data

    cfg = TrainConfig(eval_max_samples=12, tiny=TinyModelSettings(hidden_size=32, num_layers=1, num_heads=2,
                                                                   intermediate_size=64, vocab_size=400))
    _, val, gold = load_examples(cfg)
    data = prepare_data(cfg)[0]
    assert len(val) > 12 and [e.id for e in data.eval] == [e.id for e in evaluation_subset(cfg, val)]
    assert len(data.eval) == 12 and data.eval_gold == gold[:12] and len(data.val) == len(val)
    assert most_frequent_graph_baseline(cfg)["n_sentences"] == 12
    everything = cfg.replace(eval_max_samples=None)
    assert len(prepare_data(everything)[0].eval) == len(val)


def test_checking_the_corpus_builds_no_retrieval_index(monkeypatch):
    """Only preparing the training data attaches neighbours; the launcher's corpus check and
    load_examples do not build a BM25 index."""
    from ray_mtup import retrieval
    from ray_mtup.dataset import load_examples, with_retrieval
    from ray_mtup.launcher import check_corpus

    built = []
    real = retrieval.PairIndex
    monkeypatch.setattr(retrieval, "PairIndex", lambda train: built.append(len(train)) or real(train))
    cfg = TrainConfig(retrieval_k=2)
    check_corpus(cfg)
    train, val, _ = load_examples(cfg)
    assert not built and all(e.context == () for e in train + val)
    train, val = with_retrieval(cfg, train, val)
    assert built == [len(train)] and all(len(e.context) == 2 for e in val)
