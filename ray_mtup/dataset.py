"""From corpus examples to training batches: sample, split, render, tokenise, batch.

* :func:`split_corpus` draws a seeded subset (``max_samples``) and seeded, shuffled
  validation and test splits stratified over the source files; duplicate sentences always
  land on the same side, so neither held-out split scores a sentence that was trained on.
* :func:`stratified_indices` picks the fixed, seeded evaluation subset (``eval_max_samples``),
  stratified over the source files.
* :func:`to_mtup` normalises each gold graph once (:func:`ray_mtup.amr.normalise`) and
  derives its task-1 form.
* :func:`encode` tokenises prompt and completion separately (so the boundary is exact and
  identical to inference, where the prompt is tokenised alone), appends EOS, and masks the
  prompt out of the labels.
* :class:`LengthGroupedBatches` forms length-grouped micro-batches, the same number on
  every rank, and :func:`collate` pads each only to its own longest member
  (:func:`collate_packed`: one padding-free row instead, for ``packing``).

Pure Python apart from :func:`collate`, which imports torch lazily.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from . import amr, retrieval
from .config import corpus_dir
from .corpus import Example, MtupExample, load_corpus, normalise_sentence, read_amr_file
from .errors import CorpusError
from .prompts import TEMPLATES, Template, end_of_turn_id, render_training

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """``n`` shared over the sources in proportion to their counts (largest remainders).

    >>> _quotas({"a.txt": 1262, "b.txt": 580}, 60)
    {'a.txt': 41, 'b.txt': 19}
    """
    total = sum(counts.values())
    exact = {s: n * c / total for s, c in counts.items()}
    quotas = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (quotas[s] - exact[s], s))[: n - sum(quotas.values())]:
        quotas[s] += 1
    return quotas


def stratified_indices(sources: Sequence[str], n: int, seed: int) -> list[int]:
    """A seeded sample of ``n`` positions, stratified over ``sources`` (one per item), in order.

    The evaluation subset of ``eval_max_samples``: the same ``seed`` gives the same graphs
    to every trial of a search, and each source file keeps its share.

    >>> srcs = ["lit"] * 126 + ["news"] * 24
    >>> idx = stratified_indices(srcs, 60, seed=0)
    >>> len(idx), sum(srcs[i] == "news" for i in idx), idx == stratified_indices(srcs, 60, seed=0)
    (60, 10, True)
    """
    if n >= len(sources):
        return list(range(len(sources)))
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        by_source[source].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    quotas = _quotas({s: len(v) for s, v in by_source.items()}, n)
    for source in sorted(by_source):
        pool = list(by_source[source])
        rng.shuffle(pool)
        chosen.extend(pool[: quotas[source]])
    return sorted(chosen)


def _stratified_sample(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    idx = stratified_indices([ex.source for ex in examples], n, rng.randrange(2**31))
    return [examples[i] for i in idx]


def _duplicate_groups(pool: Sequence[Example]) -> dict[str, list[list[Example]]]:
    """Examples grouped by normalised sentence, per source; a sentence shared across
    sources is grouped under its first source."""
    groups: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for ex in pool:
        groups[(ex.source, normalise_sentence(ex.sentence))].append(ex)
    seen: dict[str, tuple[str, str]] = {}
    for key, members in groups.items():
        if key[1] in seen:
            groups[seen[key[1]]].extend(members)
            members.clear()
        else:
            seen[key[1]] = key
    by_source: dict[str, list[list[Example]]] = defaultdict(list)
    for key, members in groups.items():
        if members:
            by_source[key[0]].append(members)
    return by_source


def split_corpus(
    examples: Sequence[Example], val_split: float, test_split: float, seed: int, max_samples: int | None = None
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test): a seeded subset, then shuffled held-out splits stratified
    over source files, duplicate sentences kept on one side.

    ``test_split`` may be 0 (no test split: the test set is a separate file). The test
    graphs are never trained on, scored per epoch, or used to choose anything.

    >>> exs = [Example(f"a:{i}", f"câu {i % 40}", "(x / y)", "a", i) for i in range(60)]
    >>> exs += [Example(f"b:{i}", f"tin {i}", "(x / y)", "b", i) for i in range(40)]
    >>> train, val, test = split_corpus(exs, 0.1, 0.1, seed=1)
    >>> len(train) + len(val) + len(test), len({e.source for e in test})
    (100, 2)
    >>> sents = [{e.sentence for e in part} for part in (train, val, test)]
    >>> not (sents[0] & sents[1] or sents[0] & sents[2] or sents[1] & sents[2])
    True
    """
    rng = random.Random(seed)
    pool = list(examples)
    if max_samples is not None and max_samples < len(pool):
        pool = _stratified_sample(pool, max_samples, rng)
    by_source = _duplicate_groups(pool)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    for source in sorted(by_source):
        source_groups = by_source[source]
        rng.shuffle(source_groups)
        n_graphs = sum(len(g) for g in source_groups)
        targets = [(val, max(1, round(val_split * n_graphs)) if n_graphs > 1 else 0)]
        if test_split > 0:
            targets.insert(0, (test, max(1, round(test_split * n_graphs)) if n_graphs > 2 else 0))
        groups = iter(source_groups)
        for side, target in targets:
            taken = 0
            while taken < target:
                g = next(groups, None)
                if g is None:
                    break
                side.extend(g)
                taken += len(g)
        for g in groups:
            train.extend(g)
    if not train or not val or (test_split > 0 and not test):
        raise CorpusError(f"cannot split {len(pool)} graphs into train, validation and test with "
                          f"val_split={val_split}, test_split={test_split}")
    return train, val, test


