"""Fixtures: a tiny random-weight model (built per session in a second), and llama.cpp's server
with a fault-injecting proxy for the remote engine; the real SmolLM2 fixtures are in
tests/conftest.py (the assistant's tests use them too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.smollm2_onnx import build_random
from gazecam.llm import GenerationStats, LanguageModel, LLMSettings
from gazecam.models import model_path
from tests.conftest import missing
from tests.llm.remote_server import FaultProxy, llama_server


def answer(lm: LanguageModel, question: str, **kwargs: Any) -> tuple[str, GenerationStats]:
    """The whole answer to a question, and its stats."""
    pieces = list(lm.generate(question, **kwargs))
    stats = pieces.pop()
    assert isinstance(stats, GenerationStats) and all(isinstance(p, str) for p in pieces)
    return "".join(str(p) for p in pieces), stats


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


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    """llama.cpp's server on the SmolLM2 GGUF, for a test module: its /v1 URL."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] (the dev extra)")
    gguf = model_path("smollm2-135m-gguf")
    if gguf is None or not gguf.exists():
        missing("the SmolLM2 GGUF (gazecam models fetch smollm2-135m-gguf)")
    with llama_server(gguf) as url:
        yield url


@pytest.fixture
def proxy(llama: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the module's llama.cpp server."""
    p = FaultProxy(llama)
    yield p
    p.stop()
