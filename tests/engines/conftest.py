"""Fixtures: the tiny RANDOM-weight SmolVLM checkpoint, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import gguf_path

pytest.importorskip("transformers", reason="needs the vlm-build extra (torch, transformers)")


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-smolvlm-tiny in the Hugging Face layout (SmolLM2's tokenizer from the GGUF)."""
    from engines.random_smolvlm import write_random_checkpoint

    out = tmp_path_factory.mktemp("smolvlm") / "random-smolvlm-tiny"
    return write_random_checkpoint(out, "tiny", seed=0, tokenizer_gguf=gguf_path())
