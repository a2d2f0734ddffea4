"""The FP16 and Q/DQ (INT8) graphs that TensorRT 11.x builds from, run on the CPU against the
fp32 models on the synthetic demo's keyframe crops: what each keeps, which is what
``FP16_BREAKS`` and ``INT8_KEEPS`` in gazecam.trt.build rest on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gazecam.models import ModelSettings, model_path
from gazecam.perception import PerceptionSettings
from gazecam.perception.classifier import ImageClassifier, converted_model
from gazecam.perception.detector import Detection, ObjectDetector
from gazecam.perception.ocr import TextReader, _normalise
from gazecam.records import Crop
from gazecam.trt.calibrate import calibration_feeds, source_crops
from gazecam.trt.graphs import FP16_BREAKS, INT8_KEEPS, to_fp16, to_qdq
from tests.perception import require_models

CPU = PerceptionSettings(onnx_providers="cpu")
CROPS = 6


@pytest.fixture(scope="module")
def models() -> ModelSettings:
    return require_models("efficientnet-lite0", "ppocr-det", "ppocr-rec", "yolox-nano")


@pytest.fixture(scope="module")
def crops() -> list[Crop]:
    return asyncio.run(source_crops("synthetic:demo", CROPS))


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def same_detections(a: list[Detection], b: list[Detection], tolerance_px: float) -> bool:
    return [d.label for d in a] == [d.label for d in b] and all(
        np.allclose(x.box_px, y.box_px, atol=tolerance_px) for x, y in zip(a, b, strict=True)
    )


def test_fp16_graphs_keep_features_detections_and_text(
    models: ModelSettings, crops: list[Crop], tmp_path: Path
) -> None:
    assert len(crops) == CROPS
    classifier = ImageClassifier(CPU, models)
    fp32 = classifier.run([c.pixels for c in crops])[1]
    classifier.session = cpu_session(to_fp16(converted_model(models), tmp_path / "cls.onnx"))
    fp16 = classifier.run([c.pixels for c in crops])[1]
    cosines = (fp32 * fp16).sum(axis=1)  # both L2-normalised
    assert cosines.min() >= 0.999, cosines

    detector = ObjectDetector(CPU, models)
    before = [detector.detect(c.pixels) for c in crops]
    detector.session = cpu_session(to_fp16(model_path("yolox-nano", models), tmp_path / "d.onnx"))
    after = [detector.detect(c.pixels) for c in crops]
    assert sum(map(len, before)) >= CROPS - 1  # the demo's objects are found
    assert all(same_detections(a, b, 1.0) for a, b in zip(before, after, strict=True))

    reader = TextReader(CPU, models)
    text = [[line.text for line in reader.read(c.pixels)] for c in crops]
    reader.rec = cpu_session(to_fp16(model_path("ppocr-rec", models), tmp_path / "r.onnx"))
    assert [[line.text for line in reader.read(c.pixels)] for c in crops] == text
    assert any("1 REMOVE COVER" in lines for lines in text)


def test_fp16_breaks_the_ocr_detectors_map(
    models: ModelSettings, crops: list[Crop], tmp_path: Path
) -> None:
    assert "ppocr-det" in FP16_BREAKS
    path = model_path("ppocr-det", models)
    blob = {"x": _normalise(crops[0].pixels)[None]}
    fp32 = cpu_session(path).run(None, blob)[0]
    fp16 = cpu_session(to_fp16(path, tmp_path / "det.onnx")).run(None, blob)[0]
    # Measured: off by up to 1.0; 11% of the map above the text threshold instead of 1.6%.
    assert np.abs(fp16 - fp32).max() > 0.5
    assert (fp16 > 0.3).mean() > 3 * (fp32 > 0.3).mean()


def test_qdq_graphs_on_the_demos_crops(
    models: ModelSettings, crops: list[Crop], tmp_path: Path
) -> None:
    """The OCR detector's Q/DQ graph reads the same text; YOLOX's loses detections, so 'best'
    leaves it FP16 (measured on 12 crops: the same detections on 5)."""
    assert "ppocr-det" in INT8_KEEPS and "yolox-nano" not in INT8_KEEPS
    feeds = calibration_feeds("synthetic:demo", ["ppocr-det", "yolox-nano"], CPU, models, CROPS)
    assert len(feeds["ppocr-det"]) == len(feeds["yolox-nano"]) == CROPS

    reader = TextReader(CPU, models)
    text = [[line.text for line in reader.read(c.pixels)] for c in crops]
    qdq = to_qdq(model_path("ppocr-det", models), feeds["ppocr-det"], tmp_path / "det.onnx")
    reader.det = cpu_session(qdq)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(qdq)).graph.node}
    assert [[line.text for line in reader.read(c.pixels)] for c in crops] == text

    detector = ObjectDetector(CPU, models)
    before = [detector.detect(c.pixels) for c in crops]
    qdq = to_qdq(model_path("yolox-nano", models), feeds["yolox-nano"], tmp_path / "yolox.onnx")
    detector.session = cpu_session(qdq)
    after = [detector.detect(c.pixels) for c in crops]
    kept = sum(same_detections(a, b, 8.0) for a, b in zip(before, after, strict=True))
    assert kept < CROPS, "YOLOX's Q/DQ graph keeps its detections now: add it to INT8_KEEPS"
