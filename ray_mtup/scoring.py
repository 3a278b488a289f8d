"""Corpus-level SMATCH: the evaluation stage.

The score is smatch 1.0.4's: triples are extracted by its parser (``amr.AMR.parse_AMR_line``)
and variables are aligned by its hill-climbing (``smatch.compute_pool`` / ``get_best_gain``).
Four things differ from calling ``smatch.get_amr_match`` naively, each on purpose:

* **Deterministic.** smatch reseeds the global ``random`` from the OS before every restart.
  Here the restarts draw from a private ``random.Random`` seeded afresh for every pair, so
  the same inputs always give the same score, a pair's score does not depend on the pairs
  before it, and the caller's global ``random`` state is never touched.
* **No stale cache.** smatch memoises match counts in the module-level ``match_triple_dict``
  keyed by the mapping only; it is cleared before and after every pair.
* **Duplicate triples removed** (after smatch's own normalisation: lower case, trailing ``_``
  stripped) on both sides, so a repeated triple cannot be matched twice and F never exceeds 1.
* **Quiet and early-stopping.** smatch's printing to stderr is captured and sent to this
  module's logger at DEBUG; restarts stop as soon as the alignment reaches the upper bound
  ``min(predicted, gold)``, which cannot change the result.

Corpus scores are sums of matched / predicted / gold triples over all pairs, never an
average of per-sentence F.

Modes, named in every output:

``official``
    The shared task's scorer: graphs are made one-line the way smatch reads a file (lines
    stripped and joined) and fed to smatch's parser as they are. smatch drops spaces inside
    a concept (``chủ tịch`` becomes ``chủtịch``) while ``_`` stays, so ``(c / chủ tịch)``
    and ``(c / chủ_tịch)`` do *not* match. :func:`evaluate_files` scores a predictions
    file as it is: nothing is repaired or rewritten, and a graph smatch cannot parse counts
    as empty (``repair=True`` opts in to repair, as ``predict`` and the training objective
    do for the project's own outputs). Gold scored against itself gives 1.0.
``normalised``
    Both graphs go through :func:`ray_mtup.amr.normalise` first, which joins multi-word
    concepts with ``_``; spaces and underscores in concepts are then equivalent. (Not called
    "lenient" because that word already means "skip bad blocks" in the corpus reader.)

>>> score_pair("(c / chó)", "(c / chó)").matched
2
>>> s = score_corpus(["(c / chủ tịch)"], ["(c / chủ_tịch)"])
>>> (s.mode, s.matched, s.gold)
('official', 1, 2)
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import smatch

from ray_mtup import amr
from ray_mtup.corpus import normalise_sentence, read_amr_file
from ray_mtup.errors import AmrError, ConfigError, CorpusError, ScoringError

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("official", "normalised")
"""Scoring modes; see the module docstring."""

DEFAULT_RESTARTS = 10
"""Hill-climbing starts per pair: one smart start plus random ones (smatch's default is 5)."""

DEFAULT_SEED = 0
"""Seed of the private random state created for every pair."""

CI_NOTE = (
    "bootstrap over sentences: on ~150 sentences the interval is a few points wide, "
    "so differences of a couple of points between systems are noise"
)

# smatch keeps its state in module globals; one pair is scored at a time per process.
_SMATCH_LOCK = threading.RLock()

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class PairCounts:
    """Triple counts of one (gold, prediction) pair.

    ``valid`` is False when the prediction was not a graph; it then counts as empty
    (0 matched, 0 predicted, all of the gold triples).
    """

    matched: int
    predicted: int
    gold: int
    valid: bool

    @property
    def f1(self) -> float:
        """This pair's own SMATCH F (for showing one sentence; corpus F sums the counts).

        >>> PairCounts(3, 4, 6, True).f1, PairCounts(0, 0, 2, False).f1
        (0.6, 0.0)
        """
        return _f1(self.matched, self.predicted, self.gold)


@dataclass(frozen=True)
class Score:
    """Corpus-level SMATCH of one set of predictions.

    >>> s = Score.from_pairs([PairCounts(3, 4, 6, True), PairCounts(0, 0, 2, False)], "official")
    >>> (s.precision, s.recall, s.f1, s.validity)
    (0.75, 0.375, 0.5, 0.5)
    """

    precision: float
    recall: float
    f1: float
    n_pairs: int
    n_valid: int
    matched: int
    predicted: int
    gold: int
    mode: str

    @classmethod
    def from_pairs(cls, pairs: Sequence[PairCounts], mode: str) -> Score:
        """Sum the pairs' counts into one corpus score."""
        matched = sum(p.matched for p in pairs)
        predicted = sum(p.predicted for p in pairs)
        gold = sum(p.gold for p in pairs)
        return cls(
            precision=matched / predicted if predicted else 0.0,
            recall=matched / gold if gold else 0.0,
            f1=_f1(matched, predicted, gold),
            n_pairs=len(pairs),
            n_valid=sum(1 for p in pairs if p.valid),
            matched=matched,
            predicted=predicted,
            gold=gold,
            mode=mode,
        )

    @property
    def validity(self) -> float:
        """Share of predictions that were graphs (1.0 for an empty corpus)."""
        return self.n_valid / self.n_pairs if self.n_pairs else 1.0

    def to_dict(self) -> dict:
        """Plain dict of every field plus ``validity``, ready for JSON."""
        return {**asdict(self), "validity": self.validity}


def _f1(matched: int, predicted: int, gold: int) -> float:
    # 2PR/(P+R) == 2M/(predicted+gold), without the intermediate divisions.
    return 2.0 * matched / (predicted + gold) if predicted + gold else 0.0


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")


# --------------------------------------------------------------------------- smatch glue


@contextlib.contextmanager
def _smatch_session() -> Iterator[None]:
    """Hold smatch's globals for the duration: no verbose output, errors captured, cache empty."""
    with _SMATCH_LOCK:
        saved = (
            smatch.verbose,
            smatch.veryVerbose,
            smatch.ERROR_LOG,
            smatch.DEBUG_LOG,
            smatch.amr.ERROR_LOG,
            smatch.amr.DEBUG_LOG,
        )
        sink = io.StringIO()
        smatch.verbose = smatch.veryVerbose = False
        smatch.ERROR_LOG = smatch.DEBUG_LOG = sink
        smatch.amr.ERROR_LOG = smatch.amr.DEBUG_LOG = sink
        smatch.match_triple_dict.clear()
        try:
            yield
        finally:
            smatch.match_triple_dict.clear()
            (
                smatch.verbose,
                smatch.veryVerbose,
                smatch.ERROR_LOG,
                smatch.DEBUG_LOG,
                smatch.amr.ERROR_LOG,
                smatch.amr.DEBUG_LOG,
            ) = saved
            captured = sink.getvalue().strip()
            if captured:
                logger.debug("smatch said: %s", captured)


def _one_line(text: str) -> str:
    """Join a multi-line graph into one line exactly as smatch's file reader does
    (``amr.AMR.get_amr_line``): comment lines dropped, lines stripped and joined with nothing.

    >>> _one_line("# ::snt x\\n(c / chủ tịch\\n    :mod (t / to))")
    '(c / chủ tịch:mod (t / to))'
    """
    lines = (line.strip() for line in text.splitlines())
    return "".join(line for line in lines if line and not line.startswith("#"))


def _norm(item: object) -> str:
    # smatch.normalize, made safe for the list-valued names its parser can emit for quoted values.
    if isinstance(item, list):
        item = "".join(map(str, item))
    return smatch.normalize(str(item))


def _dedup(triples: list) -> list[Triple]:
    """Drop triples equal after smatch's normalisation, keeping the first of each."""
    seen: set[Triple] = set()
    kept: list[Triple] = []
    for t in triples:
        key = (_norm(t[0]), t[1], _norm(t[2]))
        if key not in seen:
            seen.add(key)
            kept.append((t[0] if isinstance(t[0], str) else _norm(t[0]), t[1], t[2]))
    return kept


class _Triples:
    """The deduplicated instance/attribute/relation triples of one graph, nodes renamed."""

    __slots__ = ("instances", "attributes", "relations")

    def __init__(self, instances: list[Triple], attributes: list[Triple], relations: list[Triple]):
        self.instances = instances
        self.attributes = attributes
        self.relations = relations

    def __len__(self) -> int:
        return len(self.instances) + len(self.attributes) + len(self.relations)


def _parse(one_line: str, prefix: str) -> _Triples | None:
    """Triples of a one-line graph by smatch's parser, or None when it cannot parse it."""
    if not one_line:
        return None
    try:
        graph = smatch.amr.AMR.parse_AMR_line(one_line)
        if graph is None:
            return None
        graph.rename_node(prefix)
        instances, attributes, relations = graph.get_triples()
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as exc:
        # smatch's parser signals most errors by returning None, a few by crashing.
        logger.debug("smatch cannot parse %r: %s", one_line[:80], exc)
        return None
    return _Triples(_dedup(instances), _dedup(attributes), _dedup(relations))


def _smart_init(candidates: list[set[int]], inst1: list[Triple], inst2: list[Triple], rng: random.Random) -> list[int]:
    """smatch.smart_init_mapping with a private random state (and no reseeding)."""
    matched: set[int] = set()
    result: list[int] = []
    no_word_match: list[int] = []
    for i, cands in enumerate(candidates):
        if not cands:
            result.append(-1)
            continue
        value1 = inst1[i][2]
        for node_index in cands:
            if value1 == inst2[node_index][2] and node_index not in matched:
                result.append(node_index)
                matched.add(node_index)
                break
        if len(result) == i:
            no_word_match.append(i)
            result.append(-1)
    for i in no_word_match:
        cands = list(candidates[i])
        while cands:
            rid = rng.randint(0, len(cands) - 1)
            if cands[rid] in matched:
                cands.pop(rid)
            else:
                matched.add(cands[rid])
                result[i] = cands[rid]
                break
    return result


def _random_init(candidates: list[set[int]], rng: random.Random) -> list[int]:
    """smatch.random_init_mapping with a private random state (and no reseeding)."""
    matched: set[int] = set()
    result: list[int] = []
    for c in candidates:
        cands = list(c)
        chosen = -1
        while cands:
            rid = rng.randint(0, len(cands) - 1)
            if cands[rid] in matched:
                cands.pop(rid)
            else:
                chosen = cands[rid]
                matched.add(chosen)
                break
        result.append(chosen)
    return result


def _best_match(pred: _Triples, gold: _Triples, restarts: int, seed: int) -> int:
    """smatch.get_best_match: hill-climbing from a smart start, then random starts.

    Must run inside :func:`_smatch_session`; clears smatch's cache before and after.
    """
    smatch.match_triple_dict.clear()
    try:
        candidates, weights = smatch.compute_pool(
            pred.instances, pred.attributes, pred.relations,
            gold.instances, gold.attributes, gold.relations,
            "a", "b",
        )
        rng = random.Random(seed)
        bound = min(len(pred), len(gold))
        best = 0
        for i in range(restarts):
            if i == 0:
                mapping = _smart_init(candidates, pred.instances, gold.instances, rng)
            else:
                mapping = _random_init(candidates, rng)
            match = smatch.compute_match(mapping, weights)
            while True:
                gain, new_mapping = smatch.get_best_gain(
                    mapping, candidates, weights, len(gold.instances), match
                )
                if gain <= 0:
                    break
                match += gain
                mapping = new_mapping[:]
            best = max(best, match)
            if best >= bound:
                break
        return best
    finally:
        smatch.match_triple_dict.clear()


def _prepare(text: str, mode: str) -> str:
    """The one-line graph smatch sees under ``mode``; raises AmrError in ``normalised`` mode."""
    if mode == "normalised":
        text = amr.normalise(text)
    return _one_line(text)


def _gold_triples(gold: str, mode: str, index: int) -> _Triples:
    try:
        triples = _parse(_prepare(gold, mode), "b")
    except AmrError as exc:
        raise ScoringError(f"gold graph {index} cannot be read: {exc}") from exc
    if triples is None:
        raise ScoringError(f"gold graph {index} cannot be parsed by smatch")
    return triples


def _pred_triples(pred: str | None, mode: str, index: int) -> _Triples | None:
    if pred is None:
        return None
    try:
        return _parse(_prepare(pred, mode), "a")
    except AmrError as exc:
        logger.debug("prediction %d cannot be normalised: %s", index, exc)
        return None


def _score_pairs(golds: Sequence[str], preds: Sequence[str | None], mode: str, restarts: int, seed: int,
                 progress: bool = False) -> list[PairCounts]:
    _check_mode(mode)
    if restarts < 1:
        raise ConfigError("restarts", f"must be >= 1, got {restarts}")
    if len(golds) != len(preds):
        raise ScoringError(f"{len(golds)} gold graphs but {len(preds)} predictions")
    out: list[PairCounts] = []
    pairs: Any = enumerate(zip(golds, preds))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, total=len(golds), desc="SMATCH", unit="graph", disable=None)  # a terminal only
    with _smatch_session():
        for i, (gold, pred) in pairs:
            g = _gold_triples(gold, mode, i)
            p = _pred_triples(pred, mode, i)
            if p is None:
                out.append(PairCounts(0, 0, len(g), valid=False))
            else:
                out.append(PairCounts(_best_match(p, g, restarts, seed), len(p), len(g), valid=True))
    return out


