"""The language model's execution providers (``GAZECAM_LLM_PROVIDERS``) and threads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnxruntime as ort
import pytest

from gazecam.errors import ConfigError
from gazecam.llm import LanguageModel
from gazecam.llm.settings import AUTO_PROVIDERS, LLMSettings
from gazecam.trt import providers
from tests.trt import FAKE_GPU


def test_auto_providers_prefer_tensorrt_then_cuda_then_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(providers, "this_platform", lambda: FAKE_GPU)  # a GPU that runs all
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


def test_auto_skips_the_gpu_providers_this_machine_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # onnxruntime-gpu (FAKED here) lists TensorRT and CUDA whether or not they can start.
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(FAKE_GPU.ort_providers))
    trt, cuda, cpu = FAKE_GPU.ort_providers
    for platform, expected in (
        (FAKE_GPU, [trt, cuda, cpu]),
        (replace(FAKE_GPU, tensorrt_libs=None), [cuda, cpu]),  # no libnvinfer
        (replace(FAKE_GPU, compute_capability=None, tensorrt_libs=None), [cpu]),  # no GPU
    ):
        monkeypatch.setattr(providers, "this_platform", lambda platform=platform: platform)
        assert LLMSettings(llm_providers="auto").providers() == expected


@pytest.mark.parametrize("spinning", [False, True])
def test_spinning_threads_spin_only_while_a_run_is_under_way(
    tiny_dir: Path, spinning: bool
) -> None:
    lm = LanguageModel(LLMSettings(llm_model_dir=tiny_dir, llm_thread_spinning=spinning))
    options = lm.session.get_session_options()
    flag = "1" if spinning else "0"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == flag
    # ... and when it returns they sleep: between steps numpy, and perception, need the cores.
    assert options.get_session_config_entry("session.force_spinning_stop") == flag
