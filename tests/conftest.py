"""Shared test fixtures: the tiny hand-written corpus and the (optional) VLSP corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_mtup.config import corpus_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

#: Malformed corpus fixtures in fixtures/bad/: (file, 1-based line of the error, reason).
MALFORMED_CORPORA = [
    ("bad_utf8.txt", 3, "not valid UTF-8"),
    ("empty.txt", 1, "empty file"),
    ("no_snt.txt", 5, "graph without a preceding #::snt"),
    ("unbalanced.txt", 6, "unbalanced parentheses"),
    ("snt_without_graph.txt", 5, "#::snt line without a graph"),
    ("sentence_only.txt", 1, "sentence-only file"),
]


def _vlsp_dir() -> Path:
    """RAY_MTUP_DATA_DIR if set, else ../shared/data/vlsp2025 next to the repository."""
    return corpus_dir(None, default=REPO_ROOT.parent / "shared/data/vlsp2025")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: mini_amr.txt, mini_sentences.txt and bad/ (one malformed case each)."""
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def vlsp_dir() -> Path:
    """The VLSP 2025 corpus directory; skips the test when it is absent."""
    path = _vlsp_dir()
    if not (path / "train_amr_1.txt").is_file():
        pytest.skip(f"VLSP corpus not found at {path} (set RAY_MTUP_DATA_DIR)")
    return path


#: A small shape for checkpoints written by tests (the tiny model's architecture, fewer weights).
SMALL_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 800}


@pytest.fixture(scope="session")
def qwen_like_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory laid out like Qwen2.5-Instruct's (Qwen2 architecture, safetensors,
    byte-level BPE with <|endoftext|>/<|im_end|> and a chat template, generation_config.json with
    Qwen's sampling defaults), written by the project's own writer from the shipped sample corpus."""
    from ray_mtup.config import SAMPLE_DATA_DIR, TinyModelSettings
    from ray_mtup.dataset import tokenizer_texts, to_mtup
    from ray_mtup.corpus import load_corpus
    from ray_mtup.modeling import write_tiny_checkpoint

    texts = tokenizer_texts(to_mtup(load_corpus(SAMPLE_DATA_DIR)))
    return write_tiny_checkpoint(TinyModelSettings(**SMALL_TINY), 0, texts,
                                 cache_dir=tmp_path_factory.mktemp("checkpoints"))
