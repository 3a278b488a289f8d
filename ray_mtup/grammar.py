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

import numpy as np

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
        return self._banned(partial, used)

    def banned_in(self, row: "_VarState") -> list[int]:
        """:meth:`banned` of a row's incremental state (its tail holds any partial variable)."""
        m = _OPEN_VAR.search(row.tail)
        return self._banned(m.group(1) if m else None, row.used)

    def _banned(self, partial: bytes | None, used: set[bytes]) -> list[int]:
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
    """A transformers logits processor: grammar + fresh variables + closing, one matcher per row.

    Per step: one transfer of the rows' new tokens to the host, one batched llguidance call that
    fills every live row's token mask (``fill_next_token_bitmask_par``, on llguidance's thread
    pool), the fresh-variable and closing rules applied to those masks on the host, then one
    transfer of the masks to the device and one masking op over all rows. Greedy decoding sees
    the same allowed tokens as masking each row's scores one by one did.
    """

    def __init__(self, grammar: "Grammar", n_rows: int, prompt_width: int, budget: int):
        import llguidance
        import llguidance.torch as lt

        self.g = grammar
        self.prompt_width = prompt_width
        self.budget = budget
        self.matchers = [llguidance.LLMatcher(grammar.ll_tokenizer, grammar.compiled) for _ in range(n_rows)]
        self.vars = [_VarState() for _ in range(n_rows)]
        self.done = [False] * n_rows
        self.bitmask = lt.allocate_token_bitmask(n_rows, grammar.ll_tokenizer.vocab_size)
        self.bits = self.bitmask.numpy().view(np.uint32)
        self._lt = lt
        self._device_mask: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self.prompt_width
        if step > 0:
            for row, tok in enumerate(input_ids[:, -1].tolist()):  # one transfer for all rows
                if self.done[row]:
                    continue
                if tok == self.g.eos_id or not self.matchers[row].consume_token(tok):
                    self.done[row] = True
                else:
                    self.vars[row].push(self.g.token_bytes[tok])
        live = [(m, row) for row, m in enumerate(self.matchers) if not self.done[row]]
        if live:
            self._lt.fill_next_token_bitmask_par(self.g.executor, live, self.bitmask)
        left = self.budget - step
        for row in range(len(self.matchers)):
            if self.done[row]:
                self._only(row, [self.g.eos_id])
                continue
            if left <= self.vars[row].depth + CLOSING_MARGIN:
                self._close(row)
            banned = self.g.fresh.banned_in(self.vars[row])
            if banned:
                keep = self.bits[row].copy()
                _clear(self.bits[row], banned)
                if not self.bits[row].any():
                    self.bits[row] = keep  # nothing left: the grammar alone decides
        if self._device_mask is None or self._device_mask.device != scores.device:
            self._device_mask = self.bitmask.to(scores.device)
        else:
            self._device_mask.copy_(self.bitmask, non_blocking=True)
        vocab = self.g.ll_tokenizer.vocab_size
        if scores.shape[1] > vocab:
            scores[:, vocab:] = torch_min(scores)
        self._lt.apply_token_bitmask_inplace(scores[:, : self.bitmask.shape[1] * 32], self._device_mask)
        return scores

    def _only(self, row: int, ids: Sequence[int]) -> None:
        self.bits[row] = 0
        _set(self.bits[row], ids)

    def _close(self, row: int) -> None:
        """Closing mode: EOS once complete, else ``)`` when allowed, else no new node or role."""
        if self.matchers[row].is_accepting():
            self._only(row, [self.g.eos_id])
            return
        closers = [i for i in self.g.closing_ids if _has(self.bits[row], i)]
        if closers:
            self._only(row, closers)
            return
        keep = self.bits[row].copy()
        _clear(self.bits[row], self.g.opening_ids)
        if not self.bits[row].any():
            self.bits[row] = keep


def torch_min(scores: Any) -> float:
    import torch

    return torch.finfo(scores.dtype).min


def _has(bits: Any, token: int) -> bool:
    return bool((int(bits[token >> 5]) >> (token & 31)) & 1)


def _clear(bits: Any, tokens: Sequence[int]) -> None:
    idx = np.asarray(tokens, dtype=np.int64)
    np.bitwise_and.at(bits, idx >> 5, ~(np.uint32(1) << (idx & 31).astype(np.uint32)))


def _set(bits: Any, tokens: Sequence[int]) -> None:
    idx = np.asarray(tokens, dtype=np.int64)
    np.bitwise_or.at(bits, idx >> 5, np.uint32(1) << (idx & 31).astype(np.uint32))


class _VarState:
    """A row's grammar prefix as :class:`FreshVariables` needs it, kept as tokens arrive: the
    variables introduced so far, the open parentheses, and a tail long enough to hold a variable
    being written (the grammar caps variables at :data:`MAX_VAR_LEN`), so a step costs O(1)."""

    __slots__ = ("tail", "used", "depth")

    def __init__(self) -> None:
        self.tail, self.used, self.depth = b"", set(), 0

    def push(self, piece: bytes) -> None:
        buf = self.tail + piece
        self.used.update(_DONE_VAR.findall(buf))
        self.depth += piece.count(b"(") - piece.count(b")")
        self.tail = buf[-(MAX_VAR_LEN + 2):]


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
    executor: Any = None  # llguidance's thread pool for the batched mask filling

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
                   opening, closing, llguidance.LLExecutor())


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