def select_and_split(
    examples: Sequence[Example], val_split: float, seed: int, max_samples: int | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, validation) of :func:`split_corpus` without a test split.

    >>> exs = [Example(f"a:{i}", f"câu {i % 40}", "(x / y)", "a", i) for i in range(60)]
    >>> exs += [Example(f"b:{i}", f"tin {i}", "(x / y)", "b", i) for i in range(40)]
    >>> train, val = select_and_split(exs, 0.1, seed=1)
    >>> len(train) + len(val), len({e.source for e in val})
    (100, 2)
    >>> not ({e.sentence for e in train} & {e.sentence for e in val})
    True
    """
    train, val, _ = split_corpus(examples, val_split, 0.0, seed, max_samples)
    return train, val


def corpus_splits(cfg: Any) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test) of a run's :class:`~ray_mtup.config.TrainConfig`.

    The corpus is found by :func:`ray_mtup.config.corpus_dir` (``cfg.data_dir``, else
    ``$RAY_MTUP_DATA_DIR``, else the sample corpus shipped with the package), the lookup the
    launcher and the worker make. The test split is ``cfg.test_split`` of the corpus, or the
    graphs of ``cfg.test_file`` when it is set (then nothing more is held out of the corpus).
    The validation examples come with the fixed evaluation subset first
    (:func:`eval_subset_first`; :func:`evaluation_subset` cuts it).
    """
    examples = load_corpus(corpus_dir(cfg.data_dir))
    test_split = 0.0 if cfg.test_file else cfg.test_split
    train, val, test = split_corpus(examples, cfg.val_split, test_split, cfg.seed, cfg.max_samples)
    if cfg.test_file:
        test = read_amr_file(cfg.test_file)
    return train, eval_subset_first(val, cfg.eval_max_samples, cfg.seed), test


