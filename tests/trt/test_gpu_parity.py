"""TensorRT engines against ONNX Runtime on the CPU, on the synthetic demo's crops: every vision
model's FP16 engine is built (``build_engines``, the real tensorrt), loaded through the engine
tier, and must give the CPU's results (classifier features cosine >= 0.999, the same OCR text,
the same detections). Runs only where an NVIDIA GPU, tensorrt and ONNX Runtime's TensorRT EP
are present; elsewhere (CI, this project's CPU machines) it is skipped with the reason."""

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

NOT_RUN = unavailable("engine", probe_platform())
pytestmark = pytest.mark.skipif(NOT_RUN is not None, reason=f"not run here: {NOT_RUN}")

ENGINE = PerceptionSettings(onnx_providers="engine", trt_precision="fp16")
CPU = PerceptionSettings(onnx_providers="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelSettings:
    """The real models (found through the model path), engines built into a fresh cache."""
    real = require_models("efficientnet-lite0", "ppocr-det", "ppocr-rec", "yolox-nano")
    models = ModelSettings(
        models_dir=tmp_path_factory.mktemp("engines"), model_path=[real.models_dir]
    )
    crop_px = CaptureSettings().crop_size_px
    results = build_engines(
        in_use(ENGINE), "fp16", lambda n: runtime_profiles(n, crop_px, ENGINE), models
    )
    for result in results:
        print(result.line())  # build time and size, in the test's output
    return models


@pytest.fixture(scope="module")
def crops() -> list[Crop]:
    return asyncio.run(source_crops("synthetic:demo", 12))


def test_classifier_engine_features_match_the_cpu(models: ModelSettings, crops: list[Crop]) -> None:
    gpu = ImageClassifier(ENGINE, models)
    assert choices()["efficientnet-lite0"].tier == "engine"
    cpu = ImageClassifier(CPU, models)
    images = [c.pixels for c in crops]
    cosines = (gpu.run(images)[1] * cpu.run(images)[1]).sum(axis=1)
    print(f"classifier feature cosine: min {cosines.min():.5f}")
    assert cosines.min() >= 0.999


def test_ocr_engines_read_the_same_text(models: ModelSettings, crops: list[Crop]) -> None:
    gpu = TextReader(ENGINE, models)
    assert choices()["ppocr-det"].tier == choices()["ppocr-rec"].tier == "engine"
    cpu = TextReader(CPU, models)
    for crop in crops:
        assert [t.text for t in gpu.read(crop.pixels)] == [t.text for t in cpu.read(crop.pixels)]


def test_detector_engine_finds_the_same_objects(models: ModelSettings, crops: list[Crop]) -> None:
    gpu = ObjectDetector(ENGINE, models)
    assert choices()["yolox-nano"].tier == "engine"
    cpu = ObjectDetector(CPU, models)
    for crop in crops:
        a, b = gpu.detect(crop.pixels), cpu.detect(crop.pixels)
        assert same_detections(a, b, 2.0), (a, b)
        assert np.allclose([d.score for d in a], [d.score for d in b], atol=0.02)
