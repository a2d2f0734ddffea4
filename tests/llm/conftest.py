"""Fixtures: a tiny random-weight model (built per session in a second) and the real SmolLM2
converted once per session, through the runtime's convert-on-first-use path, from the GGUF in
the models cache or on GAZECAM_MODEL_PATH."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engines.smollm2_onnx import build_random
from gazecam.llm import GenerationStats, LanguageModel, LLMSettings
from gazecam.llm.decoder import converted_model_dir
from gazecam.models import ModelError, ModelSettings, model_path


def answer(lm: LanguageModel, question: str, **kwargs: Any) -> tuple[str, GenerationStats]:
    """The whole answer to a question, and its stats."""
    pieces = list(lm.generate(question, **kwargs))
    stats = pieces.pop()
    assert isinstance(stats, GenerationStats) and all(isinstance(p, str) for p in pieces)
    return "".join(str(p) for p in pieces), stats


def gguf_path() -> Path:
    """The real SmolLM2 GGUF; the test is skipped where it is missing."""
    try:
        return model_path("smollm2-135m-gguf")
    except ModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RANDOM 2-layer model (3 heads, 1 KV head of 64, fp32 compute) and its byte tokenizer."""
    out = tmp_path_factory.mktemp("llm") / "tiny"
    build_random(out, layers=2, hidden=192, heads=3, kv_heads=1, ffn=256)
    return out


@pytest.fixture
def tiny_lm(tiny_dir: Path) -> LanguageModel:
    """A fresh LanguageModel on the tiny model (its own cache)."""
    return LanguageModel(LLMSettings(llm_model_dir=tiny_dir, llm_threads=1))


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> ModelSettings:
    """Model settings whose cache is a fresh folder and whose model path holds the GGUF."""
    cache = tmp_path_factory.mktemp("models")
    return ModelSettings(models_dir=cache, model_path=[gguf_path().parent])


@pytest.fixture(scope="session")
def real_dir(real_models: ModelSettings) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into the fresh cache (about 3 s)."""
    return converted_model_dir(LLMSettings(), real_models)


@pytest.fixture(scope="session")
def real_lm(real_dir: Path) -> LanguageModel:
    """One LanguageModel on the real model for the session."""
    return LanguageModel(LLMSettings(llm_model_dir=real_dir))
