"""The converted model folder (``engines.smollm2_onnx`` writes it): where it is, converting
the GGUF once where it is not, and its token embedding table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from gazecam.errors import MissingDependencyError
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelError, ModelSettings, is_conversion, model_path

EMBEDDINGS = "embed_tokens.npz"  # as engines.smollm2_onnx writes it
FORMAT_VERSION = 3  # of the converted folder; must match engines.llama_graph.FORMAT_VERSION
CONVERTED_NAME = "smollm2-135m-onnx"


@dataclass(frozen=True, slots=True)
class TokenEmbeddings:
    """The Q8_0 token embedding table, looked up outside the graph (whose input is embeddings,
    so that a vision encoder's visual tokens enter it as text tokens do)."""

    q: NDArray[np.int8]  # [V, hidden/32, 32]
    scales: NDArray[np.float32]  # [V, hidden/32]

    @classmethod
    def load(cls, path: Path) -> TokenEmbeddings:
        """Read embed_tokens.npz; ModelError naming the file if it is missing or malformed."""
        try:
            with np.load(path) as data:
                q, scales = data["q"], data["scales"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path}: no readable token embedding ({exc})") from exc
        if q.dtype != np.int8 or q.ndim != 3 or scales.shape != q.shape[:2]:
            raise ModelError(f"{path}: q {q.shape} {q.dtype} and scales {scales.shape} disagree")
        return cls(q, scales.astype(np.float32))

    def lookup(self, ids: Sequence[int]) -> NDArray[np.float32]:
        """Embeddings of token ids: [T, hidden], q·d exactly as the graph's head dequantises."""
        index = np.asarray(ids, np.int64)
        rows: NDArray[np.float32] = self.q[index] * self.scales[index][..., None]
        return rows.reshape(len(index), -1)


def converted_model_dir(settings: LLMSettings, models: ModelSettings) -> Path:
    """The converted model folder: the configured one, or the cache's (converted once)."""
    if settings.llm_model_dir is not None:
        return settings.llm_model_dir
    out = models.models_dir / CONVERTED_NAME
    if is_conversion(out, FORMAT_VERSION):
        return out
    gguf_path = model_path("smollm2-135m-gguf", models)
    try:
        from engines.smollm2_onnx import convert
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            exc.name or "onnx", "engines", "Converting SmolLM2 to ONNX"
        ) from exc
    convert(gguf_path, out)
    return out
