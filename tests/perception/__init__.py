"""Perception tests: real models on generated images, and helpers they share."""

from __future__ import annotations

import numpy as np

from gazecam.models import ModelError, ModelSettings, model_path
from gazecam.records import BGRImage, Box, Crop, CropMode, GazeStatus, MatchedFrame, SceneFrame
from tests.conftest import missing

# yolox-nano ships with gazecam; the PP-OCR models are fetched into the cache.
MODELS = ModelSettings()


def require_models(*names: str) -> ModelSettings:
    """The model settings for tests, or a skip that says which model is missing and why."""
    for name in names:
        try:
            model_path(name, MODELS)
        except ModelError as exc:
            missing(str(exc))
    return MODELS


def make_crop(
    image: BGRImage,
    box: Box,
    gaze_px: tuple[float, float] | None,
    mode: CropMode = "gaze",
    timestamp_ns: int = 1_000,
) -> Crop:
    """A crop of ``box`` in ``image``, from a frame whose matched gaze is ``gaze_px``."""
    h, w = image.shape[:2]
    frame = SceneFrame(timestamp_ns, 0, w, h, decode=lambda: image)
    gx, gy = gaze_px if gaze_px is not None else (None, None)
    status: GazeStatus = "ok" if gaze_px is not None else "no_gaze"
    matched = MatchedFrame(frame, status, timestamp_ns if gaze_px is not None else None, gx, gy, 1)
    pixels = np.ascontiguousarray(image[box.y0 : box.y1, box.x0 : box.x1])
    return Crop(matched=matched, mode=mode, box=box, pixels=pixels)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