# --------------------------------------------------------------------------- public API


def score_pair(
    gold: str, pred: str | None, mode: str = "official", *, restarts: int = DEFAULT_RESTARTS, seed: int = DEFAULT_SEED
) -> PairCounts:
    """SMATCH triple counts of one pair.

    ``pred=None``, or a prediction smatch cannot parse, counts as an empty graph.
    A gold graph that cannot be parsed raises ScoringError.

    >>> score_pair("(c / chó :mod (đ / đen))", "(x / chó :mod (y / trắng))")
    PairCounts(matched=3, predicted=4, gold=4, valid=True)
    >>> score_pair("(c / chó)", None)
    PairCounts(matched=0, predicted=0, gold=2, valid=False)
    """
    return _score_pairs([gold], [pred], mode, restarts, seed)[0]


def score_pairs(
    golds: Sequence[str],
    preds: Sequence[str | None],
    mode: str = "official",
    *,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> list[PairCounts]:
    """Per-pair counts (for :func:`bootstrap_ci`); ScoringError when the lengths differ.
    ``progress`` shows a progress bar."""
    return _score_pairs(golds, preds, mode, restarts, seed, progress)


def score_corpus(
    golds: Sequence[str],
    preds: Sequence[str | None],
    mode: str = "official",
    *,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> Score:
    """Corpus SMATCH: summed matches over summed triples (not an average of per-pair F).

    ``progress`` shows a progress bar (for long corpora a person watches).

    >>> s = score_corpus(["(c / chó)", "(m / mèo :mod (đ / đen))"], ["(c / chó)", None])
    >>> (s.precision, s.recall, s.n_valid)
    (1.0, 0.3333333333333333, 1)
    """
    return Score.from_pairs(_score_pairs(golds, preds, mode, restarts, seed, progress), mode)


def evaluate_predictions(
    golds: Sequence[str],
    raw_preds: Sequence[str],
    mode: str = "official",
    *,
    ids: Sequence[str] | None = None,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
) -> tuple[Score, list[amr.Repair]]:
    """Repair raw model outputs, then score them; unrepairable ones count as empty graphs.

    Invalid predictions are logged at INFO with their index (and id when ``ids`` is given).
    """
    score, repairs, _ = _evaluate(golds, raw_preds, mode, ids, restarts, seed)
    return score, repairs


def _evaluate(golds, raw_preds, mode, ids, restarts, seed) -> tuple[Score, list[amr.Repair], list[PairCounts]]:
    _check_mode(mode)
    if len(golds) != len(raw_preds):
        raise ScoringError(f"{len(golds)} gold graphs but {len(raw_preds)} predictions")
    repairs = [amr.repair(text) for text in raw_preds]
    preds = [r.graph if r.valid else None for r in repairs]
    pairs = _score_pairs(golds, preds, mode, restarts, seed)
    for i, pair in enumerate(pairs):
        if not pair.valid:
            name = f" (id {ids[i]})" if ids is not None else ""
            logger.info("prediction %d%s is not a valid graph; counted as empty: %s", i, name, repairs[i].notes)
    return Score.from_pairs(pairs, mode), repairs, pairs


def score_by_id(
    golds: Mapping[str, str],
    preds: Mapping[str, str | None],
    mode: str = "official",
    *,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
) -> dict[str, PairCounts]:
    """Per-sentence counts with each prediction paired to the gold graph of its sentence id.

    Every predicted id must have a gold graph, else ScoringError naming the first stray ids;
    the result follows the order of ``preds``.

    >>> score_by_id({"f:1": "(c / chó)", "f:2": "(m / mèo)"}, {"f:2": "(m / mèo)"})
    {'f:2': PairCounts(matched=2, predicted=2, gold=2, valid=True)}
    >>> score_by_id({"f:1": "(c / chó)"}, {"f:9": "(c / chó)"})
    Traceback (most recent call last):
    ...
    ray_mtup.errors.ScoringError: 1 prediction(s) have no gold graph with their sentence id: f:9
    """
    stray = [i for i in preds if i not in golds]
    if stray:
        raise ScoringError(f"{len(stray)} prediction(s) have no gold graph with their sentence id: "
                           f"{', '.join(map(str, stray[:5]))}")
    ids = list(preds)
    pairs = _score_pairs([golds[i] for i in ids], [preds[i] for i in ids], mode, restarts, seed)
    return dict(zip(ids, pairs))


def _resampled_f1(counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    sums = counts[idx].sum(axis=1)  # (n_resamples, 3): matched, predicted, gold
    denom = sums[:, 1] + sums[:, 2]
    return np.divide(2.0 * sums[:, 0], denom, out=np.zeros(len(idx)), where=denom > 0)


def _aligned(pairs: Sequence[PairCounts] | Mapping[str, PairCounts],
             baseline: Sequence[PairCounts] | Mapping[str, PairCounts] | None) -> list[list[PairCounts]]:
    """The pair lists to resample together, aligned by sentence id when a baseline is given."""
    if baseline is None:
        return [list(pairs.values()) if isinstance(pairs, Mapping) else list(pairs)]
    if not isinstance(pairs, Mapping) or not isinstance(baseline, Mapping):
        raise ScoringError("a paired bootstrap needs both sides keyed by sentence id")
    if set(pairs) != set(baseline):
        only = sorted(set(pairs) ^ set(baseline))
        raise ScoringError(f"the two systems were scored on different sentences ({len(only)} ids differ, "
                           f"e.g. {', '.join(only[:3])}); a paired bootstrap needs the same ids")
    ids = list(pairs)
    return [[pairs[i] for i in ids], [baseline[i] for i in ids]]


def bootstrap_ci(
    pairs: Sequence[PairCounts] | Mapping[str, PairCounts],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    baseline: Mapping[str, PairCounts] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of corpus F1, resampling sentences with replacement.

    With ``baseline`` (another system's counts on the same sentences, both keyed by
    sentence id) the interval is of F1(pairs) - F1(baseline) over the same resamples (a
    paired bootstrap); ids that differ between the two are a ScoringError. The one
    bootstrap of the project: ``evaluate``, the test figure and the noise analysis use it.

    >>> pairs = [PairCounts(5, 5, 5, True)] * 10
    >>> bootstrap_ci(pairs, n_resamples=50)
    (1.0, 1.0)
    >>> a = {"x": PairCounts(2, 2, 2, True), "y": PairCounts(1, 2, 2, True)}
    >>> bootstrap_ci(a, n_resamples=50, baseline=a)
    (0.0, 0.0)
    """
    if n_resamples < 1:
        raise ConfigError("n_resamples", f"must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ConfigError("level", f"must be in (0, 1), got {level}")
    sides = _aligned(pairs, baseline)
    if not sides[0]:
        raise ScoringError("bootstrap_ci needs at least one pair")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sides[0]), size=(n_resamples, len(sides[0])))
    f1s = [_resampled_f1(np.array([(p.matched, p.predicted, p.gold) for p in side], dtype=np.int64), idx)
           for side in sides]
    f1 = f1s[0] if len(f1s) == 1 else f1s[0] - f1s[1]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(f1, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Block:
    """One block of a predictions file: its sentence (None without ``#::snt``), graph text and line."""

    sentence: str | None
    graph: str
    line: int


_SNT_PREFIXES = ("#::snt", "# ::snt")


def read_blocks(path: str | Path) -> list[Block]:
    """Blocks of a predictions file in the corpus format, separated by blank lines.

    Unlike :func:`ray_mtup.corpus.read_amr_file`, nothing is parsed: a block whose graph is
    broken (or missing) is returned as text (possibly empty), to be counted invalid later.
    Comment lines (``#...``) are dropped from the graph; a ``#::snt`` line gives the sentence.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CorpusError(f"cannot read predictions: {exc.strerror or exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise CorpusError(f"not UTF-8: {exc}", path=path) from exc
    blocks: list[Block] = []
    current: list[str] | None = None
    sentence: str | None = None
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            if current is not None:
                blocks.append(Block(sentence, "\n".join(current), start))
                current, sentence = None, None
            continue
        if current is None:
            current, start = [], number
        if stripped.startswith(_SNT_PREFIXES):
            sentence = stripped.split("::snt", 1)[1].strip()
        elif not stripped.startswith("#"):
            current.append(line.rstrip())
    if current is not None:
        blocks.append(Block(sentence, "\n".join(current), start))
    return blocks


def read_graph_blocks(path: str | Path) -> list[str]:
    """The graph texts of :func:`read_blocks`, in order."""
    return [b.graph for b in read_blocks(path)]


def sentence_mismatches(examples: Sequence[Any], blocks: Sequence[Block], pred_path: str | Path) -> dict:
    """The prediction blocks whose ``#::snt`` differs from their gold sentence (pairs stay
    aligned by order, as the shared task's scorer aligns them: it never reads the sentence lines).

    Returns ``{"count": n, "first": "<file>:<line>: ..." or None}``.
    """
    count, first = 0, None
    for ex, block in zip(examples, blocks):
        if block.sentence is not None and normalise_sentence(block.sentence) != normalise_sentence(ex.sentence):
            count += 1
            if first is None:
                first = (f"{pred_path}:{block.line}: #::snt {block.sentence[:60]!r} differs from gold {ex.id} "
                         f"{ex.sentence[:60]!r}")
    return {"count": count, "first": first}


@dataclass(frozen=True)
class ScoredFile:
    """A predictions file scored against gold: the gold examples, the blocks and their counts
    (all in gold order), the corpus score, how many predictions were repaired, and the
    ``#::snt`` lines that differ from gold (scored by order all the same)."""

    examples: list[Any]
    blocks: list[Block]
    pairs: list[PairCounts]
    score: Score
    n_repaired: int
    mismatches: dict  # sentence_mismatches(): count and the first #::snt that differs from gold

    def by_id(self) -> dict[str, PairCounts]:
        """The counts keyed by gold sentence id (for a paired bootstrap)."""
        return {ex.id: pair for ex, pair in zip(self.examples, self.pairs)}


def score_file(
    gold_path: str | Path,
    pred_path: str | Path,
    mode: str = "official",
    *,
    repair: bool = False,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
) -> ScoredFile:
    """Score a predictions file against a gold file (see :func:`evaluate_files` for the rules)."""
    _check_mode(mode)
    examples = read_amr_file(gold_path)
    blocks = read_blocks(pred_path)
    if len(examples) != len(blocks):
        raise ScoringError(
            f"{gold_path} has {len(examples)} graphs but {pred_path} has {len(blocks)}; "
            "pairs are aligned by order, so the counts must be equal"
        )
    mismatches = sentence_mismatches(examples, blocks, pred_path)
    if mismatches["count"]:
        logger.warning("%d #::snt lines differ from the gold sentences, scored by order; first: %s",
                       mismatches["count"], mismatches["first"])
    golds, ids = [ex.amr for ex in examples], [ex.id for ex in examples]
    if repair:
        score, repairs, pairs = _evaluate(golds, [b.graph for b in blocks], mode, ids, restarts, seed)
        n_repaired = sum(1 for r, p in zip(repairs, pairs) if r.repaired and p.valid)
    else:
        pairs = _score_pairs(golds, [b.graph or None for b in blocks], mode, restarts, seed)
        score, n_repaired = Score.from_pairs(pairs, mode), 0
        for ex, pair in zip(examples, pairs):
            if not pair.valid:
                logger.info("prediction for %s is not a graph smatch can read; counted as empty", ex.id)
    return ScoredFile(examples, blocks, pairs, score, n_repaired, mismatches)


def worst_sentences(scored: ScoredFile, n: int) -> list[dict[str, Any]]:
    """The ``n`` sentences with the lowest per-sentence F (ties: the most gold triples missed
    first, then file order): id, sentence, gold, prediction, f1 and the triple counts."""
    if n < 0:
        raise ConfigError("show", f"must be >= 0, got {n}")
    order = sorted(range(len(scored.pairs)),
                   key=lambda i: (scored.pairs[i].f1, scored.pairs[i].matched - scored.pairs[i].gold, i))
    rows = []
    for i in order[:n]:
        ex, block, pair = scored.examples[i], scored.blocks[i], scored.pairs[i]
        rows.append({"id": ex.id, "sentence": ex.sentence, "gold": ex.amr, "prediction": block.graph,
                     "f1": pair.f1, "matched": pair.matched, "predicted_triples": pair.predicted,
                     "gold_triples": pair.gold, "valid": pair.valid})
    return rows


def evaluate_files(
    gold_path: str | Path,
    pred_path: str | Path,
    mode: str = "official",
    bootstrap: int = 0,
    *,
    repair: bool = False,
    show: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Score a predictions file against a gold file, both in the corpus format, aligned by order.

    The predictions are scored as they are (a graph smatch cannot parse counts as empty),
    as the shared task's scorer does; ``repair=True`` repairs each one first (the
    project's own convention for its raw outputs, which rewrites ``chủ tịch`` as ``chủ_tịch``).
    A prediction block whose ``#::snt`` differs from its gold sentence is reported (as
    ``sentence_mismatches``: the count and the first one) and scored by its position, as smatch
    scores it; only a different number of graphs is a ScoringError.

    Returns :meth:`Score.to_dict` plus ``gold_path``, ``pred_path``, ``repair``,
    ``n_repaired``, ``sentence_mismatches``; when ``bootstrap > 0``, ``ci_low``, ``ci_high``, ``ci_level``,
    ``ci_resamples`` and ``ci_note``; when ``show > 0``, ``worst`` (:func:`worst_sentences`).
    """
    if bootstrap < 0:
        raise ConfigError("bootstrap", f"must be >= 0, got {bootstrap}")
    if show < 0:
        raise ConfigError("show", f"must be >= 0, got {show}")
    scored = score_file(gold_path, pred_path, mode, repair=repair, restarts=restarts, seed=seed)
    return _file_result(scored, gold_path, pred_path, repair, bootstrap, show, seed)


def _file_result(scored: ScoredFile, gold_path: str | Path, pred_path: str | Path, repair: bool, bootstrap: int,
                 show: int, seed: int) -> dict:
    result = {**scored.score.to_dict(), "repair": repair, "n_repaired": scored.n_repaired,
              "sentence_mismatches": scored.mismatches,
              "gold_path": str(gold_path), "pred_path": str(pred_path)}
    if bootstrap > 0:
        level = 0.95
        low, high = bootstrap_ci(scored.by_id(), n_resamples=bootstrap, seed=seed, level=level)
        result.update(ci_low=low, ci_high=high, ci_level=level, ci_resamples=bootstrap, ci_note=CI_NOTE)
    if show > 0:
        result["worst"] = worst_sentences(scored, show)
    return result


COMPARISON_RESAMPLES = 1000
"""Resamples of the paired bootstrap of :func:`compare_files` when none are asked for."""


def compare_files(
    gold_path: str | Path,
    pred_a: str | Path,
    pred_b: str | Path,
    mode: str = "official",
    bootstrap: int = COMPARISON_RESAMPLES,
    *,
    repair: bool = False,
    show: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Two predictions files against one gold file: both scores, ``delta_f1`` = F(A) - F(B)
    and its paired bootstrap interval (:func:`bootstrap_ci` with B as the baseline; both
    sides resampled over the same gold sentence ids).

    Each file is read and checked as :func:`evaluate_files` does. Returns ``systems``
    (the two :func:`evaluate_files` results, A first, each with its own interval), ``delta_f1``,
    ``delta_ci_low``/``delta_ci_high``, ``ci_level``, ``ci_resamples``, ``beyond_noise``
    (the interval excludes 0), ``n_pairs``, ``mode`` and ``gold_path``.
    """
    if bootstrap < 1:
        raise ConfigError("bootstrap", f"a comparison needs >= 1 bootstrap resamples, got {bootstrap}")
    if show < 0:
        raise ConfigError("show", f"must be >= 0, got {show}")
    scored = [score_file(gold_path, p, mode, repair=repair, restarts=restarts, seed=seed) for p in (pred_a, pred_b)]
    level = 0.95
    low, high = bootstrap_ci(scored[0].by_id(), n_resamples=bootstrap, seed=seed, level=level,
                             baseline=scored[1].by_id())
    return {
        "mode": mode,
        "gold_path": str(gold_path),
        "n_pairs": scored[0].score.n_pairs,
        "systems": [_file_result(s, gold_path, p, repair, bootstrap, show, seed)
                    for s, p in zip(scored, (pred_a, pred_b))],
        "delta_f1": scored[0].score.f1 - scored[1].score.f1,
        "delta_ci_low": low,
        "delta_ci_high": high,
        "ci_level": level,
        "ci_resamples": bootstrap,
        "beyond_noise": low > 0 or high < 0,
        "ci_note": "paired bootstrap: both files resampled over the same gold sentences",
    }
