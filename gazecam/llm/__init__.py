"""The language model: SmolLM2-135M on ONNX Runtime, with region KV groups and sparse attention.

``LanguageModel`` answers questions about an always-kept context (task, current step) and the
visual regions perception found, attending per step to the regions most relevant to the query
and nearest the gaze. The model is converted from its GGUF once, at first use
(``engines.smollm2_onnx``, needs ``gazecam[engines]``).
"""

from __future__ import annotations

from gazecam.llm.decoder import LanguageModel
from gazecam.llm.records import GenerationStats
from gazecam.llm.settings import LLMSettings

__all__ = ["GenerationStats", "LLMSettings", "LanguageModel"]
