"""Batched greedy generation of MTUP outputs, and their conversion to graphs.

Used by evaluation in the training loop (on every rank, each on its shard) and by
``predict``. Prompts are sorted by length so a batch pads little, the KV cache is on, and a
row ends at EOS or, with :class:`Step2Closed`, as soon as its step-2 graph has closed. Under
ZeRO-3 every rank must run the same number of forward passes, so the caller passes
``synced_gpus=True`` and equal-sized shards.

Decoding is the project's, never the checkpoint's: :func:`decoding_config` is greedy with no
repetition penalty, whatever a ``generation_config.json`` says (Qwen2.5-Instruct ships
sampling defaults and a 1.05 penalty, which punishes copying words of the sentence into
concepts).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import amr, grammar
from .prompts import Template, marker_pattern, parse_generation, render_inference, stop_token_ids

logger = logging.getLogger(__name__)

#: Room above the longest training completion when ``max_new_tokens`` is derived from the data.
MAX_NEW_TOKENS_MARGIN = 1.25


@dataclass(frozen=True)
class Parsed:
    """A generation split into both tasks and repaired into graphs (None when invalid)."""

    raw: str
    task1_graph: str | None
    task2_graph: str | None
    task2_repaired: bool


@dataclass(frozen=True)
class Generated:
    """Continuations in input order, with what each cost: new tokens, and whether the row
    stopped only because it reached ``max_new_tokens``."""

    texts: list[str]
    new_tokens: list[int]
    hit_limit: list[bool]


def decoding_config(tokenizer: Any, max_new_tokens: int | None = None) -> Any:
    """The project's decoding: greedy, one beam, no penalty, no sampling knobs, stop at EOS.

    A fresh ``GenerationConfig``: nothing of the checkpoint's ``generation_config.json``
    (temperature, top-k/p, repetition penalty) survives.
    """
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, use_cache=True,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stop_token_ids(tokenizer), bos_token_id=tokenizer.bos_token_id)


def derived_max_new_tokens(completion_lengths: Sequence[int]) -> int:
    """Generation budget from the data: the longest training completion (tokens, EOS included)
    times :data:`MAX_NEW_TOKENS_MARGIN`.

    >>> derived_max_new_tokens([40, 120, 80])
    150
    """
    return max(8, int(max(completion_lengths) * MAX_NEW_TOKENS_MARGIN + 0.5))


def step2_closed(text: str, template: Template) -> bool:
    """Whether ``text`` holds the step-2 marker followed by a graph whose brackets have closed.

    Brackets inside double-quoted strings do not count.

    >>> from ray_mtup.prompts import TEMPLATES
    >>> t = TEMPLATES["v4_compact"]
    >>> step2_closed("(đi)\\nAMR-2:\\n(đ / đi :agent (t / tôi", t), step2_closed("(đi)\\nAMR-2:\\n(đ / đi)", t)
    (False, True)
    >>> step2_closed('(đi)\\nAMR-2:\\n(n / name :op1 "a(")', t), step2_closed("(đ / đi)", t)
    (True, False)
    """
    m = marker_pattern(template.step2_marker).search(text)
    if m is None:
        return False
    depth, opened, quoted = 0, False, False
    for ch in text[m.end():]:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth, opened = depth + 1, True
        elif not quoted and ch == ")":
            depth -= 1
            if opened and depth <= 0:
                return True
    return False


class _GraphState:
    """What :func:`step2_closed` needs of a row's text, kept as the text grows: whether the
    step-2 marker was seen, then bracket depth and quoting; before the marker only a tail
    short enough to hold the start of a marker split across tokens.

    The tail collapses whitespace runs to one space: the marker pattern allows any whitespace
    between its words and none inside them, so a marker with a run of blanks still matches.
    """

    __slots__ = ("tail", "seen", "depth", "opened", "quoted", "closed")

    def __init__(self) -> None:
        self.tail, self.seen, self.depth, self.opened, self.quoted, self.closed = "", False, 0, False, False, False

    def copy(self) -> "_GraphState":
        other = _GraphState()
        other.tail, other.seen, other.depth = self.tail, self.seen, self.depth
        other.opened, other.quoted, other.closed = self.opened, self.quoted, self.closed
        return other

    def feed(self, text: str, pattern: Any, keep: int) -> None:
        if self.closed or not text:
            return
        if not self.seen:
            buf = _BLANKS.sub(" ", self.tail + text)
            m = pattern.search(buf)
            if m is None:
                self.tail = buf[-keep:] if keep else ""
                return
            self.seen, self.tail = True, ""
            text = buf[m.end():]
        for ch in text:
            if ch == '"':
                self.quoted = not self.quoted
            elif not self.quoted and ch == "(":
                self.depth, self.opened = self.depth + 1, True
            elif not self.quoted and ch == ")":
                self.depth -= 1
                if self.opened and self.depth <= 0:
                    self.closed = True
                    return


_BLANKS = re.compile(r"\s+")


class _RowText:
    """Incremental detokenisation of one row (the window scheme of vLLM and TGI): text is
    committed once the window decodes without a trailing replacement character (a UTF-8
    sequence split across tokens), so each step decodes a few tokens, never the whole row."""

    __slots__ = ("ids", "prefix", "read")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int, decode: Callable[[list[int]], str]) -> tuple[str, str]:
        """Add ``token``: (newly committed text, text decoded but not yet committed)."""
        self.ids.append(token)
        before = decode(self.ids[self.prefix:self.read])
        window = decode(self.ids[self.prefix:])
        if window.endswith("\ufffd"):
            return "", window[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(before):], ""


class Step2Closed:
    """A stopping criterion (transformers' per-row form): a row is done once its step-2 graph
    has closed, so a model that runs on after the graph does not spend the whole budget.

    O(1) per row per step: each call decodes only the rows' new tokens (a window of a few
    tokens, :class:`_RowText`) into per-row state (:class:`_GraphState`), and skips rows that
    have finished; its decisions are :func:`step2_closed`'s on the whole text. ``decoded_chars``
    counts the characters decoded by the last call (the test of the O(1) claim reads it).
    """

    def __init__(self, tokenizer: Any, template: Template, prompt_width: int):
        self.tokenizer, self.template, self.width = tokenizer, template, prompt_width
        self.pattern = marker_pattern(template.step2_marker)
        self.keep = max(0, len(" ".join(template.step2_marker.split())) - 1)
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.rows: list[tuple[_RowText, _GraphState]] = []
        self.done: list[bool] = []
        self.seen = 0
        self.decoded_chars = 0

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        self.decoded_chars += len(text)
        return text

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if not self.rows:
            self.rows = [(_RowText(), _GraphState()) for _ in range(input_ids.shape[0])]
            self.done = [False] * input_ids.shape[0]
        self.decoded_chars = 0
        new = input_ids[:, self.width + self.seen:].tolist()  # one small transfer: the new column(s)
        self.seen = input_ids.shape[1] - self.width
        out = []
        for row, tokens in enumerate(new):
            if not self.done[row]:
                self.done[row] = self._advance(row, tokens)
            out.append(self.done[row])
        return torch.tensor(out, device=input_ids.device)

    def _advance(self, row: int, tokens: list[int]) -> bool:
        text, state = self.rows[row]
        pending = ""
        for token in tokens:
            if token in self.eos:
                return True  # transformers ends the row at EOS; nothing after it is decoded
            committed, pending = text.push(token, self._decode)
            state.feed(committed, self.pattern, self.keep)
            if state.closed:
                return True
        if pending:  # what the whole-text rule sees now, without committing a split character
            trial = state.copy()
            trial.feed(pending, self.pattern, self.keep)
            return trial.closed
        return False


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    progress: bool = False,
    cache: str = "dynamic",
    stop_template: Template | None = None,
    constrained: bool = False,
) -> Generated:
    """Greedy continuations of ``prompts`` (in input order), decoded without special tokens.

    ``stop_template`` ends a row as soon as its step-2 graph has closed (:class:`Step2Closed`).
    ``constrained`` (needs ``stop_template``) generates step 2 under the PENMAN grammar
    (:func:`generate_constrained`). ``cache="static"`` pre-allocates the KV
    cache, which lets transformers compile the decode step (worth it on a GPU; on CPU it is
    not, see docs/benchmarks.md).
    """
    if constrained:
        if stop_template is None:
            raise ValueError("constrained decoding needs the template whose step-2 marker it follows")
        texts = generate_constrained(model, tokenizer, prompts, stop_template, batch_size, max_new_tokens,
                                     synced_gpus=synced_gpus, progress=progress)
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return Generated(texts, lengths, [False] * len(texts))  # the grammar closes every graph itself
    return _generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, synced_gpus, progress,
                             cache, stop_template=stop_template)


def _generate_batches(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]], batch_size: int,
                      max_new_tokens: int, synced_gpus: bool = False, progress: bool = False,
                      cache: str = "dynamic", processor_factory: Callable[[int, int], Any] | None = None,
                      stop_strings: Sequence[str] = (), stop_template: Template | None = None) -> Generated:
    """Greedy, length-sorted batches of ``model.generate`` over prompts (texts or token ids).

    ``processor_factory(prompt_width, rows)`` makes each batch's ``logits_processor``; a row
    also stops after any of ``stop_strings``, or once its step-2 graph closed (``stop_template``).
    """
    if not prompts:
        return Generated([], [], [])
    encoded = [p if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", disable=None)  # None: a terminal only
    texts, new_tokens, hit = [""] * len(prompts), [0] * len(prompts), [False] * len(prompts)
    was_training = model.training
    model.eval()
    options = BatchOptions(max_new_tokens, synced_gpus, cache, stop_template, processor_factory, tuple(stop_strings))
    try:
        for batch in batches:
            rows = _generate_batch(model, tokenizer, [encoded[i] for i in batch], options)
            for i, (text, n, at_limit) in zip(batch, rows):
                texts[i], new_tokens[i], hit[i] = text, n, at_limit
    finally:
        model.train(was_training)
    return Generated(texts, new_tokens, hit)


@dataclass(frozen=True)
class BatchOptions:
    """How every batch of one :func:`_generate_batches` call is generated."""

    max_new_tokens: int
    synced_gpus: bool
    cache: str
    stop_template: Template | None
    processor_factory: Callable[[int, int], Any] | None
    stop_strings: tuple[str, ...]


def _generate_batch(model: Any, tokenizer: Any, encoded: Sequence[Sequence[int]],
                    o: BatchOptions) -> list[tuple[str, int, bool]]:
    """One left-padded batch: (text, new tokens, stopped only by the budget) per row."""
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    pad_id, stops = tokenizer.pad_token_id, set(stop_token_ids(tokenizer))
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):  # left padding: generation continues at the right edge
        ids[row, width - len(e):] = torch.tensor(list(e))
        mask[row, width - len(e):] = 1
    stopping = StoppingCriteriaList([Step2Closed(tokenizer, o.stop_template, width)] if o.stop_template else [])
    config = decoding_config(tokenizer, o.max_new_tokens)
    config.compile_config = getattr(model.generation_config, "compile_config", None)  # bench --compile
    extra: dict[str, Any] = {"cache_implementation": "static"} if o.cache == "static" else {}
    if o.processor_factory is not None:
        extra["logits_processor"] = o.processor_factory(width, len(encoded))
    if o.stop_strings:
        extra.update(stop_strings=list(o.stop_strings), tokenizer=tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             stopping_criteria=stopping, synced_gpus=o.synced_gpus, **extra)
    rows = []
    for row in out[:, width:].cpu().tolist():
        ended = [k for k, t in enumerate(row) if t in stops or t == pad_id]
        n = ended[0] + 1 if ended else len(row)
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        closed = o.stop_template is not None and step2_closed(text, o.stop_template)
        rows.append((text, n, not ended and n >= o.max_new_tokens and not closed))
    return rows


def _step1_texts(raw: Sequence[str], template: Template) -> tuple[list[str], int]:
    """Step-1 text of each phase-1 output (before the marker); how many had no marker."""
    pattern = marker_pattern(template.step2_marker)
    out, missing = [], 0
    for text in raw:
        m = pattern.search(text)
        if m is None:
            missing += 1
        out.append((text[: m.start()] if m else text).strip())
    return out, missing


def generate_constrained(model: Any, tokenizer: Any, prompts: Sequence[str], template: Template,
                         batch_size: int, max_new_tokens: int, synced_gpus: bool = False,
                         progress: bool = False, stats: grammar.ConstrainedStats | None = None) -> list[str]:
    """Step 1 free, then the step-2 marker and a grammar-constrained graph (see
    :mod:`ray_mtup.grammar`).

    Returns, per prompt, ``step1 + marker + graph`` as :func:`ray_mtup.prompts.parse_generation`
    expects it.
    """
    stats = stats if stats is not None else grammar.ConstrainedStats()
    n_vocab = model.get_output_embeddings().weight.shape[0]
    compiled = grammar.grammar_for(tokenizer, n_vocab)
    marker = template.step2_marker
    raw1 = _generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, synced_gpus, progress,
                             stop_strings=[marker.strip()]).texts
    step1, missing = _step1_texts(raw1, template)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids2 = [list(p) + tokenizer(s + marker, add_special_tokens=False)["input_ids"]
            for p, s in zip(prompt_ids, step1)]

    def processor(width: int, n_rows: int) -> Any:
        from transformers import LogitsProcessorList

        return LogitsProcessorList([grammar.PenmanLogitsProcessor(compiled, n_rows, width, max_new_tokens)])

    raw2 = _generate_batches(model, tokenizer, ids2, batch_size, max_new_tokens, synced_gpus, progress,
                             processor_factory=processor).texts
    graphs = []
    for text in raw2:
        text = text.strip()
        if not (text.endswith(")") and grammar.depth(text.encode()) == 0):  # the budget ended the graph
            stats.forced_closures += 1
            text = grammar.close_partial(text) or grammar.FALLBACK_GRAPH
        graphs.append(text)
    stats.rows += len(prompts)
    stats.missing_marker += missing
    stats.step1_tokens += sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in step1)
    stats.step2_tokens += sum(len(tokenizer(g, add_special_tokens=False)["input_ids"]) for g in graphs)
    if stats.forced_closures:
        logger.info("constrained decoding: %d of %d graphs closed at the budget", stats.forced_closures,
                    stats.rows)
    return [s + marker + g for s, g in zip(step1, graphs)]


#: Written for a sentence whose output cannot be turned into a graph at all.
FALLBACK_GRAPH = grammar.FALLBACK_GRAPH


def shipped_graphs(parsed: Sequence[Parsed]) -> tuple[list[str], dict[str, int]]:
    """The graph ``predict`` writes for each output (Task 2, else Task 1, else
    :data:`FALLBACK_GRAPH`), and how many took each path."""
    counts = {"n_task2": 0, "n_task2_repaired": 0, "n_task1_fallback": 0, "n_minimal": 0}
    graphs = []
    for i, p in enumerate(parsed):
        if p.task2_graph is not None:
            graphs.append(p.task2_graph)
            counts["n_task2"] += 1
            counts["n_task2_repaired"] += int(p.task2_repaired)
        elif p.task1_graph is not None:
            graphs.append(p.task1_graph)
            counts["n_task1_fallback"] += 1
        else:
            graphs.append(FALLBACK_GRAPH)
            counts["n_minimal"] += 1
            logger.info("sentence %d: no graph could be recovered; wrote %s", i + 1, FALLBACK_GRAPH)
    return graphs, counts


def parse_outputs(template: Template, raw_outputs: Sequence[str]) -> list[Parsed]:
    """Split each generation into (task 1, task 2), repair both, restore task 1's variables."""
    parsed = []
    for raw in raw_outputs:
        task1, task2 = parse_generation(template, raw)
        r1 = amr.repair_task1(task1)
        r2 = amr.repair(task2)
        parsed.append(Parsed(raw, r1.graph if r1.valid else None, r2.graph if r2.valid else None,
                             r2.repaired))
    return parsed


def prompts_for(template: Template, sentences: Sequence[str],
                contexts: Sequence[Sequence[tuple[str, str]]] | None = None, chat: Any = None) -> list[str]:
    """Inference prompts; ``contexts`` (one per sentence) are retrieved training pairs; ``chat``
    (a tokenizer, for ``chat_template: true``) puts each in its chat template's user turn."""
    if contexts is None:
        return [render_inference(template, s, (), chat) for s in sentences]
    return [render_inference(template, s, c, chat) for s, c in zip(sentences, contexts, strict=True)]
