"""Maximum Bayes SMATCH Ensemble (MBSE, Lee et al., 2022): per sentence, the consensus graph.

Given K candidate parsers (a search's best trials, best first, and optionally the graph of the
BM25-nearest training sentence), :func:`select` keeps for every sentence the candidate with the
highest mean SMATCH F against the other candidates of that sentence. It needs no gold graph:
the graph the candidates agree on most is the one expected to be closest to the truth.

* Pairwise F is the project's SMATCH (:func:`ray_mtup.scoring.score_pair`, deterministic), and
  symmetric in its definition, so each of the K(K-1)/2 pairs of a sentence is scored once.
* A candidate that cannot be parsed (``None``, or text smatch cannot read) counts as the empty
  graph, as in the search's objective: its F against anything is 0.
* Ties (equal mean F, e.g. K = 2, or two identical graphs) go to the better-ranked candidate,
  i.e. the first in the given order.

This module holds the pure selection only (no torch, no Ray): the ensemble command's plumbing,
parsing each trial's graphs with the predict path and scoring them, is :mod:`ray_mtup.ensemble_run`.

>>> r = select([["(a / x)", "(a / y)"], ["(a / x)", "(b / z)"], ["(b / x)", "(b / z)"]])
>>> r.choice
[0, 1]
>>> r.graphs
['(a / x)', '(b / z)']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError, ScoringError
from .scoring import DEFAULT_RESTARTS, DEFAULT_SEED, Score, score_pair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The ensemble's graphs and, per sentence, which candidate was kept and its mean F."""

    graphs: list[str | None]
    choice: list[int]  # index of the kept candidate, per sentence
    support: list[float]  # its mean F against the other candidates

    def wins(self, n_candidates: int) -> list[int]:
        """How many sentences each candidate was kept for."""
        counts = [0] * n_candidates
        for c in self.choice:
            counts[c] += 1
        return counts


def pair_f1(a: str | None, b: str | None, mode: str = "official", *, restarts: int = DEFAULT_RESTARTS,
            seed: int = DEFAULT_SEED) -> float:
    """SMATCH F of two candidate graphs; an unparsable (or ``None``) graph is empty: F 0.

    >>> pair_f1("(c / chó :mod (đ / đen))", "(x / chó :mod (y / trắng))")
    0.75
    >>> pair_f1("(c / chó)", None), pair_f1("not a graph (", "(c / chó)")
    (0.0, 0.0)
    """
    if a is None or b is None:
        return 0.0
    try:
        counts = score_pair(a, b, mode, restarts=restarts, seed=seed)
    except ScoringError:  # ``a`` (in the gold seat) cannot be read: the empty graph
        return 0.0
    return Score.from_pairs([counts], mode).f1


def support(graphs: Sequence[str | None], mode: str = "official", *, restarts: int = DEFAULT_RESTARTS,
            seed: int = DEFAULT_SEED) -> list[float]:
    """Mean F of each candidate against the others (one sentence), K(K-1)/2 SMATCH pairs.

    One candidate alone has support 0.0.
    """
    k = len(graphs)
    total = [0.0] * k
    for i in range(k):
        for j in range(i + 1, k):
            f = pair_f1(graphs[i], graphs[j], mode, restarts=restarts, seed=seed)
            total[i] += f
            total[j] += f
    return [t / (k - 1) if k > 1 else 0.0 for t in total]


def select(candidates: Sequence[Sequence[str | None]], mode: str = "official", *,
           restarts: int = DEFAULT_RESTARTS, seed: int = DEFAULT_SEED) -> Selection:
    """Per sentence, the candidate graph with the highest mean F against the others.

    ``candidates[c][s]`` is candidate ``c``'s graph of sentence ``s`` (``None``: unparsable);
    candidates are in rank order, best first, and a tie goes to the earlier one.
    """
    if not candidates:
        raise ConfigError("top", "the ensemble needs at least one candidate")
    n = len(candidates[0])
    lengths = sorted({len(c) for c in candidates})
    if len(lengths) > 1:
        raise ScoringError(f"the candidates parsed different numbers of sentences: {lengths}")
    graphs: list[str | None] = []
    choice: list[int] = []
    best_support: list[float] = []
    for s in range(n):
        column = [c[s] for c in candidates]
        sup = support(column, mode, restarts=restarts, seed=seed)
        best = max(range(len(column)), key=lambda i: (sup[i], -i))  # ties: the better-ranked one
        graphs.append(column[best])
        choice.append(best)
        best_support.append(sup[best])
    return Selection(graphs, choice, best_support)
