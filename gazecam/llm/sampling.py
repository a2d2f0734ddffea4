"""Choosing the next token, and streaming text that stop strings may still cut."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def sample(
    logits: NDArray[np.float32], temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Greedy (temperature 0) or nucleus sampling of the next token id."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def stream_piece(text: str, emitted: int, stop: Sequence[str]) -> tuple[str, int, bool]:
    """What of text (the answer so far) can be shown after its first ``emitted`` characters.

    Returns (piece, new emitted count, stop string hit). A stop string ends the text before
    it; a tail that may be the start of a stop string, or an incomplete UTF-8 character
    (U+FFFD), is held back until the next token settles it.
    """
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        end = min(hits)
        return text[emitted:end], max(emitted, end), True
    end = len(text.rstrip("\ufffd"))
    held = max((n for s in stop for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
    end = max(emitted, end - held)
    return text[emitted:end], end, False
