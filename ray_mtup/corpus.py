"""Corpus reading and writing: VLSP AMR files and sentence-only test files.

A graph file holds blocks of a ``#::snt <sentence>`` line (``# ::snt`` is accepted too,
other ``# ::`` metadata lines are ignored) followed by a multi-line PENMAN graph, blocks
separated by blank lines. Line endings may be CRLF, CR or LF, with or without a UTF-8
BOM. Every problem is reported as a :class:`CorpusError` naming the file and line; in
lenient mode a malformed block is skipped, logged and recorded instead (never dropped
silently).

This module only checks the block structure and parenthesis balance; decoding the
graphs is the job of :mod:`ray_mtup.amr`.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ray_mtup.errors import CorpusError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRAIN_FILES",
    "Example",
    "MtupExample",
    "ReadReport",
    "SkippedBlock",
    "find_duplicate_sentences",
    "load_corpus",
    "normalise_sentence",
    "read_amr_file",
    "read_amr_file_report",
    "read_input_sentences",
    "read_sentences",
    "looks_unlike_corpus",
    "to_corpus_form",
    "write_amr_file",
]

DEFAULT_TRAIN_FILES = ("train_amr_1.txt", "train_amr_2.txt")
"""The graph files of the VLSP 2025 training data."""

_NEWLINE_RE = re.compile(r"\r\n|\r|\n")
_SNT_RE = re.compile(r"#\s*::snt(?:[ \t]+(.*))?\Z")
_PAREN_RE = re.compile(r'(?P<string>"(?:[^"\\]|\\.)*")|(?P<open>")|[()]')


@dataclass(frozen=True)
class Example:
    """One sentence of a corpus file, with its graph when the file has graphs.

    id: ``<file stem>:<1-based block index>``, e.g. ``train_amr_1:17``.
    sentence: the sentence as written after ``#::snt``.
    amr: the raw PENMAN lines joined with ``\\n`` (None for sentence-only files).
    source: the file name, e.g. ``train_amr_1.txt``.
    line: 1-based line of the ``#::snt`` line (of the sentence in sentence-only files).
    """

    id: str
    sentence: str
    amr: str | None
    source: str
    line: int


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


@dataclass(frozen=True)
class SkippedBlock:
    """A malformed block that a lenient read left out."""

    path: str
    line: int
    reason: str


@dataclass(frozen=True)
class ReadReport:
    """What a read returned and what it skipped."""

    examples: list[Example]
    skipped: tuple[SkippedBlock, ...]


def _split_lines(text: str) -> list[str]:
    r"""Split on CRLF, CR or LF (and only those, unlike str.splitlines).

    >>> _split_lines("a\r\nb\rc\nd\x85e")
    ['a', 'b', 'c', 'd\x85e']
    """
    return _NEWLINE_RE.split(text)


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (BOM removed); CorpusError naming the line of a bad byte."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError("file not found", path=path) from None
    except OSError as exc:
        raise CorpusError(f"cannot read file: {exc.strerror}", path=path) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace")
        line = len(_split_lines(before))
        raise CorpusError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})", path=path, line=line
        ) from None
    return text.removeprefix("\ufeff")


def _paren_problem(lines: Sequence[str], first_line: int) -> tuple[int, str] | None:
    """Check that the graph lines hold exactly one balanced graph starting with '('.

    Parentheses inside quoted strings do not count. Returns (line, reason) or None.

    >>> _paren_problem(["(a / b", '    :name "x)")'], 5) is None
    True
    >>> _paren_problem(["(a / b", "    :c (d / e)))"], 5)
    (6, "unexpected ')'")
    >>> _paren_problem(["(a / b", "    :c (d / e)"], 5)
    (5, "unbalanced parentheses: 1 '(' not closed")
    """
    depth = 0
    closed = False
    for offset, line in enumerate(lines):
        number = first_line + offset
        if closed:
            return number, "text after the graph closes"
        if offset == 0 and not line.lstrip().startswith("("):
            return number, "graph does not start with '('"
        close_end = None
        for m in _PAREN_RE.finditer(line):
            if closed:
                if m.group() == ")":
                    return number, "unexpected ')'"
                return number, "text after the graph closes"
            if m.lastgroup == "open":
                return number, "unterminated quoted string"
            if m.group() == "(":
                depth += 1
            elif m.group() == ")":
                depth -= 1
                if depth < 0:
                    return number, "unexpected ')'"
                if depth == 0:
                    closed = True
                    close_end = m.end()
        if close_end is not None and line[close_end:].strip():
            return number, "text after the graph closes"
    if depth > 0:
        return first_line, f"unbalanced parentheses: {depth} '(' not closed"
    return None


class _BlockReader:
    """Line-by-line state machine that groups a graph file into (sentence, graph) blocks."""

    def __init__(self, path: Path, lenient: bool):
        self.path = path
        self.lenient = lenient
        self.examples: list[Example] = []
        self.skipped: list[SkippedBlock] = []
        self.block_index = 0
        self.sentence: str | None = None
        self.snt_line = 0
        self.graph: list[str] = []
        self.graph_line = 0
        self.orphan_line = 0  # first line of graph text seen without a #::snt, 0 if none

    def problem(self, line: int, reason: str) -> None:
        if not self.lenient:
            raise CorpusError(reason, path=self.path, line=line)
        logger.warning("%s:%d: skipped block: %s", self.path, line, reason)
        self.skipped.append(SkippedBlock(str(self.path), line, reason))

    def finish_block(self) -> None:
        if self.orphan_line:
            line, self.orphan_line = self.orphan_line, 0
            self.problem(line, "graph without a preceding #::snt line")
        if self.sentence is None:
            return
        sentence, graph = self.sentence, self.graph
        self.sentence, self.graph = None, []
        if not graph:
            self.problem(self.snt_line, "#::snt line without a graph")
            return
        found = _paren_problem(graph, self.graph_line)
        if found is not None:
            self.problem(*found)
            return
        self.examples.append(
            Example(
                id=f"{self.path.stem}:{self.block_index}",
                sentence=sentence,
                amr="\n".join(graph),
                source=self.path.name,
                line=self.snt_line,
            )
        )

    def feed(self, number: int, line: str) -> None:
        stripped = line.strip()
        if not stripped:
            if self.graph or self.orphan_line:
                self.finish_block()
            return
        if stripped.startswith("#"):
            m = _SNT_RE.match(stripped)
            if self.graph or self.orphan_line or (m and self.sentence is not None):
                self.finish_block()
            if m:
                self.block_index += 1
                self.sentence = (m.group(1) or "").strip()
                self.snt_line = number
            return
        if self.sentence is None:
            if not self.orphan_line:
                self.orphan_line = number
            return
        if not self.graph:
            self.graph_line = number
        self.graph.append(line.rstrip())


def read_amr_file_report(path: str | Path, lenient: bool = False) -> ReadReport:
    """Read a graph file; with lenient=True, skip malformed blocks and report them.

    File-level problems (unreadable, not UTF-8, empty, sentence-only, no graph at all)
    raise :class:`CorpusError` in both modes. In strict mode the first malformed block
    raises; in lenient mode each is logged as a warning and listed in ``skipped``.
    """
    path = Path(path)
    lines = _split_lines(_read_text(path))
    nonblank = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not nonblank:
        raise CorpusError("empty file", path=path, line=1)
    has_snt = any(_SNT_RE.match(line.strip()) for _, line in nonblank)
    has_graph = any(line.lstrip().startswith("(") for _, line in nonblank)
    text_lines = [i for i, line in nonblank if not line.lstrip().startswith("#")]
    if not has_snt and not has_graph and text_lines:
        raise CorpusError(
            "looks like a sentence-only file (no #::snt lines, no graphs) where graphs are "
            "expected; read it with read_sentences",
            path=path,
            line=text_lines[0],
        )
    reader = _BlockReader(path, lenient)
    for number, line in enumerate(lines, start=1):
        reader.feed(number, line)
    reader.finish_block()
    if not reader.examples:
        raise CorpusError("no readable graph in file", path=path, line=nonblank[0][0])
    if reader.skipped:
        logger.warning("%s: skipped %d malformed block(s)", path, len(reader.skipped))
    return ReadReport(examples=reader.examples, skipped=tuple(reader.skipped))


def read_amr_file(path: str | Path, *, lenient: bool = False) -> list[Example]:
    """Read the (sentence, graph) blocks of a graph file; see :func:`read_amr_file_report`."""
    return read_amr_file_report(path, lenient=lenient).examples


def read_sentences(path: str | Path) -> list[Example]:
    """Read a sentence-only file: one sentence per non-blank line, ``amr=None``.

    Ids count the sentences: ``public_test:1`` is the first non-blank line.
    """
    path = Path(path)
    examples = []
    for number, line in enumerate(_split_lines(_read_text(path)), start=1):
        sentence = line.strip()
        if not sentence:
            continue
        if _SNT_RE.match(sentence):
            raise CorpusError(
                "looks like a graph file (#::snt line) where sentences are expected; "
                "read it with read_amr_file",
                path=path,
                line=number,
            )
        examples.append(
            Example(
                id=f"{path.stem}:{len(examples) + 1}",
                sentence=sentence,
                amr=None,
                source=path.name,
                line=number,
            )
        )
    if not examples:
        raise CorpusError("empty file", path=path, line=1)
    return examples


def read_input_sentences(path: str | Path) -> list[Example]:
    """The sentences to parse: a sentence-only file (:func:`read_sentences`), or a graph file in
    the corpus format (a gold file), whose ``#::snt`` lines are read (:func:`read_amr_file`).

    A file is a graph file when its first non-blank line is a ``#::snt`` line.
    """
    path = Path(path)
    first = next((line.strip() for line in _split_lines(_read_text(path)) if line.strip()), "")
    if _SNT_RE.match(first):
        return read_amr_file(path)
    return read_sentences(path)


def load_corpus(
    data_dir: str | Path,
    files: Sequence[str] = DEFAULT_TRAIN_FILES,
    lenient: bool = False,
) -> list[Example]:
    """Read and concatenate the graph files of a corpus directory, in the given order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CorpusError(
            "corpus directory not found (set data_dir or RAY_MTUP_DATA_DIR)", path=data_dir
        )
    missing = [name for name in files if not (data_dir / name).is_file()]
    if missing:
        raise CorpusError(f"missing corpus file(s): {', '.join(missing)}", path=data_dir)
    if not files:
        raise CorpusError("no corpus files given", path=data_dir)
    examples: list[Example] = []
    for name in files:
        examples.extend(read_amr_file(data_dir / name, lenient=lenient))
    logger.info("read %d graphs from %d file(s) in %s", len(examples), len(files), data_dir)
    return examples


