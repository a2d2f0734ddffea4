"""The runtime's provider chain: the tier each session really runs on and why the better ones
were skipped, with the GPU and ONNX Runtime's GPU providers FAKED where this machine has none
(a fake session reports the providers it was given, as ONNX Runtime does when they start)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gazecam.cli import main
from gazecam.errors import ConfigError
from gazecam.models import BUNDLED_DIR, ModelError, ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.trt import providers
from gazecam.trt.build import build_engines, runtime_profiles
from gazecam.trt.cache import engine_paths
from gazecam.trt.providers import choices, open_session, parse_tiers, plan
from tests.trt import FAKE_GPU, NO_GPU, FakeTensorRT, tiny_models

SETTINGS = PerceptionSettings(onnx_providers="auto", trt_precision="fp16")
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class FakeSession:
    """What a fake InferenceSession records: the model and providers it was opened with."""

    def __init__(self, target: str, providers: list[Any], started: list[str] | None) -> None:
        self.target, self.options = target, dict(p for p in providers if isinstance(p, tuple))
        names = [p if isinstance(p, str) else p[0] for p in providers]
        self.providers = names if started is None else started

    def get_providers(self) -> list[str]:
        return self.providers


def fake_ort(failing: set[str] = frozenset(), started: list[str] | None = None) -> Any:
    """A fake InferenceSession: providers in ``failing`` raise as a provider that cannot start;
    ``started``: the providers ONNX Runtime really started (a silent fallback), else all."""

    def create(target: str, sess_options: Any, providers: list[Any]) -> FakeSession:
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if first in failing:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {first} failed\nmore")
        return FakeSession(target, providers, started)

    return create


@pytest.fixture
def models(tmp_path: Path) -> ModelSettings:
    return tiny_models(tmp_path)


def rec_path(models: ModelSettings) -> Path:
    return models.model_path[0] / "ppocr-rec" / "ch_PP-OCRv4_rec_infer.onnx"


def test_tiers_a_setting_names() -> None:
    assert parse_tiers("auto") == ["engine", "tensorrt", "cuda", "cpu"]
    assert parse_tiers("cuda") == ["cuda", "cpu"]  # the CPU is always the last resort
    assert parse_tiers(f" {CUDA},{CPU} ") == ["cuda", "cpu"]
    assert parse_tiers("engine,TensorrtExecutionProvider") == ["engine", "tensorrt", "cpu"]
    with pytest.raises(
        ConfigError, match=r"onnx_providers='gpu,cpu': gpu unknown \(known: auto, engine"
    ):
        parse_tiers("gpu,cpu")


def test_a_machine_without_gpu_runs_on_the_cpu_and_says_why(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(providers, "_logged", set())  # as in a fresh process
    yolox = BUNDLED_DIR / "yolox-nano" / "yolox_nano.onnx"
    with caplog.at_level(logging.WARNING, logger="gazecam.trt.providers"):
        for name in ("yolox-nano", "yolox-again"):
            session = open_session(yolox, name, SETTINGS, ModelSettings(), NO_GPU)
            assert session.get_providers() == [CPU]  # a real ONNX Runtime session
    choice = choices()["yolox-nano"]
    assert (choice.tier, choice.providers) == ("cpu", (CPU,))
    assert choice.skipped == (
        ("engine", "no NVIDIA GPU found"),
        ("tensorrt", "no NVIDIA GPU found"),
        ("cuda", "no NVIDIA GPU found"),
    )
    assert choice.summary() == "cpu (engine, tensorrt, cuda skipped: no NVIDIA GPU found)"
    # Logged once for both models: the same fallback.
    assert caplog.messages == [
        "vision model sessions on cpu (engine, tensorrt, cuda skipped: no NVIDIA GPU found)"
    ]
    assert choice.to_json() == {
        "tier": "cpu",
        "providers": [CPU],
        "skipped": {
            "engine": "no NVIDIA GPU found",
            "tensorrt": "no NVIDIA GPU found",
            "cuda": "no NVIDIA GPU found",
        },
    }


def test_without_an_engine_the_tensorrt_ep_builds_its_own_under_the_model_cache(
    models: ModelSettings,
) -> None:
    session = open_session(rec_path(models), "ppocr-rec", SETTINGS, models, FAKE_GPU, fake_ort())
    choice = choices()["ppocr-rec"]
    assert choice.tier == "tensorrt" and choice.providers == (TRT, CUDA, CPU)
    ((tier, why),) = choice.skipped
    assert tier == "engine" and why == (
        f"ppocr-rec: no fp16 TensorRT engine in {models.models_dir / 'trt-engines'}; "
        "run 'gazecam engines build --precision fp16 --models ppocr-rec'"
    )
    cache = str(models.models_dir / "trt-ep-cache" / "ppocr-rec")
    (profile,) = runtime_profiles("ppocr-rec", 448, SETTINGS)
    assert session.options[TRT] == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": True,
        "trt_profile_min_shapes": "x:1x3x48x320",
        "trt_profile_opt_shapes": f"x:{'x'.join(map(str, profile.opt_shape))}",
        "trt_profile_max_shapes": "x:6x3x48x3584",
    }
    # PP-OCR's detector: no FP16 on the EP either.
    det = models.model_path[0] / "ppocr-det" / "ch_PP-OCRv4_det_infer.onnx"
    assert not open_session(det, "ppocr-det", SETTINGS, models, FAKE_GPU, fake_ort()).options[TRT][
        "trt_fp16_enable"
    ]


def test_the_cuda_ep_searches_convolutions_exhaustively_only_at_fixed_shapes(
    models: ModelSettings,
) -> None:
    # cuDNN's exhaustive search runs again for each new shape: 354 ms a crop for the
    # recogniser's line widths on an H200 (18 ms on its CPU).
    cuda = SETTINGS.model_copy(update={"onnx_providers": "cuda"})
    det = models.model_path[0] / "ppocr-det" / "ch_PP-OCRv4_det_infer.onnx"
    searches = {
        model: open_session(path, model, cuda, models, FAKE_GPU, fake_ort()).options[CUDA]
        for model, path in (
            ("ppocr-rec", rec_path(models)),
            ("ppocr-det", det),
            ("smolvlm-vision-448", rec_path(models)),  # any graph: the name sets the shapes
            (None, rec_path(models)),  # a model gazecam knows no shapes of
        )
    }
    assert searches == {
        "ppocr-rec": {"cudnn_conv_algo_search": "HEURISTIC"},
        "ppocr-det": {"cudnn_conv_algo_search": "HEURISTIC"},  # its profile allows 32..448
        "smolvlm-vision-448": {"cudnn_conv_algo_search": "EXHAUSTIVE"},
        None: {"cudnn_conv_algo_search": "HEURISTIC"},
    }
    assert choices()["ppocr-rec"].tier == "cuda"


def test_a_built_engine_runs_and_a_foreign_or_corrupt_one_is_skipped(
    models: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAZECAM_CROP_SIZE_PX", "448")
    build_engines(
        ["ppocr-rec"],
        "fp16",
        lambda n: runtime_profiles(n, 448, SETTINGS),
        models,
        None,
        FAKE_GPU,
        FakeTensorRT("10.3.0"),
    )
    engine, wrapper, _ = engine_paths(models.models_dir, "ppocr-rec", "fp16")
    session = open_session(rec_path(models), "ppocr-rec", SETTINGS, models, FAKE_GPU, fake_ort())
    assert session.target == str(wrapper) and session.providers == [TRT]
    assert choices()["ppocr-rec"].tier == "engine" and choices()["ppocr-rec"].skipped == ()

    other = replace(FAKE_GPU, compute_capability="8.6")
    open_session(rec_path(models), "ppocr-rec", SETTINGS, models, other, fake_ort())
    choice = choices()["ppocr-rec"]
    assert choice.tier == "tensorrt" and "(foreign engine)" in choice.skipped[0][1]
    # Another crop size than the engine's: stale.
    monkeypatch.setenv("GAZECAM_CROP_SIZE_PX", "640")
    open_session(rec_path(models), "ppocr-rec", SETTINGS, models, FAKE_GPU, fake_ort())
    assert "built for other input shapes" in choices()["ppocr-rec"].skipped[0][1]
    monkeypatch.setenv("GAZECAM_CROP_SIZE_PX", "448")
    engine.write_bytes(engine.read_bytes()[:-1])
    open_session(rec_path(models), "ppocr-rec", SETTINGS, models, FAKE_GPU, fake_ort())
    assert "corrupt engine" in choices()["ppocr-rec"].skipped[0][1]


def test_providers_that_fail_or_quietly_fall_back_are_reported(models: ModelSettings) -> None:
    open_session(rec_path(models), "ppocr-rec", SETTINGS, models, FAKE_GPU, fake_ort(failing={TRT}))
    choice = choices()["ppocr-rec"]
    assert choice.tier == "cuda" and choice.providers == (CUDA, CPU)
    assert choice.skipped[1] == (
        "tensorrt",
        f"ONNX Runtime could not start it ([ONNXRuntimeError] : 1 : FAIL : {TRT} failed)",
    )
    # ONNX Runtime asked for CUDA but running on the CPU only: reported as the CPU.
    cuda_only = PerceptionSettings(onnx_providers="cuda")
    open_session(
        rec_path(models), "ppocr-rec", cuda_only, models, FAKE_GPU, fake_ort(started=[CPU])
    )
    choice = choices()["ppocr-rec"]
    assert choice.tier == "cpu" and choice.skipped == (
        ("cuda", f"ONNX Runtime started {CPU} instead"),
    )


def test_missing_or_old_tensorrt_and_a_cpu_onnxruntime_are_reasons(models: ModelSettings) -> None:
    no_trt = replace(FAKE_GPU, tensorrt_version=None)
    assert plan(rec_path(models), "ppocr-rec", SETTINGS, models, no_trt).skipped == (
        ("engine", "the tensorrt package is not installed (pip install 'gazecam[trt]')"),
    )
    old = plan(
        rec_path(models), "ppocr-rec", SETTINGS, models, replace(FAKE_GPU, tensorrt_version="8.6.1")
    )
    assert old.tier == "tensorrt" and old.skipped == (
        ("engine", "TensorRT 8.6.1 is too old (10.0 or newer needed)"),
    )
    # onnxruntime-gpu lists its TensorRT EP without TensorRT installed (seen on an H200): the
    # TensorRT tiers are skipped with that reason, not tried and failed at every session.
    no_libs = plan(
        rec_path(models),
        "ppocr-rec",
        SETTINGS,
        models,
        replace(FAKE_GPU, tensorrt_version=None, tensorrt_libs=None),
    )
    libs_why = (
        "TensorRT's libraries are not found (libnvinfer.so.10 or libnvinfer.so.11: install "
        "TensorRT, e.g. pip install 'gazecam[trt]')"
    )
    assert no_libs.tier == "cuda" and no_libs.skipped == (
        ("engine", "the tensorrt package is not installed (pip install 'gazecam[trt]')"),
        ("tensorrt", libs_why),
    )
    cpu_ort = plan(
        rec_path(models), "ppocr-rec", SETTINGS, models, replace(FAKE_GPU, ort_providers=(CPU,))
    )
    why = (
        "this onnxruntime has no {} (install onnxruntime-gpu, or NVIDIA's onnxruntime wheel "
        "on a Jetson)"
    )
    assert cpu_ort.tier == "cpu" and cpu_ort.skipped == (
        ("engine", why.format(TRT)),
        ("tensorrt", why.format(TRT)),
        ("cuda", why.format(CUDA)),
    )


def test_a_model_even_the_cpu_cannot_load_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match=rf"^{broken}: ONNX Runtime cannot load it \(.+\)$"):
        open_session(broken, None, SETTINGS, ModelSettings(models_dir=tmp_path), NO_GPU)


def test_models_list_says_where_each_vision_model_would_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GAZECAM_OCR_ENABLED", "false")
    monkeypatch.setenv("GAZECAM_CLASSIFIER_ENABLED", "false")
    monkeypatch.setattr(providers, "this_platform", lambda: NO_GPU)
    assert main(["models", "list"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("providers:")]
    assert lines == [
        "providers: yolox-nano -> cpu (engine, tensorrt, cuda skipped: no NVIDIA GPU found)"
    ]
    monkeypatch.setattr(providers, "this_platform", lambda: FAKE_GPU)  # nothing is loaded
    assert main(["models", "list"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("providers:")]
    assert line.startswith("providers: yolox-nano -> tensorrt (engine skipped: yolox-nano: no fp16")
