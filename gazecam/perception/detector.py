"""Object detection with YOLOX-Nano (80 COCO classes) on ONNX Runtime.

The model (see ``gazecam/data/models/yolox-nano/SOURCE.md``) takes a 1×3×416×416 float32 BGR
image with values 0..255, letterboxed (the image scaled to fit at the top left, the rest filled with
114), and returns 1×3549×85 raw predictions: for each cell of the stride 8, 16 and 32 grids
(52² + 26² + 13² = 3549), the box centre offset and log-size, the objectness and 80 class
probabilities. Decoding follows the upstream demo (YOLOX ``demo_postprocess``); non-maximum
suppression is class-agnostic, as the upstream ONNX demo's, so one object gets one label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.models import ModelSettings, model_path
from gazecam.perception import PerceptionSettings, onnx_session, to_region
from gazecam.records import BGRImage, Crop, Region

INPUT_SIZE_PX = 416
PAD_VALUE = 114
STRIDES_PX = (8, 16, 32)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object in an image's pixels; the box is ``(x0, y0, x1, y1)`` as floats."""

    label: str
    score: float  # objectness × class probability
    box_px: tuple[float, float, float, float]


def _grids() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Cell positions (3549, 2) and strides (3549, 1) of the three output grids, in order."""
    cells, strides = [], []
    for stride in STRIDES_PX:
        side = INPUT_SIZE_PX // stride
        ys, xs = np.mgrid[0:side, 0:side]
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((side * side, 1), stride))
    return (
        np.concatenate(cells).astype(np.float32),
        np.concatenate(strides).astype(np.float32),
    )


def letterbox(image: BGRImage) -> tuple[NDArray[np.float32], float]:
    """The network input (1, 3, 416, 416) float32 and the scale from image to input pixels."""
    h, w = image.shape[:2]
    scale = min(INPUT_SIZE_PX / h, INPUT_SIZE_PX / w)
    new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
    padded = np.full((INPUT_SIZE_PX, INPUT_SIZE_PX, 3), PAD_VALUE, dtype=np.uint8)
    padded[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    blob = padded.transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, 416, 416), BGR 0..255
    return np.ascontiguousarray(blob), scale


class ObjectDetector:
    """YOLOX-Nano on ONNX Runtime; one session, created once and reused."""

    def __init__(
        self, settings: PerceptionSettings | None = None, models: ModelSettings | None = None
    ) -> None:
        self.settings = settings or PerceptionSettings()
        self.session: Any = onnx_session(
            model_path("yolox-nano", models), self.settings, "yolox-nano", models
        )
        self._input_name: str = self.session.get_inputs()[0].name
        self._cells, self._strides = _grids()

    def detect(self, image: BGRImage) -> list[Detection]:
        """Objects in a BGR image (any size; it is letterboxed to 416), best first."""
        blob, scale = letterbox(image)
        raw = self.session.run(None, {self._input_name: blob})[0][0]  # (3549, 85)
        centres = (raw[:, 0:2] + self._cells) * self._strides  # (3549, 2), input px
        sizes = np.exp(raw[:, 2:4]) * self._strides  # (3549, 2)
        class_probs = raw[:, 5:]  # (3549, 80)
        classes = class_probs.argmax(axis=1)  # (3549,)
        scores = raw[:, 4] * class_probs[np.arange(len(classes)), classes]  # (3549,)
        keep = np.flatnonzero(scores >= self.settings.object_score)
        if keep.size == 0:
            return []
        # Back to image pixels: undo the letterbox scale (the image sits at the top left).
        x0y0 = (centres[keep] - sizes[keep] / 2) / scale  # (K, 2)
        wh = sizes[keep] / scale  # (K, 2)
        chosen = cv2.dnn.NMSBoxes(
            np.concatenate([x0y0, wh], axis=1).tolist(),
            scores[keep].tolist(),
            self.settings.object_score,
            self.settings.nms_iou,
        )
        h, w = image.shape[:2]
        found = []
        for k in np.asarray(chosen, dtype=np.int64).ravel().tolist():
            x0, y0 = np.clip(x0y0[k], 0, (w, h)).tolist()
            x1, y1 = np.clip(x0y0[k] + wh[k], 0, (w, h)).tolist()
            i = keep[k]
            found.append(Detection(COCO_CLASSES[classes[i]], float(scores[i]), (x0, y0, x1, y1)))
        return sorted(found, key=lambda d: -d.score)

    def perceive(self, crop: Crop) -> list[Region]:
        """The objects in a crop, as regions in frame pixels."""
        return [
            to_region(crop, "object", d.label, d.score, d.box_px) for d in self.detect(crop.pixels)
        ]
