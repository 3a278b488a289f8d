"""MTUP prompts: one text teaches both tasks, step 1 (AMR without variables) then step 2.

A training text is ``prompt + completion`` where

* ``prompt`` = the template's instruction with the sentence, ending with the step-1 marker;
* ``completion`` = task-1 graph, the step-2 marker, the task-2 graph (EOS is appended at
  tokenisation, see :mod:`ray_mtup.dataset`).

Only the completion carries loss. At inference the model gets ``prompt`` and writes both
steps; :func:`parse_generation` splits its output back into ``(task1, task2)``.

>>> t = TEMPLATES["v4_compact"]
>>> p = render_inference(t, "tôi đi học .")
>>> p.endswith(t.step1_marker)
True
>>> r = render_training(t, "tôi đi học .", "(đi :agent (tôi))", "(đ / đi :agent (t / tôi))")
>>> r.prompt == p
True
>>> parse_generation(t, r.completion)
('(đi :agent (tôi))', '(đ / đi :agent (t / tôi))')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Template:
    """A Vietnamese MTUP prompt: instruction (with ``{sentence}``) and the two step markers."""

    name: str
    instruction: str
    step1_marker: str
    step2_marker: str

    def __post_init__(self) -> None:
        if "{sentence}" not in self.instruction:
            raise ConfigError(f"template.{self.name}", "instruction must contain {sentence}")


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "v1_formal",
            "Nhiệm vụ: phân tích câu tiếng Việt dưới đây thành biểu diễn ngữ nghĩa trừu tượng (AMR).\n"
            "Câu: {sentence}\n",
            "\nBước 1 - Cấu trúc AMR chưa có biến:\n",
            "\nBước 2 - AMR hoàn chỉnh có biến (định dạng PENMAN):\n",
        ),
        Template(
            "v2_natural",
            "Hãy đọc câu sau và cho biết đồ thị AMR thể hiện nghĩa của nó.\n"
            "Câu: {sentence}\n",
            "\nBước 1 — khung AMR, chưa đặt tên biến:\n",
            "\nBước 2 — AMR đầy đủ, mỗi khái niệm có một biến:\n",
        ),
        Template(
            "v3_instructional",
            "### Hướng dẫn\n"
            "Chuyển câu tiếng Việt sau thành AMR theo hai bước: (1) viết các khái niệm và quan hệ, "
            "không dùng biến; (2) gán cho mỗi khái niệm một biến và viết AMR ở định dạng PENMAN.\n"
            "### Câu\n{sentence}\n",
            "### Bước 1: AMR không biến\n",
            "\n### Bước 2: AMR có biến\n",
        ),
        Template(
            "v4_compact",
            "Câu: {sentence}\n",
            "AMR-1:\n",
            "\nAMR-2:\n",
        ),
        Template(
            "v5_cot",
            "Phân tích câu sau thành AMR. Trước hết xác định khái niệm chính và các quan hệ giữa "
            "chúng, sau đó đặt biến cho từng khái niệm.\n"
            "Câu: {sentence}\n",
            "\nBước 1 (suy luận: khái niệm và quan hệ, chưa có biến):\n",
            "\nBước 2 (kết quả: AMR có biến):\n",
        ),
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError("template", f"unknown template {name!r}; choose from {list(TEMPLATES)}") from None


@dataclass(frozen=True)
class Rendered:
    """A training text split where the loss starts: ``prompt`` (no loss) + ``completion``."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _clean_sentence(sentence: str) -> str:
    return " ".join(sentence.split())


#: Retrieved training pairs (:mod:`ray_mtup.retrieval`) precede the instruction, one block each.
CONTEXT_BLOCK = "Ví dụ: {sentence}\nAMR: {graph}\n\n"

Context = Sequence[tuple[str, str]]


