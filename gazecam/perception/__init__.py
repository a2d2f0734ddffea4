"""Perception: what is in a keyframe's crop, as text lines (OCR), objects (a COCO detector) and
ImageNet classes (an image classifier, which also gives the crop's image feature).

Each backend runs an ONNX model with ONNX Runtime on the crop's pixels and returns ``Region``
records in frame pixels (the crop's offset added back), each with its distance from the gaze
point; ``CombinedPerception`` merges them into the keyframe's ``Percept``. ``create_perception``
builds the backends the settings turn on; the backends are imported only then, so that
importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.models import ModelSettings
from gazecam.records import Box, Crop, Percept, Region, RegionKind
from gazecam.trt import Precision

if TYPE_CHECKING:
    from gazecam.perception.classifier import ImageClassifier


class PerceptionSettings(BaseSettings):
    """Which perception backends run, their thresholds, and how ONNX Runtime runs them."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    ocr_enabled: bool = Field(True, description="Read text lines in the crop (PP-OCRv4).")
    detector_enabled: bool = Field(
        True, description="Detect objects in the crop (YOLOX-Nano, 80 COCO classes)."
    )
    classifier_enabled: bool = Field(
        True,
        description="Classify the crop (and the area around the detection nearest the gaze) "
        "with EfficientNet-Lite0 (1000 ImageNet classes), and keep the crop's image feature.",
    )
    text_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A text line is kept when its mean recognition score is at least this.",
    )
    object_score: float = Field(
        0.4,
        ge=0,
        le=1,
        description="An object is kept when objectness × class probability is at least this.",
    )
    class_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="An image is labelled with its top ImageNet class when the classifier's "
        "probability for it is at least this.",
    )
    classifier_detections: int = Field(
        1,
        ge=0,
        le=8,
        description="How many detections, nearest the gaze first, the classifier also names "
        "(the area around each, in one batch with the crop): each adds 8-15 ms per keyframe "
        "on 2 CPU cores.",
    )
    nms_iou: float = Field(
        0.45,
        gt=0,
        le=1,
        description="Non-maximum suppression: of two object boxes overlapping by more than "
        "this IoU, only the better one is kept.",
    )
    onnx_providers: str = Field(
        "auto",
        description="Where the vision models run, comma-separated tiers in order of preference: "
        "engine (the TensorRT engine of 'gazecam engines build'), tensorrt (ONNX Runtime's "
        "TensorRT EP), cuda (its CUDA EP), cpu, or ONNX Runtime provider names "
        "(e.g. 'CUDAExecutionProvider,CPUExecutionProvider'); 'auto': all four, best first. "
        "A tier this machine lacks is skipped with its reason (logged, and in /v1/status); "
        "the CPU is always the last resort.",
    )
    trt_precision: Precision = Field(
        "fp16",
        description="TensorRT precision: fp32, fp16, int8 (a calibrated engine) or best; "
        "'gazecam engines build' builds it and the engine tier loads it (the TensorRT EP "
        "runs FP16 unless fp32).",
    )
    onnx_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per model; 0: ONNX Runtime's default "
        "(one per physical core).",
    )


class Perception(Protocol):
    """Finds text and objects in a crop, and its image feature."""

    def perceive(self, crop: Crop) -> Percept:
        """The regions found in the crop (boxes in frame pixels) and its feature."""
        ...

    @property
    def classifier(self) -> ImageClassifier | None:
        """The image classifier where it runs: the encoder of a task card's photos too."""
        ...


class RegionFinder(Protocol):
    """One backend (OCR, the detector): the regions it finds in a crop."""

    def perceive(self, crop: Crop) -> list[Region]:
        """The regions found in the crop, boxes in frame pixels."""
        ...


def onnx_session(
    path: Path,
    settings: PerceptionSettings,
    model: str | None = None,
    models: ModelSettings | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a model file on the best provider tier
    (``gazecam.trt.providers``; ``model``: the name its TensorRT engine is cached by);
    ModelError if it cannot load."""
    from gazecam.trt.providers import open_session

    return open_session(path, model, settings, models)


def gaze_point_px(crop: Crop) -> tuple[float, float]:
    """Where distances are measured from: the gaze for a gaze crop, else the crop centre.

    The 'center' and 'full' baselines stand for a system without eye tracking, so they must
    not see the gaze even where the frame has one.
    """
    m = crop.matched
    if crop.mode == "gaze" and m.gaze_x_px is not None and m.gaze_y_px is not None:
        return m.gaze_x_px, m.gaze_y_px
    b = crop.box
    return (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2


def distance_to_box_px(x_px: float, y_px: float, box: Box) -> float:
    """Euclidean distance from a point to a box's area (its edges at x0, x1, y0, y1); 0 inside."""
    dx = max(box.x0 - x_px, 0.0, x_px - box.x1)
    dy = max(box.y0 - y_px, 0.0, y_px - box.y1)
    return math.hypot(dx, dy)


def to_region(
    crop: Crop,
    kind: RegionKind,
    label: str,
    confidence: float,
    crop_box_px: Sequence[float],
) -> Region:
    """A region from a box ``(x0, y0, x1, y1)`` in the crop's pixels: frame pixels, gaze distance.

    The box is rounded outwards to whole pixels and clipped to the crop.
    """
    c = crop.box
    x0, y0, x1, y1 = crop_box_px
    box = Box(
        c.x0 + max(0, math.floor(x0)),
        c.y0 + max(0, math.floor(y0)),
        c.x0 + min(c.width_px, math.ceil(x1)),
        c.y0 + min(c.height_px, math.ceil(y1)),
    )
    gx, gy = gaze_point_px(crop)
    return Region(
        kind=kind,
        label=label,
        confidence=float(confidence),
        box=box,
        gaze_distance_px=distance_to_box_px(gx, gy, box),
        frame_timestamp_ns=crop.matched.frame.timestamp_ns,
    )


class CombinedPerception:
    """Runs several backends on each crop, then the classifier (which also names the areas of
    the objects the backends found); all their regions, nearest the gaze first."""

    def __init__(self, parts: Sequence[RegionFinder], classifier: ImageClassifier | None) -> None:
        self.parts = tuple(parts)
        self.classifier = classifier

    def perceive(self, crop: Crop) -> Percept:
        """The regions of every backend, sorted by distance from the gaze point, and the
        crop's feature (None without the classifier)."""
        regions = [r for part in self.parts for r in part.perceive(crop)]
        feature = None
        if self.classifier is not None:
            objects = [r for r in regions if r.kind == "object"]
            classes, feature = self.classifier.classify(crop, objects)
            regions += classes
        return Percept(tuple(sorted(regions, key=lambda r: r.gaze_distance_px)), feature)


def create_perception(
    settings: PerceptionSettings | None = None, models: ModelSettings | None = None
) -> Perception:
    """The perception the settings ask for: OCR, the object detector, the image classifier.

    Model files are found with ``gazecam.models.model_path`` (ModelError saying how to fetch
    them when missing); each ONNX Runtime session is created here, once.
    """
    settings = settings or PerceptionSettings()
    parts: list[RegionFinder] = []
    if settings.ocr_enabled:
        from gazecam.perception.ocr import TextReader

        parts.append(TextReader(settings, models))
    if settings.detector_enabled:
        from gazecam.perception.detector import ObjectDetector

        parts.append(ObjectDetector(settings, models))
    classifier = None
    if settings.classifier_enabled:
        from gazecam.perception.classifier import ImageClassifier

        classifier = ImageClassifier(settings, models)
    return CombinedPerception(parts, classifier)
