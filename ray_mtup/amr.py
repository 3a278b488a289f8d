"""AMR graph handling: normalisation, the variable-free task-1 form, and repair.

Three text forms of a graph occur in the pipeline:

* **corpus PENMAN** as the VLSP files write it: ``:role(`` with no space, multi-word
  concepts with spaces (``(c / chủ tịch)``), CRLF line endings;
* **canonical PENMAN**, the output of :func:`normalise`, used on gold graphs and model
  predictions alike: multi-word concepts joined with ``_``, penman's own layout with an
  indent of 4;
* **task 1**, the output of :func:`to_task1`: the graph on one line without variables,
  ``(nói :agent (linh) :topic (chuyện :mod (nhiều)))``.

Re-entrancies in task 1
-----------------------
Dropping variables loses re-entrancies, and leaving bare variable names in (as the
original MTUP recipe did) is ambiguous: a bare ``t`` may be a variable or a constant.
Here a node that is the target of a re-entrancy carries a *label* ``<k>`` right after
its concept, and every other place that points at it writes the label alone::

    (muốn :agent (tôi <1>) :theme (đi :agent <1>))

Labels are numbered ``<1>``, ``<2>``, ... in the order in which they first appear in the
line (a reference may come before the labelled node). Only re-entrant nodes are labelled,
so graphs without re-entrancy look exactly like the plain MTUP form. A token of the form
``<digits>`` is therefore never a constant: :func:`normalise` (and so :func:`to_task1`)
refuses a graph with such a symbol, and :func:`repair` drops it. :func:`restore` turns labels back into variables.

Repair
------
:func:`repair` and :func:`repair_task1` turn raw model output into a valid canonical graph
when they can and report what they changed; they never raise. A graph that still cannot
be decoded comes back with ``valid=False`` so that the evaluation can count it.

>>> to_task1("(m / muốn :agent(t / tôi) :theme(đ / đi :agent t))")
'(muốn :agent (tôi <1>) :theme (đi :agent <1>))'
>>> print(restore('(muốn :agent (tôi <1>) :theme (đi :agent <1>))'))
(m / muốn
    :agent (t / tôi)
    :theme (đ / đi
        :agent t))
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import NamedTuple

import penman
from penman.exceptions import PenmanError
from penman.tree import Tree

from ray_mtup.errors import AmrError

logger = logging.getLogger(__name__)

__all__ = [
    "CONCEPT_STYLES",
    "Repair",
    "concept_style",
    "normalise",
    "repair",
    "repair_task1",
    "restore",
    "to_task1",
]

INDENT = 4
"""Indentation of canonical PENMAN (the corpus uses 4 spaces)."""

MAX_DEPTH = 100
"""Deepest nesting that repair accepts (training graphs reach 12); deeper is invalid."""

_LABEL_RE = re.compile(r"<\d+>\Z")

# The same token classes as penman's lexer, so that what we join or repair is what
# penman will read: a symbol stops at whitespace, quotes, parentheses, '/', ':' and '~'.
_TOKEN_RE = re.compile(
    r"""
     (?P<STRING>"[^"\\]*(?:\\.[^"\\]*)*")
    |(?P<OPENSTRING>"[^"]*\Z)
    |(?P<COMMENT>\#[^\r\n]*)
    |(?P<LPAREN>\()
    |(?P<RPAREN>\))
    |(?P<SLASH>/)
    |(?P<ROLE>:[^\s"()/:~]*)
    |(?P<SYMBOL>[^\s"()/:~]+)
    |(?P<OTHER>\S)
    """,
    re.VERBOSE,
)


class _Tok(NamedTuple):
    kind: str
    text: str


def _lex(text: str) -> list[_Tok]:
    """Split PENMAN or task-1 text into tokens; ``<k>`` symbols become LABEL tokens.

    >>> [t.kind for t in _lex('(a / b :arg0(c <1>) "x y")')]
    ['LPAREN', 'SYMBOL', 'SLASH', 'SYMBOL', 'ROLE', 'LPAREN', 'SYMBOL', 'LABEL', 'RPAREN', 'STRING', 'RPAREN']
    """
    tokens = []
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        value = m.group()
        if kind == "SYMBOL" and _LABEL_RE.match(value):
            kind = "LABEL"
        tokens.append(_Tok(kind, value))
    return tokens


def _var_prefix(concept: str) -> str:
    """First letter of a concept, lower-cased, or ``x`` when it does not start with a letter.

    >>> [_var_prefix(c) for c in ["nói", "Đà_Nẵng", "ấy", "1900", '"x"', "-"]]
    ['n', 'đ', 'ấ', 'x', 'x', 'x']
    """
    first = concept[:1]
    return first.lower() if first.isalpha() else "x"


class VariableNamer:
    """Hands out fresh variables ``n``, ``n1``, ``n2``... avoiding names already in use."""

    def __init__(self, used: set[str]):
        self.used = set(used)

    def fresh(self, concept: str) -> str:
        prefix = _var_prefix(concept)
        name, k = prefix, 0
        while name in self.used:
            k += 1
            name = f"{prefix}{k}"
        self.used.add(name)
        return name


# ---------------------------------------------------------------------------
# Strict parsing: corpus or canonical PENMAN -> penman Tree
# ---------------------------------------------------------------------------


def _join_concepts(tokens: list[_Tok]) -> list[_Tok]:
    """Join the words of a multi-word concept (the symbols right after ``/``) with ``_``.

    Only the concept position is touched: constants and quoted strings stay as they are.

    >>> [t.text for t in _join_concepts(_lex('(c / chủ tịch :mod "a b")'))]
    ['(', 'c', '/', 'chủ_tịch', ':mod', '"a b"', ')']
    """
    out: list[_Tok] = []
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        out.append(tok)
        i += 1
        if tok.kind == "SLASH":
            words = []
            while i < n and tokens[i].kind == "SYMBOL":
                words.append(tokens[i].text)
                i += 1
            if words:
                out.append(_Tok("SYMBOL", "_".join(words)))
    return out


CONCEPT_STYLES = ("space", "_")
"""How multi-word concepts are written in output files: ``chủ tịch`` (the shared task's
test gold, and smatch, which drops the space) or ``chủ_tịch`` (canonical PENMAN)."""


def concept_style(graph: str, style: str) -> str:
    """``graph`` with its concepts' ``_`` written as ``style``; layout, constants and strings kept.

    >>> print(concept_style('(c / chủ_tịch\\n    :name (n / name :op1 "a_b"))', "space"))
    (c / chủ tịch
        :name (n / name :op1 "a_b"))
    >>> concept_style("(c / chủ_tịch)", "_")
    '(c / chủ_tịch)'
    """
    if style not in CONCEPT_STYLES:
        raise AmrError(f"unknown concept style {style!r}; choose from {list(CONCEPT_STYLES)}")
    if style == "_":
        return graph
    out, last, previous = [], 0, ""
    for m in _TOKEN_RE.finditer(graph):
        if m.lastgroup == "SYMBOL" and previous == "SLASH":
            out.append(graph[last:m.start()] + m.group().replace("_", " "))
            last = m.end()
        previous = m.lastgroup or ""
    return "".join(out) + graph[last:]


def _tokens_to_text(tokens: list[_Tok]) -> str:
    return " ".join(t.text for t in tokens)


def _fill_missing_variables(tokens: list[_Tok]) -> list[_Tok]:
    """Give a fresh variable to nodes written ``( / concept`` (one training graph has one)."""
    if not any(
        tokens[i].kind == "LPAREN" and tokens[i + 1].kind == "SLASH" for i in range(len(tokens) - 1)
    ):
        return tokens
    namer = VariableNamer({t.text for t in tokens if t.kind == "SYMBOL"})
    out: list[_Tok] = []
    for i, tok in enumerate(tokens):
        out.append(tok)
        if tok.kind == "LPAREN" and i + 1 < len(tokens) and tokens[i + 1].kind == "SLASH":
            concept = tokens[i + 2].text if i + 2 < len(tokens) else ""
            var = namer.fresh(concept)
            logger.debug("node '( / %s' without a variable: named it %s", concept, var)
            out.append(_Tok("SYMBOL", var))
    return out


def _check_tree(tree: Tree) -> None:
    """Reject what penman decodes but smatch cannot score: missing concepts or targets,
    a variable defined twice."""
    seen: set[str] = set()
    for var, branches in tree.nodes():
        if var in seen:
            raise AmrError(f"variable {var!r} is defined twice")
        seen.add(var)
        if not branches or branches[0][0] != "/" or branches[0][1] is None:
            raise AmrError(f"node {var!r} has no concept")
        for role, target in branches[1:]:
            if role == "/":
                raise AmrError(f"node {var!r} has two concepts")
            if target is None:
                raise AmrError(f"role {role} of node {var!r} has no value")


def _drop_duplicate_references(tree: Tree) -> None:
    """Remove a re-entrancy that repeats an edge already in the graph, in place.

    Some training graphs state one edge twice, e.g. ``(g :pivot-of (c / có :pivot g))``.
    A graph is a set of triples, so penman would keep one and warn; we drop the repeated
    reference (a leaf, never a subtree) here, quietly and the same way every time.
    """
    variables = {var for var, _ in tree.nodes()}
    seen: set[tuple[str, str, str]] = set()

    def visit(node: tuple) -> None:
        source, branches = node
        keep = []
        for role, target in branches:
            if role == "/":
                keep.append((role, target))
                continue
            target_id = target[0] if isinstance(target, tuple) else target
            if role.endswith("-of") and target_id in variables:
                triple = (target_id, role[:-3], source)
            else:
                triple = (source, role, target_id)
            if triple in seen and not isinstance(target, tuple):
                logger.debug("dropped repeated edge %s", triple)
                continue
            seen.add(triple)
            keep.append((role, target))
            if isinstance(target, tuple):
                visit(target)
        branches[:] = keep

    visit(tree.node)


def _parse_tree(text: str) -> Tree:
    """Corpus or canonical PENMAN -> a checked penman Tree (raises AmrError)."""
    if not isinstance(text, str):
        raise AmrError(f"expected a str, got {type(text).__name__}")
    tokens = _lex(text)
    if not tokens:
        raise AmrError("empty graph")
    for tok in tokens:
        if tok.kind in ("OTHER", "OPENSTRING", "COMMENT", "LABEL"):
            raise AmrError(f"unexpected {tok.text[:20]!r} in graph")
    depth = 0
    for i, tok in enumerate(tokens):
        if tok.kind == "LPAREN":
            depth += 1
        elif tok.kind == "RPAREN":
            depth -= 1
            if depth == 0 and i != len(tokens) - 1:
                raise AmrError(f"text after the graph closes: {tokens[i + 1].text[:20]!r}")
    tokens = _fill_missing_variables(_join_concepts(tokens))
    try:
        tree = penman.parse(_tokens_to_text(tokens))
    except PenmanError as exc:
        raise AmrError(f"cannot decode graph: {exc}") from exc
    except RecursionError as exc:
        raise AmrError("graph nested too deeply") from exc
    _check_tree(tree)
    _drop_duplicate_references(tree)
    return tree


def normalise(text: str) -> str:
    """THE normalisation of gold graphs and predictions: canonical multi-line PENMAN.

    Accepts ``:role(`` without a space, multi-word concepts with spaces (joined with
    ``_``; quoted strings and constants are left alone), any line endings, and a node
    without a variable (``( / 1900)``, given a fresh one). Raises :class:`AmrError` on
    anything penman cannot decode, on a role without a value, a node without a concept
    and a variable defined twice (smatch cannot score those).

    >>> print(normalise("(t / thuận lợi\\r\\n    :domain(c / công việc))"))
    (t / thuận_lợi
        :domain (c / công_việc))
    >>> normalise("(a / b :ARG0)")
    Traceback (most recent call last):
    ...
    ray_mtup.errors.AmrError: role :ARG0 of node 'a' has no value
    """
    tree = _parse_tree(text)
    try:
        graph = penman.layout.interpret(tree)
        return penman.encode(graph, indent=INDENT)
    except PenmanError as exc:
        raise AmrError(f"cannot encode graph: {exc}") from exc


# ---------------------------------------------------------------------------
# Task 1: the variable-free form
# ---------------------------------------------------------------------------


def to_task1(text: str) -> str:
    """The graph on one line without variables; re-entrant nodes get ``<k>`` labels.

    Accepts anything :func:`normalise` accepts. Constants (``-``, numbers, quoted strings,
    ``interrogative``) stay as they are.

    >>> to_task1("(n / nói :agent(l / linh) :topic(c / chuyện :mod(n1 / nhiều)))")
    '(nói :agent (linh) :topic (chuyện :mod (nhiều)))'
    >>> to_task1("(c / có :polarity - :quant 2 :name \\"Hà Nội\\")")
    '(có :polarity - :quant 2 :name "Hà Nội")'
    """
    tree = _parse_tree(text)
    variables = {var for var, _ in tree.nodes()}
    referenced: set[str] = set()
    for _, branches in tree.nodes():
        for role, target in branches[1:]:
            if isinstance(target, str) and target in variables:
                referenced.add(target)
    labels: dict[str, str] = {}

    def label(var: str) -> str:
        if var not in labels:
            labels[var] = f"<{len(labels) + 1}>"
        return labels[var]

    parts: list[str] = []

    def emit(node: tuple) -> None:
        var, branches = node
        parts.append("(" + branches[0][1])
        if var in referenced:
            parts.append(" " + label(var))
        for role, target in branches[1:]:
            parts.append(" " + role + " ")
            if isinstance(target, tuple):
                emit(target)
            elif target in variables:
                parts.append(label(target))
            else:
                parts.append(target)
        parts.append(")")

    emit(tree.node)
    return "".join(parts)


class _TNode:
    """A node of a task-1 (or repaired step-2) graph before variables are assigned."""

    __slots__ = ("concept", "label", "var", "edges")

    def __init__(self, concept: str, label: str | None = None, var: str | None = None):
        self.concept = concept
        self.label = label
        self.var = var
        self.edges: list[tuple[str, _TNode | _Tok]] = []


class _Task1Parser:
    """Strict recursive-descent parser of the task-1 form."""

    def __init__(self, text: str):
        self.tokens = _lex(text)
        self.pos = 0

    def _peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _fail(self, what: str) -> AmrError:
        tok = self._peek()
        found = "end of input" if tok is None else repr(tok.text[:20])
        return AmrError(f"task-1 form: expected {what} at token {self.pos + 1}, found {found}")

    def parse(self) -> _TNode:
        node = self._node(1)
        if self._peek() is not None:
            raise self._fail("end of input after the root closes")
        return node

    def _node(self, depth: int) -> _TNode:
        if depth > MAX_DEPTH:
            raise AmrError(f"task-1 form: nested deeper than {MAX_DEPTH}")
        tok = self._peek()
        if tok is None or tok.kind != "LPAREN":
            raise self._fail("'('")
        self.pos += 1
        tok = self._peek()
        if tok is not None and tok.kind == "STRING":
            concept = tok.text
            self.pos += 1
        else:
            words = []
            while (tok := self._peek()) is not None and tok.kind == "SYMBOL":
                words.append(tok.text)
                self.pos += 1
            if not words:
                raise self._fail("a concept")
            concept = "_".join(words)
        node = _TNode(concept)
        tok = self._peek()
        if tok is not None and tok.kind == "LABEL":
            node.label = tok.text
            self.pos += 1
        while True:
            tok = self._peek()
            if tok is None:
                raise self._fail("')'")
            if tok.kind == "RPAREN":
                self.pos += 1
                return node
            if tok.kind != "ROLE":
                raise self._fail("a role or ')'")
            self.pos += 1
            target = self._peek()
            if target is None:
                raise self._fail("a value")
            if target.kind == "LPAREN":
                node.edges.append((tok.text, self._node(depth + 1)))
            elif target.kind in ("SYMBOL", "STRING", "LABEL"):
                node.edges.append((tok.text, target))
                self.pos += 1
            else:
                raise self._fail("a value")


def _walk(node: _TNode):
    """Nodes of a _TNode tree in depth-first (written) order."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(t for _, t in reversed(current.edges) if isinstance(t, _TNode))


def _serialise(node: _TNode, refs: dict[str, str]) -> str:
    """Write a _TNode tree as one-line PENMAN; LABEL targets become variables via refs."""
    parts: list[str] = []

    def emit(n: _TNode) -> None:
        parts.append(f"({n.var} / {n.concept}")
        for role, target in n.edges:
            parts.append(f" {role} ")
            if isinstance(target, _TNode):
                emit(target)
            elif target.kind == "LABEL":
                parts.append(refs[target.text])
            else:
                parts.append(target.text)
        parts.append(")")

    emit(node)
    return "".join(parts)


def _assign_variables(root: _TNode) -> dict[str, str]:
    """Give every node a fresh variable (n, n1, ...) avoiding constants; return label -> var."""
    constants = set()
    for n in _walk(root):
        for _, target in n.edges:
            if isinstance(target, _Tok) and target.kind == "SYMBOL":
                constants.add(target.text)
    namer = VariableNamer(constants)
    refs: dict[str, str] = {}
    for n in _walk(root):
        n.var = namer.fresh(n.concept)
        if n.label is not None:
            if n.label in refs:
                raise AmrError(f"task-1 form: label {n.label} is given to two nodes")
            refs[n.label] = n.var
    for n in _walk(root):
        for _, target in n.edges:
            if isinstance(target, _Tok) and target.kind == "LABEL" and target.text not in refs:
                raise AmrError(f"task-1 form: label {target.text} refers to no node")
    return refs


def restore(task1: str) -> str:
    """The task-1 form back to canonical PENMAN with fresh variables.

    Variables are the concept's first letter, numbered when taken (``n``, ``n1``, ``n2``;
    ``x`` when the concept does not start with a letter) and never equal to a constant
    of the graph. Raises :class:`AmrError` when the text is not valid task-1 form.

    >>> print(restore("(nói :agent (nam) :topic (nhà :mod (nhỏ)))"))
    (n / nói
        :agent (n1 / nam)
        :topic (n2 / nhà
            :mod (n3 / nhỏ)))
    >>> restore("(nói :agent <1>)")
    Traceback (most recent call last):
    ...
    ray_mtup.errors.AmrError: task-1 form: label <1> refers to no node
    """
    if not isinstance(task1, str):
        raise AmrError(f"expected a str, got {type(task1).__name__}")
    root = _Task1Parser(task1).parse()
    refs = _assign_variables(root)
    return normalise(_serialise(root, refs))


# ---------------------------------------------------------------------------
# Repair of model output
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Repair:
    """The outcome of repairing one model output.

    graph: canonical PENMAN, or None when the output could not be made valid.
    valid: whether graph is a decodable graph.
    repaired: whether anything had to change beyond normalisation.
    notes: what was changed (or why the output is invalid), in order.
    """

    graph: str | None
    valid: bool
    repaired: bool
    notes: tuple[str, ...]


class _TooDeep(Exception):
    pass


_GRAPH_START_RE = re.compile(r'\(\s*[^\s"()/:~]+\s*/')
_TASK1_START_RE = re.compile(r'\(\s*[^\s"()/:~<]')


class _LenientParser:
    """Reads whatever a model wrote into a _TNode tree, noting every fix it makes.

    with_variables=True reads step-2 output ``(v / concept :role ...)``; False reads the
    task-1 form ``(concept <k> :role ...)``. Both accept the other's node header.
    """

    def __init__(self, tokens: list[_Tok], notes: list[str], with_variables: bool):
        self.tokens = tokens
        self.pos = 0
        self.notes = notes
        self.with_variables = with_variables
        self.unclosed = 0

    def _peek(self, offset: int = 0) -> _Tok | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def _concept(self) -> str | None:
        tok = self._peek()
        if tok is not None and tok.kind == "STRING":
            self.pos += 1
            return tok.text
        words = []
        while (tok := self._peek()) is not None and tok.kind == "SYMBOL":
            words.append(tok.text)
            self.pos += 1
        return "_".join(words) if words else None

    def node(self, depth: int) -> _TNode | None:
        """Parse a node at '('; None when it has no concept (it is then dropped)."""
        if depth > MAX_DEPTH:
            raise _TooDeep
        self.pos += 1  # '('
        var = None
        first, second = self._peek(), self._peek(1)
        if first is not None and first.kind == "SYMBOL" and second is not None and second.kind == "SLASH":
            var = first.text
            self.pos += 2
        elif first is not None and first.kind == "SLASH":
            self.pos += 1
        concept = self._concept()
        label = None
        tok = self._peek()
        if tok is not None and tok.kind == "LABEL":
            label = tok.text
            self.pos += 1
        node = _TNode(concept or "", label=label, var=var)
        if self.with_variables and var is None and concept is not None:
            self.notes.append(f"gave a variable to node {concept!r}")
        if not self.with_variables and var is not None:
            self.notes.append(f"dropped variable {var!r}")
        while True:
            tok = self._peek()
            if tok is None:
                self.unclosed += 1
                break
            if tok.kind == "RPAREN":
                self.pos += 1
                break
            if tok.kind == "ROLE":
                self._edge(node, depth)
            elif tok.kind == "LPAREN":
                self.notes.append("dropped a subgraph without a role")
                self.node(depth + 1)
            else:
                self.notes.append(f"dropped stray {tok.text[:20]!r}")
                self.pos += 1
        if concept is None:
            self.notes.append("dropped a node without a concept")
            return None
        return node

    def _edge(self, node: _TNode, depth: int) -> None:
        role = self._peek()
        self.pos += 1
        target = self._peek()
        if target is None or target.kind in ("RPAREN", "ROLE"):
            self.notes.append(f"dropped role {role.text} without a value")
        elif target.kind == "LPAREN":
            child = self.node(depth + 1)
            if child is not None:
                node.edges.append((role.text, child))
        elif target.kind in ("SYMBOL", "STRING", "LABEL"):
            node.edges.append((role.text, target))
            self.pos += 1
        else:
            self.notes.append(f"dropped role {role.text} followed by {target.text[:20]!r}")


def _prepare_tokens(text: str, start_re: re.Pattern, notes: list[str]) -> list[_Tok] | None:
    """Cut the output to its graph and lex it; None when there is no '(' at all."""
    m = start_re.search(text)
    start = m.start() if m else text.find("(")
    if start < 0:
        notes.append("no '(' in the output")
        return None
    if text[:start].strip():
        notes.append("dropped text before the graph")
    tokens = []
    for tok in _lex(text[start:]):
        if tok.kind in ("OTHER", "COMMENT"):
            notes.append(f"dropped unexpected {tok.text[:20]!r}")
        elif tok.kind == "OPENSTRING":
            notes.append("closed an unterminated string")
            tokens.append(_Tok("STRING", tok.text.rstrip() + '"'))
        else:
            tokens.append(tok)
    return tokens


def _lenient_parse(text: str, notes: list[str], with_variables: bool) -> _TNode | None:
    start_re = _GRAPH_START_RE if with_variables else _TASK1_START_RE
    tokens = _prepare_tokens(text, start_re, notes)
    if tokens is None:
        return None
    parser = _LenientParser(tokens, notes, with_variables)
    try:
        root = parser.node(1)
    except _TooDeep:
        notes.append(f"nested deeper than {MAX_DEPTH}")
        return None
    if parser.unclosed:
        notes.append(f"closed {parser.unclosed} unclosed parenthes{'is' if parser.unclosed == 1 else 'es'}")
    if parser.pos < len(tokens):
        notes.append("dropped text after the graph")
    if root is None:
        notes.append("the root has no concept")
    return root


def _fix_variables(root: _TNode, notes: list[str]) -> None:
    """Give nodes without a variable a fresh one and rename duplicate definitions."""
    used = set()
    for n in _walk(root):
        if n.var is not None:
            used.add(n.var)
        for _, target in n.edges:
            if isinstance(target, _Tok) and target.kind == "SYMBOL":
                used.add(target.text)
    namer = VariableNamer(used)
    defined: set[str] = set()
    for n in _walk(root):
        if n.var is None:
            n.var = namer.fresh(n.concept)
        elif n.var in defined:
            new = namer.fresh(n.concept)
            notes.append(f"renamed duplicate variable {n.var!r} to {new!r}")
            n.var = new
        defined.add(n.var)


MAX_NOTES = 20
"""Notes kept per repair: the first ones, a count of those left out, and the last one."""


def _capped(notes: list[str]) -> tuple[str, ...]:
    if len(notes) <= MAX_NOTES:
        return tuple(notes)
    hidden = len(notes) - MAX_NOTES + 1
    return (*notes[: MAX_NOTES - 2], f"... and {hidden} more fixes", notes[-1])


def _finish(notes: list[str], build) -> Repair:
    """Run the last step (build() -> canonical text) and package the result."""
    try:
        graph = build()
    except AmrError as exc:
        notes.append(f"still invalid: {exc}")
        logger.debug("repair failed: %s", "; ".join(notes[-MAX_NOTES:]))
        return Repair(graph=None, valid=False, repaired=True, notes=_capped(notes))
    return Repair(graph=graph, valid=True, repaired=bool(notes), notes=_capped(notes))


def _invalid(notes: list[str]) -> Repair:
    logger.debug("repair failed: %s", "; ".join(notes[:MAX_NOTES]))
    return Repair(graph=None, valid=False, repaired=True, notes=_capped(notes))


def repair(text: str) -> Repair:
    """Turn raw model output with variables (step 2) into canonical PENMAN; never raises.

    Drops text before the first ``(`` that opens ``(var /`` and after the root closes,
    closes unclosed parentheses, gives a fresh name to a variable introduced twice,
    drops roles without a value, nodes without a concept and stray tokens, then
    :func:`normalise`-s. ``valid=False`` and ``graph=None`` when nothing decodable is left.

    >>> r = repair("AMR: (a / ăn :agent (t / tôi) :theme (t / táo) :time")
    >>> print(r.graph)
    (a / ăn
        :agent (t / tôi)
        :theme (t1 / táo))
    >>> r.valid, r.repaired
    (True, True)
    >>> r.notes
    ('dropped text before the graph', 'dropped role :time without a value', 'closed 1 unclosed parenthesis', "renamed duplicate variable 't' to 't1'")
    >>> repair("no graph here")
    Repair(graph=None, valid=False, repaired=True, notes=("no '(' in the output",))
    """
    notes: list[str] = []
    if not isinstance(text, str):
        return _invalid([f"not a str but {type(text).__name__}"])
    root = _lenient_parse(text, notes, with_variables=True)
    if root is None:
        return _invalid(notes)
    for n in _walk(root):
        if n.label is not None:
            notes.append(f"dropped task-1 label {n.label}")
            n.label = None
        kept = []
        for role, target in n.edges:
            if isinstance(target, _Tok) and target.kind == "LABEL":
                notes.append(f"dropped role {role} pointing at task-1 label {target.text}")
            else:
                kept.append((role, target))
        n.edges = kept
    _fix_variables(root, notes)
    return _finish(notes, lambda: normalise(_serialise(root, {})))


def repair_task1(text: str) -> Repair:
    """Like :func:`repair` for task-1 output (no variables), then :func:`restore`.

    Besides the fixes of :func:`repair`: a label given to a second node is dropped from
    it, and a role pointing at a label no node carries is dropped.

    >>> r = repair_task1("(nói :agent (tôi <1>) :theme (đi :agent <1> :time <2>")
    >>> print(r.graph)
    (n / nói
        :agent (t / tôi)
        :theme (đ / đi
            :agent t))
    >>> r.notes
    ('closed 2 unclosed parentheses', 'dropped role :time pointing at unknown label <2>')
    """
    notes: list[str] = []
    if not isinstance(text, str):
        return _invalid([f"not a str but {type(text).__name__}"])
    root = _lenient_parse(text, notes, with_variables=False)
    if root is None:
        return _invalid(notes)
    labelled: set[str] = set()
    for n in _walk(root):
        if n.label is not None:
            if n.label in labelled:
                notes.append(f"dropped second use of label {n.label}")
                n.label = None
            else:
                labelled.add(n.label)
    for n in _walk(root):
        kept = []
        for role, target in n.edges:
            if isinstance(target, _Tok) and target.kind == "LABEL" and target.text not in labelled:
                notes.append(f"dropped role {role} pointing at unknown label {target.text}")
            else:
                kept.append((role, target))
        n.edges = kept

    def build() -> str:
        for n in _walk(root):
            n.var = None
        refs = _assign_variables(root)
        return normalise(_serialise(root, refs))

    return _finish(notes, build)
