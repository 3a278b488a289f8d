"""From corpus examples to training batches: sample, split, render, tokenise, batch.

* :func:`select_and_split` draws a seeded subset (``max_samples``) and a seeded, shuffled
  validation split stratified over the source files; duplicate sentences always land on
  the same side, so validation never scores a sentence that was trained on.
* :func:`to_mtup` normalises each gold graph once (:func:`ray_mtup.amr.normalise`) and
  derives its task-1 form.
* :func:`encode` tokenises prompt and completion separately (so the boundary is exact and
  identical to inference, where the prompt is tokenised alone), appends EOS, and masks the
  prompt out of the labels.
* :class:`LengthGroupedBatches` forms length-grouped micro-batches, the same number on
  every rank, and :func:`collate` pads each only to its own longest member.

Pure Python apart from :func:`collate`, which imports torch lazily.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from . import amr
from .corpus import Example, normalise_sentence
from .errors import CorpusError
from .prompts import Template, render_training

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MtupExample:
    """One graph ready for MTUP: its normalised task-2 graph and derived task-1 form."""

    id: str
    sentence: str
    source: str
    task1: str
    task2: str
    #: Retrieved training pairs (sentence, task-2 graph) shown in the prompt (ray_mtup.retrieval).
    context: tuple[tuple[str, str], ...] = ()


def _stratified_sample(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    by_source: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_source[ex.source].append(ex)
    total = len(examples)
    chosen: list[Example] = []
    sources = sorted(by_source)
    quotas = {s: round(n * len(by_source[s]) / total) for s in sources}
    quotas[sources[-1]] = n - sum(quotas[s] for s in sources[:-1])
    for s in sources:
        pool = list(by_source[s])
        rng.shuffle(pool)
        chosen.extend(pool[: max(0, min(quotas[s], len(pool)))])
    return chosen


def select_and_split(
    examples: Sequence[Example], val_split: float, seed: int, max_samples: int | None = None
) -> tuple[list[Example], list[Example]]:
    """A seeded subset, then a shuffled validation split stratified over source files.

    Duplicate sentences are grouped and kept on one side.

    >>> exs = [Example(f"a:{i}", f"câu {i % 40}", "(x / y)", "a", i) for i in range(60)]
    >>> exs += [Example(f"b:{i}", f"tin {i}", "(x / y)", "b", i) for i in range(40)]
    >>> train, val = select_and_split(exs, 0.1, seed=1)
    >>> len(train) + len(val), len({e.source for e in val})
    (100, 2)
    >>> not ({e.sentence for e in train} & {e.sentence for e in val})
    True
    """
    rng = random.Random(seed)
    pool = list(examples)
    if max_samples is not None and max_samples < len(pool):
        pool = _stratified_sample(pool, max_samples, rng)
    groups: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for ex in pool:
        groups[(ex.source, normalise_sentence(ex.sentence))].append(ex)
    by_source: dict[str, list[list[Example]]] = defaultdict(list)
    # A duplicate sentence shared across sources is grouped under its first source.
    seen: dict[str, tuple[str, str]] = {}
    for key, members in groups.items():
        if key[1] in seen:
            groups[seen[key[1]]].extend(members)
            members.clear()
        else:
            seen[key[1]] = key
    for key, members in groups.items():
        if members:
            by_source[key[0]].append(members)
    train: list[Example] = []
    val: list[Example] = []
    for source in sorted(by_source):
        source_groups = by_source[source]
        rng.shuffle(source_groups)
        n_graphs = sum(len(g) for g in source_groups)
        target = max(1, round(val_split * n_graphs)) if n_graphs > 1 else 0
        taken = 0
        for g in source_groups:
            if taken < target:
                val.extend(g)
                taken += len(g)
            else:
                train.extend(g)
    if not train or not val:
        raise CorpusError(
            f"cannot split {len(pool)} graphs into train and validation with val_split={val_split}"
        )
    return train, val


def to_mtup(examples: Sequence[Example]) -> list[MtupExample]:
    """Normalise each gold graph and derive its task-1 form; errors name the file and line."""
    out = []
    for ex in examples:
        if ex.amr is None:
            raise CorpusError("expected a graph, found a sentence only", path=ex.source, line=ex.line)
        try:
            task2 = amr.normalise(ex.amr)
            task1 = amr.to_task1(task2)
        except amr.AmrError as exc:
            raise CorpusError(f"graph {ex.id}: {exc}", path=ex.source, line=ex.line) from exc
        out.append(MtupExample(ex.id, ex.sentence, ex.source, task1, task2))
    return out


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer: Any, template: Template, ex: MtupExample) -> Encoded:
    """Token ids of prompt + completion + EOS; labels are IGNORE_INDEX over the prompt."""
    rendered = render_training(template, ex.sentence, ex.task1, ex.task2, ex.context)
    prompt_ids = tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(rendered.completion, add_special_tokens=False)["input_ids"]
    completion_ids = list(completion_ids) + [tokenizer.eos_token_id]
    return Encoded(
        input_ids=list(prompt_ids) + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    )


def encode_all(
    tokenizer: Any, template: Template, examples: Sequence[MtupExample], max_seq_len: int
) -> tuple[list[Encoded], list[str]]:
    """Encode every example; those longer than ``max_seq_len`` are skipped, logged and returned.

    Truncating an AMR target would teach the model unbalanced graphs, so an over-long
    example is left out instead, and its id is returned so the caller reports the count.
    """
    kept, skipped = [], []
    for ex in examples:
        enc = encode(tokenizer, template, ex)
        if len(enc) > max_seq_len:
            skipped.append(ex.id)
            logger.warning("skipping %s: %d tokens > max_seq_len %d", ex.id, len(enc), max_seq_len)
        else:
            kept.append(enc)
    return kept, skipped


class LengthGroupedBatches:
    """Micro-batches of similar length, sharded so every rank gets the same number.

    Each epoch: shuffle (seed + epoch), cut into windows of ``50 * batch * world`` examples,
    sort each window by length, chop into batches, shuffle the batches, repeat a few from
    the start so their count divides by ``world_size``, and give rank r every world-th one.

    >>> lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    >>> b = LengthGroupedBatches(lengths, batch_size=2, rank=0, world_size=2, seed=0)
    >>> len(b), sorted(len(x) for x in b)
    (2, [2, 2])
    >>> all(abs(lengths[i] - lengths[j]) < 5 for i, j in b)
    True
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, window: int = 50):
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.window = window * batch_size * world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            chunk = sorted(order[start:start + self.window], key=lambda i: self.lengths[i])
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        short = (-len(batches)) % self.world_size
        return batches + batches[:short]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches()[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size


def collate(items: Sequence[Encoded], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad a micro-batch to its own longest member (dynamic padding)."""
    import torch

    width = max(len(x) for x in items)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x)
        ids[row, :n] = torch.tensor(x.input_ids)
        labels[row, :n] = torch.tensor(x.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def useful_token_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens over padded tokens for a list of index batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / padded if padded else 1.0
