"""The generated part of the shipped sample corpus: a small Vietnamese grammar.

``ray_mtup/sample_data/train_amr_1.txt`` starts with hand-written graphs
(:data:`HANDWRITTEN_BLOCKS` of them); after them come :data:`GENERATED_COUNT` sentence/graph
pairs produced here, deterministically, from a grammar of subjects, verbs, objects and
modifiers. The regular data is what lets the tiny random-init model learn something within
a CPU demo, while the most frequent training graph (the baseline the search is compared
with) fits few validation sentences, because the optional parts (tense, negation, an
adjective, a possessor, a place) combine into many structures.

Regenerate the file (the hand-written head is kept) with::

    python -m ray_mtup.sample_corpus

>>> pairs = grammar_pairs(5, seed=1)
>>> len(pairs), len({s for s, _ in pairs})
(5, 5)
>>> grammar_pairs(5, seed=1) == pairs
True
"""

from __future__ import annotations

import random
from pathlib import Path

from . import amr
from .amr import VariableNamer
from .config import SAMPLE_DATA_DIR
from .corpus import read_amr_file

HANDWRITTEN_BLOCKS = 30
GENERATED_COUNT = 420
GENERATED_SEED = 15
TARGET_FILE = SAMPLE_DATA_DIR / "train_amr_1.txt"

# Words as they appear in a sentence; a graph joins multi-word concepts with "_".
SUBJECTS = ("tôi", "anh", "chị", "em", "mẹ", "bố", "bà", "ông", "cô giáo", "bạn", "mèo", "chó")
INTRANSITIVE = ("ngủ", "cười", "khóc", "chạy", "đi", "hát", "ngồi")
TRANSITIVE = {
    "ăn": ("cơm", "cá", "bánh", "táo", "phở"),
    "uống": ("nước", "trà", "sữa", "cà phê"),
    "đọc": ("sách", "báo", "thư", "truyện"),
    "mua": ("áo", "sách", "bánh", "xe đạp", "hoa"),
    "viết": ("thư", "bài", "truyện"),
    "rửa": ("bát", "xe đạp", "áo"),
    "thích": ("hoa", "mèo", "chó", "trà", "truyện"),
}
ADJECTIVES = ("mới", "cũ", "đẹp", "to", "nhỏ", "ngon")
TENSES = ("đang", "đã", "sẽ")
PLACES = ("nhà", "trường", "chợ", "công viên", "quán")
POSSESSORS = ("tôi", "anh", "chị", "mẹ", "bạn")


class _Graph:
    """Builds one PENMAN graph with variables from first letters (``n``, ``n1``, ...)."""

    def __init__(self) -> None:
        self.namer = VariableNamer(set())

    def var(self, concept: str) -> str:
        return self.namer.fresh(concept)

    def node(self, word: str, *edges: str) -> str:
        concept = word.replace(" ", "_")
        inner = "".join(f" {e}" for e in edges)
        return f"({self.var(concept)} / {concept}{inner})"


def _clause(rng: random.Random) -> tuple[str, str]:
    """One sentence and its graph (single line; :func:`amr.normalise` lays it out)."""
    g = _Graph()
    subject = rng.choice(SUBJECTS)
    transitive = rng.random() < 0.7
    verb = rng.choice(sorted(TRANSITIVE) if transitive else INTRANSITIVE)
    words = [subject]
    tense = rng.choice(TENSES) if rng.random() < 0.35 else None
    negated = rng.random() < 0.25
    if tense:
        words.append(tense)
    if negated:
        words.append("không")
    words.append(verb)
    root_var = g.var(verb)
    edges = [f":agent {g.node(subject)}"]
    if transitive:
        obj = rng.choice(TRANSITIVE[verb])
        words.append(obj)
        obj_edges = []
        if rng.random() < 0.35:
            adjective = rng.choice(ADJECTIVES)
            words.append(adjective)
            obj_edges.append(f":mod {g.node(adjective)}")
        if rng.random() < 0.25:
            owner = rng.choice([p for p in POSSESSORS if p != subject])
            words += ["của", owner]
            obj_edges.append(f":poss {g.node(owner)}")
        edges.append(f":patient {g.node(obj, *obj_edges)}")
    if tense:
        edges.append(f":tense {g.node(tense)}")
    if rng.random() < 0.3:
        place = rng.choice(PLACES)
        words += ["ở", place]
        edges.append(f":location {g.node(place)}")
    if negated:
        edges.append(":polarity -")
    graph = f"({root_var} / {verb.replace(' ', '_')} {' '.join(edges)})"
    return " ".join(words) + " .", amr.normalise(graph)


def grammar_pairs(n: int = GENERATED_COUNT, seed: int = GENERATED_SEED) -> list[tuple[str, str]]:
    """``n`` distinct (sentence, graph) pairs from the grammar, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < n:
        sentence, graph = _clause(rng)
        if sentence not in seen:
            seen.add(sentence)
            pairs.append((sentence, graph))
    return pairs


def write_sample_file(path: Path = TARGET_FILE) -> int:
    """Rewrite ``path``: its first :data:`HANDWRITTEN_BLOCKS` blocks, then the grammar's pairs.

    Blocks are written with CRLF line ends, like the hand-written head and the VLSP files.
    """
    head = read_amr_file(path)[:HANDWRITTEN_BLOCKS]
    raw_blocks = path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n\n")
    kept = [b.strip("\n") for b in raw_blocks if b.strip()][:len(head)]
    generated = [f"#::snt {s}\n{g}" for s, g in grammar_pairs()]
    text = "\n\n".join(kept + generated) + "\n\n"
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    return len(kept) + len(generated)


if __name__ == "__main__":
    print(f"{write_sample_file()} graphs in {TARGET_FILE}")
