"""Grammar-constrained decoding of the step-2 graph: well-formed PENMAN, fresh variables.

Generation runs in two phases (:func:`ray_mtup.generation.generate_constrained`):

1. step 1 is generated freely until the model writes the template's step-2 marker (or EOS, or
   the budget runs out);
2. the prompt, the step-1 text and the marker are tokenised the way training tokenised them
   (prompt alone, completion alone), and the step-2 graph is generated under
   :class:`PenmanLogitsProcessor` with its own budget of ``max_new_tokens``.

:class:`PenmanLogitsProcessor` masks, at every step and for every row,

* what the Lark grammar :data:`PENMAN_LARK` does not allow next, through ``llguidance`` (a
  maintained structured-generation library with a Hugging Face tokenizer bridge): one node
  ``(var / concept :role value ...)``, balanced parentheses, roles starting with ``:``, EOS only
  once the graph is complete;
* the tokens that would complete a variable already introduced (a grammar cannot express "no
  variable introduced twice"; :class:`FreshVariables` does it on the token bytes);
* near the end of the budget, the tokens that open a node or a role, so the graph closes.

Should a row still run out of budget, :func:`close_partial` cuts it back to its last complete
element and closes the open parentheses; :attr:`ConstrainedStats.forced_closures` counts those.
Together every step-2 output is a PENMAN graph that ``penman`` decodes without repair.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ModelError

logger = logging.getLogger(__name__)

#: Longest variable the grammar allows (corpus variables have at most 4 characters).
MAX_VAR_LEN = 8
#: The step-2 graph, in the layout of the normalised corpus graphs (``amr.normalise``):
#: ``(v / concept`` then roles, each on a new indented line or after one space.
PENMAN_LARK = r"""
start: node
node: "(" VAR " / " SYMBOL (SEP ROLE " " value)* ")"
value: node | SYMBOL | STRING
SEP: /\n {0,48}/ | " "
ROLE: /:[^\s()\/:"~]{1,40}/
VAR: /[^\s()\/:"~]{1,%d}/
SYMBOL: /[^\s()\/:"~]{1,60}/
STRING: /"[^"\n()]{0,80}"/
""" % MAX_VAR_LEN

_OPEN_VAR = re.compile(rb"\(([^\s()/:\"~]*)$")
_DONE_VAR = re.compile(rb"\(([^\s()/:\"~]+) ")
#: What a row becomes when the budget ends before its first concept (counted as a forced closure).
FALLBACK_GRAPH = "(a / amr-unknown)"
#: Closing mode starts this many tokens (plus the nesting depth) before the budget ends.
CLOSING_MARGIN = 12


@dataclass
class ConstrainedStats:
    """What the constrained decoder did over one :func:`~ray_mtup.generation.generate_constrained` call."""

    rows: int = 0
    forced_closures: int = 0
    missing_marker: int = 0
    step1_tokens: int = 0
    step2_tokens: int = 0


class FreshVariables:
    """Token ids that would complete an already-introduced variable, per generation state.

    A variable is complete when a space follows it (the grammar writes ``(var / concept``), so
    a token completes variable ``u`` from the partial variable ``p`` when its bytes start with
    ``u[len(p):] + b" "``. Tokens are grouped once by the bytes before their first space. A used
    variable of the grammar's maximum length cannot be extended, so the token that would spell
    it (``u[len(p):]`` exactly) is banned too: it would leave no fresh way on.
    """

    def __init__(self, token_bytes: Sequence[bytes], max_len: int = MAX_VAR_LEN):
        self.max_len = max_len
        self.by_head: dict[bytes, list[int]] = {}
        self.exact: dict[bytes, list[int]] = {}
        for tid, b in enumerate(token_bytes):
            cut = b.find(b" ")
            if cut >= 0:
                self.by_head.setdefault(b[:cut], []).append(tid)
            self.exact.setdefault(b, []).append(tid)

    @staticmethod
    def state(text: bytes) -> tuple[bytes | None, set[bytes]]:
        """(partial variable being written, or None when not in variable position; variables used)."""
        m = _OPEN_VAR.search(text)
        return (m.group(1) if m else None), set(_DONE_VAR.findall(text))

    def banned(self, text: bytes) -> list[int]:
        partial, used = self.state(text)
        if partial is None:
            return []
        out: list[int] = []
        for u in used:
            if u.startswith(partial):
                out += self.by_head.get(u[len(partial):], [])
                if len(u) >= self.max_len and len(u) > len(partial):
                    out += self.exact.get(u[len(partial):], [])
        return out


def depth(text: bytes) -> int:
    """Open parentheses of a grammar prefix (strings cannot hold parentheses)."""
    return text.count(b"(") - text.count(b")")


def close_partial(text: str) -> str:
    """Cut a grammar prefix back to its last complete element and close its parentheses.

    >>> close_partial("(a / b :ARG0 (c / d")
    '(a / b :ARG0 (c / d))'
    >>> close_partial("(a / b :ARG0 (c /")
    '(a / b)'
    >>> close_partial("(a / b\\n    :ARG1")
    '(a / b)'
    >>> close_partial("(a")
    ''
    """
    items = re.findall(r'\(|\)|/|:[^\s()/:"~]+|"[^"]*"?|[^\s()/:"~]+', text)
    if items and items[-1].startswith('"') and (len(items[-1]) < 2 or not items[-1].endswith('"')):
        items.pop()  # an unfinished string
    while items:
        last = items[-1]
        if last == ")":
            break
        if last not in ("(", "/") and not last.startswith(":") and len(items) >= 2 and items[-2] != "(":
            break  # a concept or a role's value
        items.pop()
    if not items:
        return ""
    out = ""
    for it in items:
        if it == "(":
            out += ("" if not out or out.endswith(" ") else " ") + "("
        elif it == "/":
            out += " / "
        elif it == ")":
            out += ")"
        elif it.startswith(":"):
            out += " " + it + " "
        else:
            out += it
    opened = sum(1 for it in items if it == "(") - sum(1 for it in items if it == ")")
    return out + ")" * opened


class PenmanLogitsProcessor:
    """A transformers logits processor: grammar + fresh variables + closing, one matcher per row."""

    def __init__(self, grammar: "Grammar", n_rows: int, prompt_width: int, budget: int):
        import llguidance
        import llguidance.torch as lt

        self.g = grammar
        self.prompt_width = prompt_width
        self.budget = budget
        self.matchers = [llguidance.LLMatcher(grammar.ll_tokenizer, grammar.compiled) for _ in range(n_rows)]
        self.text = [b""] * n_rows
        self.done = [False] * n_rows
        self.bitmask = lt.allocate_token_bitmask(n_rows, grammar.ll_tokenizer.vocab_size)
        self._lt = lt

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width
        neg = torch.finfo(scores.dtype).min
        for row, matcher in enumerate(self.matchers):
            if step > 0 and not self.done[row]:
                tok = int(input_ids[row, -1])
                if tok == self.g.eos_id or not matcher.consume_token(tok):
                    self.done[row] = True
                else:
                    self.text[row] += self.g.token_bytes[tok]
            if self.done[row]:
                scores[row, :] = neg
                scores[row, self.g.eos_id] = 0.0
                continue
            self._lt.fill_next_token_bitmask(matcher, self.bitmask, row)
        self._lt.apply_token_bitmask_inplace(scores[:, : self.bitmask.shape[1] * 32], self.bitmask.to(scores.device))
        if scores.shape[1] > self.g.ll_tokenizer.vocab_size:
            scores[:, self.g.ll_tokenizer.vocab_size:] = neg
        left = self.budget - step
        for row in range(len(self.matchers)):
            if self.done[row]:
                continue
            banned = self.g.fresh.banned(self.text[row])
            if left <= depth(self.text[row]) + CLOSING_MARGIN:
                self._close(row, scores, neg)
            if banned:
                keep = scores[row].clone()
                scores[row, banned] = neg
                if float(scores[row].max()) <= neg:
                    scores[row] = keep  # nothing left: the grammar alone decides
        return scores

    def _close(self, row: int, scores: Any, neg: float) -> None:
        """Closing mode: EOS once complete, else ``)`` when allowed, else no new node or role."""
        keep = scores[row].clone()
        if self.matchers[row].is_accepting():
            scores[row, :] = neg
            scores[row, self.g.eos_id] = 0.0
            return
        closers = keep[self.g.closing_ids]
        if float(closers.max()) > neg:
            scores[row, :] = neg
            scores[row, self.g.closing_ids] = closers
            return
        scores[row, self.g.opening_ids] = neg
        if float(scores[row].max()) <= neg:
            scores[row] = keep


@dataclass
class Grammar:
    """The compiled grammar and the per-tokenizer tables it needs (build with :meth:`for_tokenizer`)."""

    ll_tokenizer: Any
    compiled: str
    token_bytes: list[bytes]
    eos_id: int
    fresh: FreshVariables
    opening_ids: list[int] = field(default_factory=list)
    closing_ids: list[int] = field(default_factory=list)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, n_vocab: int | None = None) -> "Grammar":
        import llguidance
        import llguidance.hf

        try:
            ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
        except Exception as exc:  # the bridge rejects tokenizers it cannot describe
            raise ModelError(f"llguidance cannot describe this tokenizer: {exc}") from exc
        compiled = llguidance.LLMatcher.grammar_from_lark(PENMAN_LARK)
        message = llguidance.LLMatcher.validate_grammar(compiled, ll_tok)
        if message:
            raise ModelError(f"invalid PENMAN grammar: {message}")
        token_bytes = [ll_tok.decode_bytes([i]) for i in range(ll_tok.vocab_size)]
        opening = [i for i, b in enumerate(token_bytes) if b"(" in b or b":" in b]
        closing = [i for i, b in enumerate(token_bytes) if b and not b.strip(b")")]
        return cls(ll_tok, compiled, token_bytes, int(tokenizer.eos_token_id), FreshVariables(token_bytes),
                   opening, closing)


_GRAMMARS: dict[int, Grammar] = {}


def grammar_for(tokenizer: Any, n_vocab: int | None = None) -> Grammar:
    """The tokenizer's :class:`Grammar`, built once per tokenizer object."""
    key = id(tokenizer)
    if key not in _GRAMMARS:
        _GRAMMARS[key] = Grammar.for_tokenizer(tokenizer, n_vocab)
    return _GRAMMARS[key]


def well_formed(text: str) -> bool:
    """Whether a raw step-2 output is a graph ``penman`` decodes as it is, with no variable
    introduced twice: "valid before repair".

    >>> well_formed("(a / b :ARG0 (c / d))"), well_formed("(a / b :ARG0 (a / d))"), well_formed("(a / b")
    (True, False, False)
    """
    import penman

    if not text.strip().startswith("("):
        return False
    try:
        graph = penman.decode(text)
    except (penman.DecodeError, ValueError, TypeError):
        return False
    variables = [src for src, _, _ in graph.instances()]
    return bool(variables) and len(variables) == len(set(variables))
