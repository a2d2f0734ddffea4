"""The records the language model runtime takes and gives: a unit's KV groups in, what an
answer cost and which engine gave it out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gazecam.llm.kv import GroupKind

StopReason = Literal["eos", "stop", "max_tokens"]


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """What one answer cost; the last item ``generate`` yields."""

    prompt_tokens: int  # question tokens prefilled at ask time (one pass)
    generated_tokens: int
    ttft_ms: float  # from the call to the first token
    tpot_ms: float  # mean time per output token after the first (0 with fewer than two)
    attended_visual_kv: list[int]  # region entries attended per model step: prefill, decodes
    visual_kv_total: int  # region entries in memory
    # The regions chosen for the first decoding step (none when the answer ended at its first
    # token).
    selected_regions: list[str] = field(default_factory=list)
    # Decoding steps whose top-k regions differ from the step before's (the attended entries
    # are then laid out anew in the session's buffers; otherwise nothing is copied).
    selection_changes: int = 0
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens (stop token aside)
    stop_reason: StopReason = "max_tokens"


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Which engine and weights answer: what answers and ``/v1/status`` report."""

    engine: Literal["text", "vlm", "remote"]
    model: str  # the checkpoint's name, e.g. smollm2-135m-gguf or random-smolvlm-256m
    random_weights: bool  # a random-weight checkpoint (tests, latency figures): no answers
    # Why the remote engine did not answer and this (local) one did: "remote: <reason>".
    fallback: str | None = None

    def to_json(self) -> dict[str, Any]:
        """What answers and ``/v1/status`` show: the fields, ``fallback`` only where set."""
        shown = asdict(self)
        if self.fallback is None:
            del shown["fallback"]
        return shown


@dataclass(frozen=True, slots=True)
class UnitGroup:
    """One KV group of a unit prefilled in one pass (``LanguageModel.add_unit``)."""

    group_id: str
    kind: GroupKind  # "frame" (always attended) or "region" (chosen per step)
    tokens: NDArray[np.int64]  # which of the unit's tokens it holds
    gaze_prior: float = 0.0