def eval_subset_first(val: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """``val`` reordered so its first ``n`` are the seeded evaluation subset stratified over
    the source files (:func:`stratified_indices`); :func:`evaluation_subset` takes that prefix,
    so every trial of a search scores the same, representative graphs.

    >>> val = [Example(f"a:{i}", "x", "(x / y)", "a.txt", i) for i in range(8)]
    >>> val += [Example(f"b:{i}", "x", "(x / y)", "b.txt", i) for i in range(4)]
    >>> sorted(e.source for e in eval_subset_first(val, 3, seed=0)[:3])
    ['a.txt', 'a.txt', 'b.txt']
    """
    if n is None or n >= len(val):
        return list(val)
    chosen = stratified_indices([ex.source for ex in val], n, seed)
    rest = sorted(set(range(len(val))) - set(chosen))
    return [val[i] for i in chosen + rest]


def evaluation_subset(cfg: Any, val: Sequence[Any]) -> list[Any]:
    """The validation items per-epoch generation scores (examples, or their gold graphs): the
    first ``cfg.eval_max_samples`` of a validation list from :func:`corpus_splits` or
    :func:`load_examples`, which put the seeded, stratified subset first; all of them when unset.
    The one place the subset is cut: the training loop's evaluation and the search's
    most-frequent-graph baseline both take it from here.

    >>> from types import SimpleNamespace
    >>> evaluation_subset(SimpleNamespace(eval_max_samples=2), "abc"), evaluation_subset(
    ...     SimpleNamespace(eval_max_samples=None), "abc")
    (['a', 'b'], ['a', 'b', 'c'])
    """
    n = cfg.eval_max_samples
    return list(val if n is None else val[:n])


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


def load_examples(cfg: Any) -> tuple[list[MtupExample], list[MtupExample], list[str]]:
    """Read the run's corpus (:func:`corpus_splits`), subset and split it; returns (train,
    val, raw gold graphs of val), without retrieved context (:func:`with_retrieval`).

    The test split is left out; validation starts with the fixed evaluation subset
    (:func:`evaluation_subset`).
    """
    train_ex, val_ex, _ = corpus_splits(cfg)
    return to_mtup(train_ex), to_mtup(val_ex), [e.amr or "" for e in val_ex]


def with_retrieval(cfg: Any, train: Sequence[MtupExample], val: Sequence[MtupExample]
                   ) -> tuple[list[MtupExample], list[MtupExample]]:
    """``train`` and ``val`` with their ``cfg.retrieval_k`` BM25 neighbours from ``train``
    attached (:func:`ray_mtup.retrieval.attach`; ``retrieval_k = 0``: unchanged, no index).
    Where the training data is prepared, and nowhere else: checking the corpus builds no index.
    """
    return retrieval.attach(cfg.retrieval_k, train, val)


def tokenizer_texts(train: Sequence[MtupExample]) -> list[str]:
    """Texts the tiny model's BPE is trained on: training examples and every template's text."""
    texts = []
    for t in TEMPLATES.values():
        texts += [t.instruction, t.step1_marker, t.step2_marker]
    for ex in train:
        texts += [ex.sentence, ex.task1, ex.task2]
    return texts


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def completion_length(self) -> int:
        """Tokens that carry loss: the completion and its EOS."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode(tokenizer: Any, template: Template, ex: MtupExample, chat: bool = False) -> Encoded:
    """Token ids of prompt + completion + EOS; labels are IGNORE_INDEX over the prompt. With
    ``chat`` the prompt is the chat template's user turn and the completion ends with the
    template's end-of-turn token instead (:func:`~ray_mtup.prompts.end_of_turn_id`)."""
    rendered = render_training(template, ex.sentence, ex.task1, ex.task2, ex.context, tokenizer if chat else None)
    prompt_ids = tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(rendered.completion, add_special_tokens=False)["input_ids"]
    completion_ids = list(completion_ids) + [end_of_turn_id(tokenizer) if chat else tokenizer.eos_token_id]
    return Encoded(
        input_ids=list(prompt_ids) + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    )


def encode_all(
    tokenizer: Any, template: Template, examples: Sequence[MtupExample], max_seq_len: int, chat: bool = False
) -> tuple[list[Encoded], list[str]]:
    """Encode every example; those longer than ``max_seq_len`` are skipped, logged and returned.

    Truncating an AMR target would teach the model unbalanced graphs, so an over-long
    example is left out instead, and its id is returned so the caller reports the count.
    """
    kept, skipped = [], []
    for ex in examples:
        enc = encode(tokenizer, template, ex, chat)
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


def collate_packed(items: Sequence[Encoded]) -> dict[str, Any]:
    """A micro-batch as one padding-free row (``packing``): the sequences concatenated, position
    ids restarting at 0 for each, no attention mask, and IGNORE_INDEX as each sequence's first
    label, so no sequence is trained to predict the start of the next.

    This is transformers' ``DataCollatorWithFlattening``, used as is. The label tokens are those
    of :func:`collate` (a first label never counts: the loss shifts labels left by one), so the
    model's mean loss is the same. The model needs an attention implementation that honours
    packed position ids, and ``use_cache=False`` in its forward (transformers detects packing
    only without a cache).

    >>> b = collate_packed([Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8, 9], [-100, 9])])
    >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    """
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return dict(flatten([{"input_ids": x.input_ids, "labels": x.labels} for x in items], return_tensors="pt"))


def useful_token_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens over padded tokens for a list of index batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / padded if padded else 1.0
