"""The always-kept context: the assistant's role and the task card, cut to a token budget.

Pure functions of the card and a ``fits`` test (the tokenizer's count against the budget), so
that a long card degrades evenly instead of losing its last steps; ``gazecam.assist.assistant``
keeps the result in the language model's KV cache once per card.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

from gazecam.assist.tasks import CardTooLargeError, TaskCard


def cut(text: str, max_chars: int) -> str:
    """``text``, or when it is longer than ``max_chars`` its start and an ellipsis."""
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def longest_fit(render: Callable[[int], str], longest: int, fits: Callable[[str], bool]) -> str:
    """``render(k)`` for the largest k in 1..``longest`` that ``fits``; ``render(longest)``
    is the uncut text. Raises CardTooLargeError when not even ``render(1)`` fits."""
    if fits(text := render(longest)):
        return text
    k = bisect_right(range(1, longest + 1), False, key=lambda k: not fits(render(k)))
    while k and not fits(render(k)):  # a cut one character longer may take one token fewer
        k -= 1
    if not k:
        raise CardTooLargeError("the text does not fit even cut to its first character")
    return render(k)


def context_text(card: TaskCard, fits: Callable[[str], bool] = lambda _: True) -> str:
    """The always-kept context: the assistant's role and the task card.

    The card is verbatim when that ``fits``. Otherwise its name and each step's line
    ("title: instruction") are cut to the same number of characters, the most that fits, so
    short lines stay whole and every step keeps at least the start of its title; each ask's
    prompt adds the current step's line, up to ``STEP_PROMPT_MAX_TOKENS`` (see
    ``Assistant.ask``). Raises CardTooLargeError if not even one character per line fits.
    """
    lines = [f"{s.title}: {s.instruction}" for s in card.steps]

    def render(k: int) -> str:
        steps = "\n".join(f"{i}. {cut(line, k)}" for i, line in enumerate(lines, 1))
        return (
            "You help a person who wears eye-tracking glasses while doing a task. Answer in one "
            f"short sentence.\nTask: {cut(card.name, k)}\nSteps:\n{steps}\n"
            "What the person looked at:"
        )

    try:
        return longest_fit(render, max(len(card.name), *map(len, lines)), fits)
    except CardTooLargeError as exc:
        raise CardTooLargeError(
            f"task card {card.name!r}: its {len(card.steps)} steps do not fit the context "
            "even cut to a character each (GAZECAM_CONTEXT_MAX_TOKENS)"
        ) from exc
