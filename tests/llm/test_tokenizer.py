"""The tokenizer built from the GGUF, and the chat template split into prefill pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from gazecam.llm.tokenizer import (
    ChatTokenizer,
    chat_prompt,
    context_prompt,
    question_prompt,
    region_prompt,
)

TEXTS = [
    "What step am I on?",
    "Connect the 24 V cable to port B3, then press RESET.",
    "  spaces,\ttabs\nand new lines\n\n",
    "Ünïcödé — 温度 20°C ✓ 🔧",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def real(real_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(real_dir / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(real: ChatTokenizer, tiny_dir: Path, text: str) -> None:
    for tokenizer in (real, ChatTokenizer.load(tiny_dir / "tokenizer.json")):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_and_pre_tokenizer(real: ChatTokenizer) -> None:
    assert real.vocab_size == 49152
    assert (real.end_of_text_id, real.im_start_id, real.im_end_id) == (0, 1, 2)
    assert real.stop_ids == {0, 2}
    # "smollm" pre-tokenizer: every digit is its own token.
    assert len(real.encode("2024")) == 4
    # Common words are single tokens (the merges are applied), with the space folded in.
    assert len(real.encode("Hello")) == 1
    assert len(real.encode(" the capital of France")) == 4
    # Special tokens written in text become their ids; decoding skips them by default.
    ids = real.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert real.decode(ids) == "user\nHi"
    assert real.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_prompt_pieces_make_the_chat_template(real: ChatTokenizer) -> None:
    context = "The wearer is on step 3 of 6: Connect cable."
    regions = ["- text 'PORT B3', at the gaze point\n", "- a cable, 40 px from the gaze point"]
    question = "What step am I on?"
    pieces = [context_prompt(context), *map(region_prompt, regions), question_prompt(question)]
    system = context + "\n" + "".join(r.strip() + "\n" for r in regions)
    assert "".join(pieces) == chat_prompt([("system", system), ("user", question)])
    assert chat_prompt([("user", "Hi")]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Prefilled piece by piece, the tokens are those of the whole prompt.
    assert [i for p in pieces for i in real.encode(p)] == real.encode("".join(pieces))