def render_context(context: Context) -> str:
    """The retrieved (sentence, task-2 graph) pairs as prompt text; empty for plain MTUP.

    >>> render_context([("tôi  đi", "(đ / đi)")])
    'Ví dụ: tôi đi\\nAMR: (đ / đi)\\n\\n'
    """
    return "".join(CONTEXT_BLOCK.format(sentence=_clean_sentence(s), graph=" ".join(g.split()))
                   for s, g in context)


def render_inference(template: Template, sentence: str, context: Context = (), chat: Any = None) -> str:
    """The prompt up to (and including) the step-1 marker, after any retrieved pairs. With
    ``chat`` (a tokenizer), the retrieved pairs and the instruction are the user's turn of its
    chat template, and the step-1 marker opens the assistant's turn (:func:`chat_prompt`)."""
    instruction = render_context(context) + template.instruction.format(sentence=_clean_sentence(sentence))
    if chat is not None:
        instruction = chat_prompt(chat, instruction)
    return instruction + template.step1_marker


def render_training(template: Template, sentence: str, task1: str, task2: str,
                    context: Context = (), chat: Any = None) -> Rendered:
    """Prompt plus completion (task-1 graph, step-2 marker, task-2 graph)."""
    return Rendered(
        prompt=render_inference(template, sentence, context, chat),
        completion=task1.strip() + template.step2_marker + task2.strip(),
    )


def chat_prompt(tokenizer: Any, user_text: str) -> str:
    """``user_text`` as the user's turn of the tokenizer's chat template, up to the start of the
    assistant's reply (``add_generation_prompt``), with Qwen3's thinking block turned off
    (``enable_thinking=False``: its template then writes an empty block, and templates without
    the switch ignore it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat_template", "the tokenizer has no chat template; set chat_template: false")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


_MARK = "RAYMTUPMARK"


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant's turn in the tokenizer's chat template (``<|im_end|>``
    for Qwen, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma): the first token after
    the reply when the template renders one, if it is a special token; else the EOS token."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
                                             tokenize=False, enable_thinking=False)
        if _MARK in text:
            tail = text[text.rindex(_MARK) + len(_MARK):]
            ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            added = getattr(tokenizer, "added_tokens_decoder", {})
            if ids and (ids[0] in tokenizer.all_special_ids or getattr(added.get(ids[0]), "special", False)):
                return int(ids[0])
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a generation: EOS, and the chat template's end of turn when it differs."""
    return list(dict.fromkeys([int(tokenizer.eos_token_id), end_of_turn_id(tokenizer)]))


def marker_pattern(marker: str) -> re.Pattern[str]:
    # Tolerate whitespace differences around and inside the marker (models drift on these).
    words = marker.split()
    return re.compile(r"\s*".join(re.escape(w) for w in words))


def parse_generation(template: Template, text: str) -> tuple[str, str]:
    """Split a generation (what follows the prompt) into ``(task1, task2)``.

    Robust to a missing step-2 marker (everything is task 1, task 2 is empty unless the
    text carries variables, in which case it is taken as task 2), a truncated output, and
    an echo of the step-1 marker.

    >>> t = TEMPLATES["v1_formal"]
    >>> parse_generation(t, "(đi :agent (tôi))")
    ('(đi :agent (tôi))', '')
    >>> parse_generation(t, "(đ / đi :agent (t / tôi))")
    ('', '(đ / đi :agent (t / tôi))')
    >>> parse_generation(t, "(đi\\nBước 2 - AMR hoàn chỉnh có biến (định dạng PENMAN):\\n(đ / đi")
    ('(đi', '(đ / đi')
    """
    m1 = marker_pattern(template.step1_marker).search(text)
    if m1 is not None and m1.start() < 5:
        text = text[m1.end():]
    m2 = marker_pattern(template.step2_marker).search(text)
    if m2 is not None:
        return text[: m2.start()].strip(), text[m2.end():].strip()
    text = text.strip()
    if re.search(r"\(\s*\S+\s+/\s", text):
        return "", text
    return text, ""
