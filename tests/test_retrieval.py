"""Retrieval-augmented MTUP: BM25 neighbours from the training split only, own pair excluded."""

from __future__ import annotations

import pytest

from ray_mtup import dataset, retrieval
from ray_mtup.config import SEARCH_SPACES, TrainConfig, packaged_yaml
from ray_mtup.corpus import MtupExample
from ray_mtup.errors import ConfigError
from ray_mtup.prompts import get_template, render_inference
from ray_mtup.search import documented_optimum, load_search_space
from ray_mtup.dataset import load_examples
from ray_mtup.trial import apply_sampled


def _pair(i: int, sentence: str) -> MtupExample:
    return MtupExample(f"t{i}", sentence, "src", f"(c{i})", f"(x / c{i})")


@pytest.fixture(scope="module")
def split():
    """The sample corpus's seeded split with k = 2 neighbours attached, as training prepares it."""
    cfg = TrainConfig(retrieval_k=2)
    train, val, gold = load_examples(cfg)
    return (*dataset.with_retrieval(cfg, train, val), gold)


def test_training_example_never_retrieves_itself_or_its_duplicates():
    train = [_pair(0, "tôi đi học"), _pair(1, "tôi đi học"), _pair(2, "tôi đi làm"), _pair(3, "mèo ngủ")]
    out, = retrieval.attach(2, train)
    assert [c[0] for c in out[0].context] == ["tôi đi làm", "mèo ngủ"]
    for ex in out:
        assert ex.sentence not in [s for s, _ in ex.context]


def test_neighbours_come_from_the_training_split_only(split):
    train, val, _ = split
    train_pairs = {(ex.sentence, ex.task2) for ex in train}
    val_pairs = {(ex.sentence, ex.task2) for ex in val}
    assert all(len(ex.context) == 2 for ex in train + val)
    for ex in train + val:
        assert set(ex.context) <= train_pairs
        assert not set(ex.context) & val_pairs
    for ex in val:  # duplicates never cross the split, so a validation sentence never finds itself
        assert ex.sentence not in [s for s, _ in ex.context]


def test_training_neighbours_exclude_own_pair_on_the_corpus(split):
    train, _, _ = split
    for ex in train:
        assert (ex.sentence, ex.task2) not in ex.context


def test_k_zero_is_plain_mtup(split):
    train, val, _ = split
    plain_train, plain_val, _ = load_examples(TrainConfig(retrieval_k=0))
    assert all(ex.context == () for ex in plain_train + plain_val)
    assert [(e.id, e.task2) for e in plain_train] == [(e.id, e.task2) for e in train]
    t = get_template("v2_natural")
    assert render_inference(t, val[0].sentence, ()) == t.instruction.format(sentence=val[0].sentence) + t.step1_marker


def test_prompt_carries_the_neighbours_before_the_instruction(split):
    _, val, _ = split
    t = get_template("v4_compact")
    prompt = render_inference(t, val[0].sentence, val[0].context)
    assert prompt.startswith("Ví dụ: ")
    assert prompt.count("Ví dụ: ") == 2 and prompt.endswith(t.step1_marker)
    assert " ".join(val[0].context[0][1].split()) in prompt


def test_training_encoding_masks_the_neighbours(split, tmp_path):
    from ray_mtup.config import TinyModelSettings
    from ray_mtup.modeling import WeightsSource, build_tokenizer, write_tiny_checkpoint

    train, _, _ = split
    settings = TinyModelSettings(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=400)
    texts = [e.sentence for e in train] + [e.task2 for e in train]
    tok = build_tokenizer(WeightsSource(str(write_tiny_checkpoint(settings, 0, texts, cache_dir=tmp_path))))
    t = get_template("v2_natural")
    with_ctx = dataset.encode(tok, t, train[0])
    plain = dataset.encode(tok, t, MtupExample(*[getattr(train[0], f) for f in ("id", "sentence", "source",
                                                                                 "task1", "task2")]))
    # Same supervised completion, longer unsupervised prompt.
    assert [x for x in with_ctx.labels if x != dataset.IGNORE_INDEX] == [x for x in plain.labels
                                                                         if x != dataset.IGNORE_INDEX]
    assert len(with_ctx) > len(plain)


def test_retrieval_is_deterministic_with_ties_in_list_order():
    train = [_pair(i, "con mèo") for i in range(3)] + [_pair(3, "con chó")]
    a = retrieval.PairIndex(train)
    b = retrieval.PairIndex(list(train))
    assert [p.id for p in a.neighbours("con mèo đen", 3)] == ["t0", "t1", "t2"]
    assert [p.id for p in a.neighbours("xyz", 2)] == [p.id for p in b.neighbours("xyz", 2)] == ["t0", "t1"]


def test_one_letter_syllables_are_words():
    assert retrieval.words("Ở nhà, ý Tôi") == ["ở", "nhà", "ý", "tôi"]


def test_config_and_search_space():
    with pytest.raises(ConfigError, match="retrieval_k"):
        TrainConfig(retrieval_k=-1)
    with pytest.raises(ConfigError, match="retrieval_k"):
        retrieval.attach(-1, [_pair(0, "a")])
    cfg = apply_sampled(TrainConfig().to_dict(), {"retrieval_k": 2, "constrained_decoding": True})
    assert (cfg.retrieval_k, cfg.constrained_decoding) == (2, True)
    space = load_search_space(packaged_yaml(SEARCH_SPACES, "default"))
    assert set(space.params["retrieval_k"].values) == {0, 1, 2}
    first = documented_optimum(space, TrainConfig(model="qwen2.5-7b"))
    assert first["retrieval_k"] == 0 and first["constrained_decoding"] is False
