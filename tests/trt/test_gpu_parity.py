"""Each GPU tier against ONNX Runtime on the CPU, on the synthetic demo's crops: the TensorRT
engines (every vision model's FP16 engine built by ``build_engines`` with the real tensorrt, run
through the engine tier), ONNX Runtime's TensorRT EP (FP16) and its CUDA EP must give the CPU's
results (classifier features cosine >= 0.999, the same OCR text, the same detections).

A tier runs only where this machine has it (an NVIDIA GPU, the provider in this onnxruntime,
tensorrt for the engines); elsewhere (CI, this project's CPU machines) it is skipped with the
reason. An EP tier whose provider is listed but fails to start (a TensorRT EP without
TensorRT's libraries) is skipped with the reason the provider chain logged; an engine that was
just built and does not load fails.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gazecam.models import ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.perception.classifier import ImageClassifier
from gazecam.perception.detector import ObjectDetector
from gazecam.perception.ocr import TextReader
from gazecam.records import Crop
from gazecam.settings import CaptureSettings
from gazecam.trt import probe_platform
from gazecam.trt.build import build_engines, in_use, runtime_profiles
from gazecam.trt.calibrate import source_crops
from gazecam.trt.providers import choices, unavailable
from tests.perception import require_models
from tests.trt.test_precision import same_detections

GPU_TIERS = ("engine", "tensorrt", "cuda")
CPU = PerceptionSettings(onnx_providers="cpu")


@pytest.fixture(scope="module", params=GPU_TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    """A GPU tier this machine has; a skip naming why not elsewhere."""
    why = unavailable(request.param, probe_platform())
    if why is not None:
        pytest.skip(f"{request.param} not run here: {why}")
    return str(request.param)


@pytest.fixture(scope="module")
def gpu(tier: str) -> PerceptionSettings:
    return PerceptionSettings(onnx_providers=tier, trt_precision="fp16")


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, tier: str, gpu: PerceptionSettings
) -> ModelSettings:
    """The real models (found through the model path) with a fresh cache: the engine tier's
    engines are built into it, the TensorRT EP keeps its own engines there."""
    real = require_models("efficientnet-lite0", "ppocr-det", "ppocr-rec", "yolox-nano")
    models = ModelSettings(models_dir=tmp_path_factory.mktemp(tier), model_path=[real.models_dir])
    if tier == "engine":
        crop_px = CaptureSettings().crop_size_px
        results = build_engines(
            in_use(gpu), "fp16", lambda n: runtime_profiles(n, crop_px, gpu), models
        )
        for result in results:
            print(result.line())  # build time and size, in the test's output
    return models


@pytest.fixture(scope="module")
def crops() -> list[Crop]:
    return asyncio.run(source_crops("synthetic:demo", 12))


def require_tier(tier: str, *names: str) -> None:
    """Each named model's session runs on the tier; else fail (an engine just built must
    load) or skip with the provider chain's reason (an EP that did not start here)."""
    for name in names:
        choice = choices()[name]
        print(f"{name}: {choice.summary()}")
        if choice.tier == tier:
            continue
        why = dict(choice.skipped).get(tier, f"it runs on {choice.tier}")
        if tier == "engine":
            pytest.fail(f"{name}: its engine was built but not loaded: {why}")
        pytest.skip(f"{tier} not run here: {name}: {why}")


def test_classifier_features_match_the_cpu(
    tier: str, gpu: PerceptionSettings, models: ModelSettings, crops: list[Crop]
) -> None:
    on_gpu = ImageClassifier(gpu, models)
    require_tier(tier, "efficientnet-lite0")
    cpu = ImageClassifier(CPU, models)
    images = [c.pixels for c in crops]
    cosines = (on_gpu.run(images)[1] * cpu.run(images)[1]).sum(axis=1)
    print(f"{tier}: classifier feature cosine: min {cosines.min():.5f}")
    assert cosines.min() >= 0.999


def test_ocr_reads_the_same_text(
    tier: str, gpu: PerceptionSettings, models: ModelSettings, crops: list[Crop]
) -> None:
    on_gpu = TextReader(gpu, models)
    require_tier(tier, "ppocr-det", "ppocr-rec")
    cpu = TextReader(CPU, models)
    lines = 0
    for crop in crops:
        text = [t.text for t in on_gpu.read(crop.pixels)]
        assert text == [t.text for t in cpu.read(crop.pixels)]
        lines += len(text)
    print(f"{tier}: {lines} text lines on {len(crops)} crops, all as on the CPU")
    assert lines > 0  # the demo's crops hold text: an empty reading on both would prove nothing


def test_detector_finds_the_same_objects(
    tier: str, gpu: PerceptionSettings, models: ModelSettings, crops: list[Crop]
) -> None:
    on_gpu = ObjectDetector(gpu, models)
    require_tier(tier, "yolox-nano")
    cpu = ObjectDetector(CPU, models)
    found = 0
    for crop in crops:
        a, b = on_gpu.detect(crop.pixels), cpu.detect(crop.pixels)
        assert same_detections(a, b, 2.0), (a, b)
        assert np.allclose([d.score for d in a], [d.score for d in b], atol=0.02)
        found += len(a)
    print(f"{tier}: {found} detections on {len(crops)} crops, all as on the CPU")
