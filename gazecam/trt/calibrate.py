"""INT8 calibration inputs: each model's own inputs on the keyframe crops of a source.

The crops are cut by the capture pipeline as at runtime; the perception backends run on them on
the CPU with each ONNX Runtime session wrapped so that the inputs it is given are kept. The
calibration thus sees exactly what the model sees in use (the OCR recogniser: the text lines the
detector found, cut and batched as in ``TextReader``), with no preprocessing written twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gazecam.capture.pipeline import CaptureResult, capture
from gazecam.models import ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.records import Crop
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.sources import open_source

# Enough crops for stable activation ranges on the small vision models; more only costs time.
MAX_CROPS = 24


class RecordingSession:
    """An ONNX Runtime session that keeps a copy of the inputs of each run."""

    def __init__(self, session: Any, feeds: list[dict[str, Any]]) -> None:
        self.session, self.feeds = session, feeds

    def run(self, outputs: Any, feed: dict[str, Any]) -> Any:
        """Keep the inputs, then run the session."""
        self.feeds.append({name: value.copy() for name, value in feed.items()})
        return self.session.run(outputs, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


async def source_crops(address: str, limit: int) -> list[Crop]:
    """Up to ``limit`` keyframe crops of a source, replayed as fast as it reads."""
    source = open_source(address, SourceSettings(pace="fast"))
    info = await source.open()
    crops: list[Crop] = []
    try:
        async for result in capture(source, info, CaptureSettings()):
            if isinstance(result, CaptureResult) and result.crop is not None:
                crops.append(result.crop)
                if len(crops) >= limit:
                    break
    finally:
        await source.close()
    return crops


def calibration_feeds(
    address: str,
    names: Sequence[str],
    settings: PerceptionSettings,
    models: ModelSettings,
    limit: int = MAX_CROPS,
) -> dict[str, list[dict[str, Any]]]:
    """The inputs each named model gets on up to ``limit`` crops of the source at ``address``."""
    crops = asyncio.run(source_crops(address, limit))
    cpu = settings.model_copy(update={"onnx_providers": "cpu"})
    feeds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    runs = []
    if "ppocr-det" in names or "ppocr-rec" in names:
        from gazecam.perception.ocr import TextReader

        reader = TextReader(cpu, models)
        reader.det = RecordingSession(reader.det, feeds.setdefault("ppocr-det", []))
        reader.rec = RecordingSession(reader.rec, feeds.setdefault("ppocr-rec", []))
        runs.append(reader.perceive)
    if "yolox-nano" in names:
        from gazecam.perception.detector import ObjectDetector

        detector = ObjectDetector(cpu, models)
        detector.session = RecordingSession(detector.session, feeds["yolox-nano"])
        runs.append(detector.perceive)
    if "efficientnet-lite0" in names:
        from gazecam.perception.classifier import ImageClassifier

        classifier = ImageClassifier(cpu, models)
        classifier.session = RecordingSession(classifier.session, feeds["efficientnet-lite0"])
        runs.append(lambda crop: classifier.classify(crop)[0])
    for crop in crops:
        for run in runs:
            run(crop)
    return {name: feeds[name] for name in names}