def write_amr_file(path: str | Path, items: Iterable[tuple[str, str]]) -> int:
    """Write (sentence, graph) pairs as ``#::snt`` blocks with LF endings; return the count.

    The result reads back with :func:`read_amr_file`. A sentence with a line break or an
    empty graph raises :class:`CorpusError` naming the item (1-based) as the line.
    """
    path = Path(path)
    blocks = []
    for index, (sentence, graph) in enumerate(items, start=1):
        if _NEWLINE_RE.search(sentence):
            raise CorpusError(f"item {index}: sentence contains a line break", path=path, line=index)
        graph_lines = [line.rstrip() for line in _split_lines(graph) if line.strip()]
        if not graph_lines:
            raise CorpusError(f"item {index}: empty graph", path=path, line=index)
        blocks.append(f"#::snt {sentence.strip()}\n" + "\n".join(graph_lines) + "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("".join(blocks))
    return len(blocks)


def normalise_sentence(sentence: str) -> str:
    """The key under which two sentences count as the same: NFC, case-folded, single spaces.

    >>> normalise_sentence("  Tôi   đi  học . ")
    'tôi đi học .'
    """
    return " ".join(unicodedata.normalize("NFC", sentence).casefold().split())


def find_duplicate_sentences(examples: Iterable[Example]) -> dict[str, list[str]]:
    """Normalised sentence -> ids, for sentences that occur more than once.

    >>> exs = [Example("f:1", "Trời mưa .", None, "f.txt", 1),
    ...        Example("f:2", "nắng .", None, "f.txt", 2),
    ...        Example("f:3", "trời  mưa .", None, "f.txt", 3)]
    >>> find_duplicate_sentences(exs)
    {'trời mưa .': ['f:1', 'f:3']}
    """
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(normalise_sentence(example.sentence), []).append(example.id)
    return {key: ids for key, ids in groups.items() if len(ids) > 1}


# --------------------------------------------------------------------------- the corpus form of a sentence

#: Punctuation the corpus writes as a token of its own, when it closes a word ("đi ," "học !").
_CLOSING = ',;:!?"”’)]}…'
#: ... and when it opens one ("( xem", "“ coi").
_OPENING = '"“‘([{'
_SEGMENTED_RE = re.compile(r"(?<=[^\W_])_+(?=[^\W_])")


def _split_token(token: str, last: bool) -> list[str]:
    """One whitespace token with its opening and closing punctuation split off, as the corpus
    writes it. A closing ``.`` is split off at the end of the line, or when it is part of an
    ellipsis (``..``, ``...``); elsewhere it stays (``tp.``, ``q.1``, ``an.hus@gmail.com``).

    >>> _split_token('("Thế', False), _split_token('đâu?!', False), _split_token('học.', True), _split_token('tp.', False)
    (['(', '"', 'Thế'], ['đâu', '?', '!'], ['học', '.'], ['tp.'])
    >>> _split_token('nữa...', False), _split_token('10:32', False), _split_token('...', False)
    (['nữa', '...'], ['10:32'], ['...'])
    """
    head: list[str] = []
    while len(token) > 1 and token[0] in _OPENING:
        head.append(token[0])
        token = token[1:]
    tail: list[str] = []
    while len(token) > 1:
        dots = len(token) - len(token.rstrip("."))
        if dots and dots < len(token) and (dots > 1 or last):
            tail.insert(0, token[-dots:])
            token = token[:-dots]
        elif token[-1] in _CLOSING:
            tail.insert(0, token[-1])
            token = token[:-1]
        else:
            break
    return head + [token] + tail


def to_corpus_form(sentence: str) -> str:
    """A sentence written as the training corpus writes its sentences: NFC, lower case,
    syllables separated by spaces (a word-segmenter's ``_`` becomes a space), punctuation a
    token of its own, single spaces. Corpus sentences are (nearly all) unchanged by it.

    >>> to_corpus_form("Hắn trợn mắt lên quát : - Thế_thì thằng nào ăn đi ?")
    'hắn trợn mắt lên quát : - thế thì thằng nào ăn đi ?'
    >>> to_corpus_form("Ông Giáo kéo ghế ngồi, dựa cái bàn.")
    'ông giáo kéo ghế ngồi , dựa cái bàn .'
    >>> to_corpus_form("bi kịch là ở chỗ đó !")
    'bi kịch là ở chỗ đó !'
    """
    text = _SEGMENTED_RE.sub(" ", unicodedata.normalize("NFC", sentence)).lower()
    tokens = text.split()
    return " ".join(t for i, token in enumerate(tokens) for t in _split_token(token, i == len(tokens) - 1))


def looks_unlike_corpus(sentence: str) -> bool:
    """True for a sentence that is word-segmented (``Thế_thì``) or has a capital letter, which
    the training sentences almost never are (27 of the 1,842 VLSP training sentences have a
    capital, 8 an ``_``).

    >>> looks_unlike_corpus("Thế_thì sao ?"), looks_unlike_corpus("thế thì sao ?")
    (True, False)
    """
    return bool(_SEGMENTED_RE.search(sentence)) or any(c.isupper() for c in sentence)
