"""The language model's execution providers, from ``GAZECAM_LLM_PROVIDERS``."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from gazecam.errors import ConfigError
from gazecam.llm.settings import AUTO_PROVIDERS, LLMSettings


def test_auto_providers_prefer_tensorrt_then_cuda_then_cpu() -> None:
    available = ort.get_available_providers()
    auto = LLMSettings(llm_providers="auto").providers()
    assert auto == [p for p in AUTO_PROVIDERS if p in available]
    assert auto[-1] == "CPUExecutionProvider"
    named = LLMSettings(llm_providers=" CPUExecutionProvider ").providers()
    assert named == ["CPUExecutionProvider"]


def test_an_unavailable_provider_is_a_config_error_naming_the_setting() -> None:
    settings = LLMSettings(llm_providers="NoSuchExecutionProvider,CPUExecutionProvider")
    with pytest.raises(ConfigError, match=r"^llm_providers=.*NoSuchExecutionProvider not avail"):
        settings.providers()
    with pytest.raises(ConfigError, match="none named"):
        LLMSettings(llm_providers=" , ").providers()
