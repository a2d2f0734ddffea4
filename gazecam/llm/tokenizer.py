"""The chat tokenizer: tokenizer.json (built from the GGUF by the converter) and the template.

SmolLM2's chat template (ChatML)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

A prompt is a tuple of parts: text, and the template's special tokens (``Special``). Text never
encodes as a special token: a task card, a question or OCR text that holds ``<|im_end|>`` is
encoded as those characters, so that it cannot end the message it sits in (the tokenizer's
``encode_special_tokens``). Only the template puts special tokens in a prompt.

The runtime splits that prompt into independently prefilled pieces: the context opens the
system message, each region is one line inside it, and the question piece closes it, so that
``context_prompt(c) + region_prompt(r1) + ... + question_prompt(q)`` encodes as
``chat_prompt([("system", c + "\\n" + r1 + ...), ("user", q)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tokenizers import Tokenizer

from gazecam.models import ModelError


@dataclass(frozen=True, slots=True)
class Special:
    """A special token that the template puts in a prompt."""

    token: str


IM_START, IM_END, END_OF_TEXT = (
    Special("<|im_start|>"),
    Special("<|im_end|>"),
    Special("<|endoftext|>"),
)

# Text and the template's special tokens, in order (a tuple, so that a str is not taken for one).
Prompt = tuple[str | Special, ...]


def chat_prompt(messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> Prompt:
    """The model's own template over (role, content) messages."""
    parts: list[str | Special] = []
    for role, content in messages:
        parts += [IM_START, f"{role}\n{content}", IM_END, "\n"]
    return (*parts, *((IM_START, "assistant\n") if add_generation_prompt else ()))


def context_prompt(text: str) -> Prompt:
    """The always-kept context piece: it opens the system message."""
    return (IM_START, f"system\n{text.strip()}\n")


def region_prompt(text: str) -> Prompt:
    """One region's piece: a line inside the system message (newline added if missing)."""
    return (text.strip() + "\n",)


def question_prompt(question: str) -> Prompt:
    """The question piece: closes the system message, asks, and opens the answer."""
    return (
        IM_END,
        "\n",
        IM_START,
        f"user\n{question.strip()}",
        IM_END,
        "\n",
        IM_START,
        "assistant\n",
    )


class ChatTokenizer:
    """Byte-level BPE encode/decode with the ChatML special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # Text never splits out added tokens: encode_special_tokens covers the special ones,
        # and a tokenizer with any other added token is refused.
        plain = [t.content for t in tokenizer.get_added_tokens_decoder().values() if not t.special]
        if plain:
            raise ModelError(f"tokenizer has added tokens that are not special: {plain[:5]}")
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.im_start_id, self.im_end_id, self.end_of_text_id = (
            self._special_id(t) for t in (IM_START, IM_END, END_OF_TEXT)
        )
        # Generation ends at <|im_end|> (the answer's end) or <|endoftext|>.
        self.stop_ids = frozenset({self.im_end_id, self.end_of_text_id})

    def _special_id(self, special: Special) -> int:
        token_id = self._tokenizer.token_to_id(special.token)
        if token_id is None:
            raise ModelError(f"tokenizer has no ChatML special token {special.token}")
        return int(token_id)

    @classmethod
    def load(cls, path: Path) -> ChatTokenizer:
        """Load a tokenizer.json; ModelError if it is missing or unreadable."""
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{path}: cannot load the tokenizer ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of text; a special token written in it (``<|im_end|>``) is plain text."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: its special tokens' ids, and its text encoded as text.

        Adjacent text parts are encoded together, as one run between two special tokens: BPE
        merges across them as it did when the whole prompt was one string.
        """
        ids: list[int] = []
        for is_text, run in groupby(prompt, lambda part: isinstance(part, str)):
            if is_text:
                ids += self.encode("".join(p for p in run if isinstance(p, str)))
            else:
                ids += (self._special_id(p) for p in run if isinstance(p, Special))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))
