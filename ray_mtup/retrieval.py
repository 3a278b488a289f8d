"""Retrieval-augmented MTUP: each prompt carries the k nearest training pairs (BM25).

:class:`PairIndex` is a BM25 index (the ``bm25s`` library) over the *training* sentences of a
run, built once per run; nothing of the validation or test split ever enters it.
:func:`attach` returns the examples with their neighbours in ``MtupExample.context``:

* a training example's neighbours never include itself, nor any other training pair with
  the same normalised sentence (duplicates always land on one side of the split, so a
  validation sentence never finds its own graph either; training must look like that);
* a validation (or test) sentence gets the k best training pairs;
* ``k = 0`` returns the examples unchanged: plain MTUP, byte-identical prompts.

Ties in BM25 score are broken by position in the training list, so the neighbours are
deterministic. Words are lower-cased syllables (``\\w+``): Vietnamese words of one letter count.

>>> from ray_mtup.corpus import MtupExample
>>> train = [MtupExample(f"t{i}", s, "a", "(x)", f"(x / x{i})") for i, s in
...          enumerate(["tôi đi học", "anh ấy đi làm", "con mèo ngủ", "tôi đi học"])]
>>> index = PairIndex(train)
>>> [p.id for p in index.neighbours("mèo ngủ", 1)]
['t2']
>>> [p.id for p in index.neighbours("tôi đi học", 2, exclude=train[0])]
['t1', 't2']
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

from .corpus import MtupExample, normalise_sentence
from .errors import ConfigError

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def words(sentence: str) -> list[str]:
    """BM25 terms of a sentence: lower-cased runs of word characters (syllables in Vietnamese)."""
    return _WORD.findall(sentence.lower())


class PairIndex:
    """BM25 over the training sentences; :meth:`neighbours` returns whole training pairs."""

    def __init__(self, train: Sequence[MtupExample]):
        import bm25s

        if not train:
            raise ConfigError("retrieval_k", "retrieval needs at least one training pair")
        self.pairs = list(train)
        self._keys = [normalise_sentence(p.sentence) for p in self.pairs]
        self._bm25 = bm25s.BM25()
        # Every sentence gets at least one term, so bm25s keeps the document list aligned.
        corpus = [words(p.sentence) or ["<empty>"] for p in self.pairs]
        self._bm25.index(corpus, show_progress=False)
        self._vocab = set(self._bm25.vocab_dict)

    def scores(self, sentence: str) -> list[float]:
        """BM25 score of every training sentence for ``sentence`` (0 for no shared word)."""
        query = [w for w in words(sentence) if w in self._vocab]
        if not query:
            return [0.0] * len(self.pairs)
        return [float(s) for s in self._bm25.get_scores(query)]

    def neighbours(self, sentence: str, k: int, exclude: MtupExample | None = None) -> list[MtupExample]:
        """The ``k`` best training pairs for ``sentence``, best first (ties: earlier pair first).

        ``exclude`` (a training example) removes that pair and every pair with its sentence.
        """
        if k <= 0:
            return []
        scores = self.scores(sentence)
        banned = normalise_sentence(exclude.sentence) if exclude is not None else None
        order = sorted(range(len(self.pairs)), key=lambda i: (-scores[i], i))
        out = []
        for i in order:
            if exclude is not None and (self.pairs[i].id == exclude.id or self._keys[i] == banned):
                continue
            out.append(self.pairs[i])
            if len(out) == k:
                break
        return out


def with_context(examples: Sequence[MtupExample], index: PairIndex | None, k: int,
                 training: bool) -> list[MtupExample]:
    """``examples`` with their ``k`` neighbours attached (training: own pair excluded)."""
    if k == 0 or index is None:
        return list(examples)
    return [dataclasses.replace(ex, context=tuple(
        (p.sentence, p.task2) for p in index.neighbours(ex.sentence, k, exclude=ex if training else None)))
        for ex in examples]


def attach(k: int, train: Sequence[MtupExample], *others: Sequence[MtupExample]
           ) -> tuple[list[MtupExample], ...]:
    """Index ``train`` once; return ``train`` and each of ``others`` with neighbours attached.

    ``k = 0`` returns copies of the inputs unchanged (plain MTUP) and builds no index.
    """
    if k < 0:
        raise ConfigError("retrieval_k", f"must be >= 0, got {k}")
    index = PairIndex(train) if k > 0 else None
    if index is not None:
        logger.info("retrieval: BM25 index of %d training pairs, k=%d", len(index.pairs), k)
    return (with_context(train, index, k, training=True),
            *(with_context(o, index, k, training=False) for o in others))
