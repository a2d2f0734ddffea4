"""YOLOX-Nano on ONNX Runtime: finds drawn objects with the right class and box."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import gazecam.models as models_module
from gazecam.models import ModelError, ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.perception.detector import COCO_CLASSES, INPUT_SIZE_PX, ObjectDetector, letterbox
from gazecam.records import BGRImage, Box
from tests.perception import iou, make_crop, require_models

AA = cv2.LINE_AA


@pytest.fixture(scope="module")
def detector() -> ObjectDetector:
    return ObjectDetector(PerceptionSettings(), require_models("yolox-nano"))


def stop_sign(image: BGRImage, cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    """A red octagon with a white rim and STOP; its box ``(x0, y0, x1, y1)``."""
    angles = np.pi / 8 + np.arange(8) * np.pi / 4
    for radius, color in (
        (r, (30, 30, 200)),
        (0.92 * r, (255, 255, 255)),
        (0.85 * r, (30, 30, 200)),
    ):
        corners = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        cv2.fillPoly(image, [np.round(corners).astype(np.int32)], color, AA)
    scale = r / 60
    org = (cx - int(40 * scale), cy + int(12 * scale))
    cv2.putText(image, "STOP", org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255,) * 3, 5, AA)
    reach = r * np.cos(np.pi / 8)  # the octagon's flat sides face up, down, left and right
    return (cx - reach, cy - reach, cx + reach, cy + reach)


def clock(image: BGRImage, cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    """A white dial with twelve ticks and two hands; its box ``(x0, y0, x1, y1)``."""
    cv2.circle(image, (cx, cy), r, (255, 255, 255), -1, AA)
    cv2.circle(image, (cx, cy), r, (20, 20, 20), 4, AA)
    for hour in range(12):
        dx, dy = np.sin(hour * np.pi / 6), -np.cos(hour * np.pi / 6)
        inner, outer = ((round(cx + f * r * dx), round(cy + f * r * dy)) for f in (0.8, 0.93))
        cv2.line(image, inner, outer, (20, 20, 20), 2, AA)
    cv2.line(image, (cx, cy), (cx, cy - int(0.65 * r)), (20, 20, 20), 4, AA)
    cv2.line(image, (cx, cy), (cx + int(0.45 * r), cy + int(0.2 * r)), (20, 20, 20), 3, AA)
    return (cx - r, cy - r, cx + r, cy + r)


def scene(width: int, height: int) -> BGRImage:
    return np.full((height, width, 3), 200, np.uint8)


def test_finds_drawn_objects_with_class_and_box(detector: ObjectDetector) -> None:
    image = scene(448, 448)
    drawn = {"stop sign": stop_sign(image, 120, 130, 80), "clock": clock(image, 320, 320, 85)}
    found = detector.detect(image)
    assert sorted(d.label for d in found) == ["clock", "stop sign"]
    for d in found:
        assert d.score >= 0.6
        assert iou(d.box_px, drawn[d.label]) >= 0.5


def test_boxes_map_back_through_the_letterbox(detector: ObjectDetector) -> None:
    # A wide image is scaled by 416/1200 and padded below; the box must come back to its place.
    image = scene(1200, 500)
    expected = clock(image, 1000, 300, 150)
    (found,) = detector.detect(image)
    assert found.label == "clock"
    assert iou(found.box_px, expected) >= 0.7


def test_letterbox_pads_below_and_right_with_114() -> None:
    image = np.zeros((300, 600, 3), np.uint8)
    blob, scale = letterbox(image)
    assert blob.shape == (1, 3, INPUT_SIZE_PX, INPUT_SIZE_PX) and blob.dtype == np.float32
    assert scale == pytest.approx(416 / 600)
    assert blob[0, :, :208].max() == 0  # the image: 208 rows at the top
    assert (blob[0, :, 208:] == 114).all()  # the padding under it


def test_one_object_gives_one_box(detector: ObjectDetector) -> None:
    image = scene(448, 448)
    stop_sign(image, 224, 224, 120)
    assert [d.label for d in detector.detect(image)] == ["stop sign"]  # after NMS


def test_empty_scene_has_no_objects(detector: ObjectDetector) -> None:
    assert detector.detect(scene(448, 448)) == []


def test_object_score_threshold() -> None:
    strict = ObjectDetector(PerceptionSettings(object_score=0.99), require_models("yolox-nano"))
    image = scene(448, 448)
    clock(image, 224, 224, 100)
    assert strict.detect(image) == []


def test_regions_are_in_frame_pixels(detector: ObjectDetector) -> None:
    frame = scene(1600, 1200)
    x0, y0, x1, y1 = stop_sign(frame, 1300, 900, 90)
    crop = make_crop(frame, Box(1000, 700, 1448, 1148), gaze_px=(1150.0, 900.0))
    (region,) = detector.perceive(crop)
    assert (region.kind, region.label) == ("object", "stop sign")
    assert (
        iou((region.box.x0, region.box.y0, region.box.x1, region.box.y1), (x0, y0, x1, y1)) >= 0.5
    )
    # The gaze is left of the sign, level with its centre: the gap to its left edge.
    assert region.gaze_distance_px == pytest.approx(region.box.x0 - 1150.0)
    assert region.gaze_distance_px == pytest.approx(x0 - 1150.0, abs=4)  # 67 px to the drawing


def test_the_model_has_one_score_per_coco_class(detector: ObjectDetector) -> None:
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    assert detector.session.get_outputs()[0].shape[-1] == 5 + len(COCO_CLASSES)


def test_missing_model_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, "BUNDLED_DIR", tmp_path)  # an install that lost it
    with pytest.raises(ModelError, match=r"yolox-nano: bundled file .* is missing; reinstall"):
        ObjectDetector(models=ModelSettings(models_dir=tmp_path, model_path=[]))
