"""The chat tokenizer: tokenizer.json (built from the GGUF by the converter) and the template.

SmolLM2's chat template (ChatML)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

The runtime splits that prompt into independently prefilled pieces: the context opens the
system message, each region is one line inside it, and the question piece closes it, so that
``context_prompt(c) + region_prompt(r1) + ... + question_prompt(q)`` is exactly
``chat_prompt([("system", c + "\\n" + r1 + ...), ("user", q)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from gazecam.models import ModelError

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def chat_prompt(messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """The model's own template over (role, content) messages."""
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def context_prompt(text: str) -> str:
    """The always-kept context piece: it opens the system message."""
    return f"{IM_START}system\n{text.strip()}\n"


def region_prompt(text: str) -> str:
    """One region's piece: a line inside the system message (newline added if missing)."""
    return text.strip() + "\n"


def question_prompt(question: str) -> str:
    """The question piece: closes the system message, asks, and opens the answer."""
    return f"{IM_END}\n{IM_START}user\n{question.strip()}{IM_END}\n{IM_START}assistant\n"


class ChatTokenizer:
    """Byte-level BPE encode/decode with the ChatML special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.im_start_id, self.im_end_id, self.end_of_text_id = (
            self._special_id(t) for t in (IM_START, IM_END, END_OF_TEXT)
        )
        # Generation ends at <|im_end|> (the answer's end) or <|endoftext|>.
        self.stop_ids = frozenset({self.im_end_id, self.end_of_text_id})

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(f"tokenizer has no ChatML special token {token}")
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
        """Token ids of text; special tokens written in it (``<|im_start|>``) become their ids."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))
