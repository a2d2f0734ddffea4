"""The chat tokenizer: tokenizer.json (built from the GGUF by the converter) and the templates.

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

SmolVLM's template (``ChatFormat("smolvlm")``) is ``<|im_start|>System: {system}<end_of_utterance>
\\nUser:{images}{question}<end_of_utterance>\\nAssistant:``: the context piece ends with
``User:``, each keyframe's image sequence follows (``gazecam.vlm.engine``), and the question
piece closes the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Literal

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
END_OF_UTTERANCE = Special("<end_of_utterance>")  # SmolVLM's end of a message

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


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """How a model family's chat template splits into the runtime's pieces: ``chatml``
    (SmolLM2) or ``smolvlm`` (SmolVLM, Idefics3)."""

    name: Literal["chatml", "smolvlm"]

    @property
    def stop(self) -> tuple[Special, ...]:
        """The tokens that end an answer."""
        return (IM_END, END_OF_TEXT) if self.name == "chatml" else (END_OF_UTTERANCE, END_OF_TEXT)

    def context(self, text: str) -> Prompt:
        """The always-kept context piece."""
        if self.name == "chatml":
            return context_prompt(text)
        return (IM_START, f"System: {text.strip()}", END_OF_UTTERANCE, "\nUser:")

    def question(self, question: str, answer_prefix: str = "") -> Prompt:
        """The question piece: closes what the context opened, asks, opens the answer and
        writes its start (without trailing whitespace: BPE words carry their leading space)."""
        prefix = answer_prefix.rstrip()
        if self.name == "chatml":
            return (*question_prompt(question), prefix)
        # The model writes " answer" after "Assistant:"; the prefix is that answer's start.
        return (question.strip(), END_OF_UTTERANCE, "\nAssistant:", f" {prefix}" if prefix else "")


def chat_format(name: str) -> ChatFormat:
    """The format a converted model's config.json names; ModelError for an unknown one."""
    if name not in ("chatml", "smolvlm"):
        raise ModelError(f"chat format {name!r} is not known (chatml, smolvlm)")
    return ChatFormat(name)  # type: ignore[arg-type]  # checked just above


class ChatTokenizer:
    """Byte-level BPE encode/decode with the ChatML special tokens."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat = ChatFormat("chatml")) -> None:
        # Text never splits out added tokens: encode_special_tokens covers the special ones,
        # and a tokenizer with any other added token is refused.
        plain = [t.content for t in tokenizer.get_added_tokens_decoder().values() if not t.special]
        if plain:
            raise ModelError(f"tokenizer has added tokens that are not special: {plain[:5]}")
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.im_start_id, self.im_end_id, self.end_of_text_id = (
            self.special_id(t) for t in (IM_START, IM_END, END_OF_TEXT)
        )
        # Generation ends at the end of the answer's message, or <|endoftext|>.
        self.chat = chat
        self.stop_ids = frozenset(self.special_id(t) for t in chat.stop)

    def special_id(self, special: Special) -> int:
        token_id = self._tokenizer.token_to_id(special.token)
        if token_id is None:
            raise ModelError(f"tokenizer has no special token {special.token}")
        return int(token_id)

    @classmethod
    def load(cls, path: Path, chat: ChatFormat = ChatFormat("chatml")) -> ChatTokenizer:
        """Load a tokenizer.json; ModelError if it is missing or unreadable."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{path}: cannot load the tokenizer ({exc})") from exc
        try:
            return cls(tokenizer, chat)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from exc

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
                ids += (self.special_id(p) for p in run if isinstance(p, Special))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))
