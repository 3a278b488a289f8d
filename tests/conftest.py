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
