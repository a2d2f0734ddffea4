"""Image classification and image features with EfficientNet-Lite0 (ImageNet-1k) on ONNX Runtime.

The model is the ``efficientnet-lite0`` checkpoint (``gazecam.models``), converted once to ONNX
into the models cache (``engines.efficientnet_onnx``, no torch) the first time it is needed;
a conversion of another format version is redone. Its input is a 224×224 RGB image; a crop is
resized to 224 whatever its size (fed a 448 crop as it is, its confidence collapses), so a
non-square whole frame is squeezed, not cut.

On each keyframe it classifies the crop, batched with the area around the detections nearest
the gaze (``classifier_detections`` of them, 1 by default: what fits the keyframe's budget on
2 cores), and yields a region per image whose top ImageNet class has at least ``class_score``
softmax probability: kind "object", labelled with the class's short name
(``gazecam/data/imagenet/classes.txt``), its box the crop's or the detection area's. The
crop's pooled 1280-d feature, L2-normalised, is kept with the keyframe's regions
(``records.Percept``); ``embed`` gives the same feature for any image (a task card's photo).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.errors import MissingDependencyError
from gazecam.models import ModelError, ModelSettings, is_conversion, model_path
from gazecam.perception import PerceptionSettings, onnx_session, to_region
from gazecam.records import BGRImage, Crop, Region

MODEL_NAME = "efficientnet-lite0"
CONVERTED_NAME = "efficientnet-lite0-onnx"  # the converted folder in the models cache
FORMAT_VERSION = 2  # of the converted folder; must match engines.efficientnet_onnx's
INPUT_PX = 224
CLASSES_FILE = Path(__file__).parents[1] / "data" / "imagenet" / "classes.txt"
# The area classified around a detection: its box grown by this fraction of its size on each
# side (an object's surroundings help to name it), squared and clipped to the crop.
DETECTION_MARGIN = 0.25
MIN_DETECTION_PX = 16  # a smaller detection area carries too few pixels to classify


def converted_model(models: ModelSettings | None = None) -> Path:
    """The converted ONNX model: in a ``GAZECAM_MODEL_PATH`` folder or the cache, where it is
    converted from the fetched checkpoint first if missing or of another format version."""
    models = models or ModelSettings()
    for folder in [*models.model_path, models.models_dir]:
        if is_conversion(folder / CONVERTED_NAME, FORMAT_VERSION):
            return folder / CONVERTED_NAME / "model.onnx"
    checkpoint = model_path(MODEL_NAME, models)
    try:
        from engines.efficientnet_onnx import convert
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            exc.name or "onnx", "engines", "Converting EfficientNet-Lite0 to ONNX"
        ) from exc
    return convert(checkpoint, models.models_dir / CONVERTED_NAME)


def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    names = tuple(CLASSES_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != 1000:
        raise ModelError(f"{CLASSES_FILE}: {len(names)} class names, expected 1000")
    return names


def square_around(
    box: tuple[float, float, float, float], width_px: int, height_px: int
) -> tuple[int, int, int, int]:
    """``box`` grown by ``DETECTION_MARGIN`` on each side and squared about its centre, clipped
    to an image of ``width_px`` × ``height_px``; integer ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * DETECTION_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (
        max(0, round(cx - side / 2)),
        max(0, round(cy - side / 2)),
        min(width_px, round(cx + side / 2)),
        min(height_px, round(cy + side / 2)),
    )


class ImageClassifier:
    """EfficientNet-Lite0 on ONNX Runtime: ImageNet classes and pooled features of images."""

    def __init__(
        self, settings: PerceptionSettings | None = None, models: ModelSettings | None = None
    ) -> None:
        self.settings = settings or PerceptionSettings()
        path = converted_model(models)
        try:
            config = json.loads((path.parent / "config.json").read_text())
            self.mean, self.std = float(config["input_mean"]), float(config["input_std"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"{path.parent / 'config.json'}: no readable input_mean/input_std"
            ) from exc
        self.session: Any = onnx_session(path, self.settings, MODEL_NAME, models)
        self.names = class_names()

    def _blob(self, images: Sequence[BGRImage]) -> NDArray[np.float32]:
        """The network input [N, 3, 224, 224]: each image resized, RGB, normalised."""
        resized = [
            cv2.resize(image, (INPUT_PX, INPUT_PX), interpolation=cv2.INTER_AREA)
            for image in images
        ]
        rgb = np.stack(resized)[..., ::-1].astype(np.float32)  # [N, 224, 224, 3]
        return np.ascontiguousarray(((rgb - self.mean) / self.std).transpose(0, 3, 1, 2))

    def run(self, images: Sequence[BGRImage]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Class probabilities [N, 1000] and L2-normalised features [N, 1280] of BGR images."""
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not image.size:
                raise ValueError(f"not a BGR uint8 image: shape {image.shape}, {image.dtype}")
        logits, feature = self.session.run(None, {"image": self._blob(images)})
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        norms = np.linalg.norm(feature, axis=1, keepdims=True)
        return probs.astype(np.float32), (feature / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed(self, image_bgr: NDArray[np.uint8]) -> NDArray[np.float32]:
        """The L2-normalised pooled feature [1280] of a BGR uint8 image of any size (resized to
        224); ValueError for an array that is no such image."""
        feature: NDArray[np.float32] = self.run([image_bgr])[1][0]
        return feature

    def classify(
        self, crop: Crop, detections: Sequence[Region] = ()
    ) -> tuple[list[Region], NDArray[np.float32]]:
        """The regions the crop and the areas around the detections nearest the gaze (up to
        ``classifier_detections``) are classified as, and the crop's feature [1280]."""
        h, w = crop.pixels.shape[:2]
        c = crop.box
        boxes: list[tuple[int, int, int, int]] = [(0, 0, w, h)]
        for d in sorted(detections, key=lambda r: r.gaze_distance_px):
            if len(boxes) > self.settings.classifier_detections:
                break
            b = d.box
            x0, y0, x1, y1 = square_around(
                (b.x0 - c.x0, b.y0 - c.y0, b.x1 - c.x0, b.y1 - c.y0), w, h
            )
            if min(x1 - x0, y1 - y0) >= MIN_DETECTION_PX:
                boxes.append((x0, y0, x1, y1))
        probs, features = self.run([crop.pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
        best = probs.argmax(axis=1)
        regions = [
            to_region(crop, "object", self.names[k], float(p[k]), box)
            for box, p, k in zip(boxes, probs, best.tolist(), strict=True)
            if p[k] >= self.settings.class_score
        ]
        return regions, features[0]


def create_image_encoder(
    settings: PerceptionSettings | None = None, models: ModelSettings | None = None
) -> ImageClassifier:
    """The classifier, for code that embeds images without a crop (a task card's photos);
    converts the model first where needed, as ``create_perception`` does."""
    return ImageClassifier(settings, models)
