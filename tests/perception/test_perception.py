"""Perception as a whole: settings, frame coordinates, gaze distances, and the demo scene."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from gazecam.capture.crop import make_crop as crop_around_gaze
from gazecam.perception import (
    Perception,
    PerceptionSettings,
    create_perception,
    distance_to_box_px,
    gaze_point_px,
    to_region,
)
from gazecam.records import Box, MatchedFrame, Percept, SceneFrame
from gazecam.sources.synthetic import DEMO_PANEL_OBJECTS, DEMO_PANELS, START_NS, DemoScene
from tests.perception import iou, make_crop, require_models

ALL_MODELS = ("ppocr-det", "ppocr-rec", "yolox-nano")


def as_tuple(box: Box) -> tuple[float, float, float, float]:
    return (box.x0, box.y0, box.x1, box.y1)


# OCR and the detector only: the classifier's regions are tested in test_classifier.py.
NO_CLASSIFIER = PerceptionSettings(classifier_enabled=False)


@pytest.fixture(scope="module")
def perception() -> Perception:
    return create_perception(NO_CLASSIFIER, require_models(*ALL_MODELS))


def test_settings_read_gazecam_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAZECAM_OBJECT_SCORE", "0.6")
    monkeypatch.setenv("GAZECAM_OCR_ENABLED", "false")
    monkeypatch.setenv("GAZECAM_ONNX_PROVIDERS", "CPUExecutionProvider")
    settings = PerceptionSettings()
    assert (settings.object_score, settings.ocr_enabled) == (0.6, False)
    assert settings.onnx_providers == "CPUExecutionProvider"
    assert all(field.description for field in PerceptionSettings.model_fields.values())


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (15.0, 25.0, 0.0),  # inside
        (10.0, 20.0, 0.0),  # on the corner
        (5.0, 25.0, 5.0),  # left of it
        (15.0, 45.0, 5.0),  # below it
        (23.0, 44.0, 5.0),  # off its bottom-right corner by (3, 4)
        (6.0, 17.0, 5.0),  # off its top-left corner by (4, 3)
    ],
)
def test_distance_to_box(x: float, y: float, expected: float) -> None:
    assert distance_to_box_px(x, y, Box(10, 20, 20, 40)) == pytest.approx(expected)


def test_region_box_goes_back_to_frame_pixels_rounded_out_and_clipped() -> None:
    frame = np.zeros((1200, 1600, 3), np.uint8)
    crop = make_crop(frame, Box(100, 200, 548, 648), gaze_px=(300.0, 400.0), timestamp_ns=7)
    region = to_region(crop, "object", "cup", 0.8, (-3.2, 5.5, 460.0, 20.2))
    assert region.box == Box(100, 205, 548, 221)
    assert region.gaze_distance_px == pytest.approx(400.0 - 221)
    assert (region.frame_timestamp_ns, region.confidence) == (7, 0.8)
    far = to_region(
        crop, "text", "FUSE", 0.9, (10.0, 20.0, 50.0, 60.0)
    )  # frame (110, 220)-(150, 260)
    assert far.gaze_distance_px == pytest.approx(math.hypot(300 - 150, 400 - 260))


def test_baseline_crops_measure_from_their_centre() -> None:
    frame = np.zeros((1200, 1600, 3), np.uint8)
    # The 'center' baseline must not see the gaze even where the frame has one.
    center = make_crop(frame, Box(576, 376, 1024, 824), gaze_px=(100.0, 100.0), mode="center")
    assert gaze_point_px(center) == (800.0, 600.0)
    full = make_crop(frame, Box(0, 0, 1600, 1200), gaze_px=None, mode="full")
    assert gaze_point_px(full) == (800.0, 600.0)
    region = to_region(full, "text", "X", 1.0, (900.0, 600.0, 950.0, 620.0))
    assert region.gaze_distance_px == pytest.approx(100.0)


def test_backends_can_be_turned_off() -> None:
    models = require_models(*ALL_MODELS)
    crop = make_crop(np.full((448, 448, 3), 200, np.uint8), Box(0, 0, 448, 448), (224.0, 224.0))
    nothing = create_perception(
        PerceptionSettings(ocr_enabled=False, detector_enabled=False, classifier_enabled=False),
        models,
    )
    assert nothing.perceive(crop) == Percept((), None)
    assert nothing.perceive(crop).feature is None
    scene = DemoScene(1.0)
    x, y = (round(v) for v in scene.targets_world_px[0])
    panel = np.ascontiguousarray(scene.canvas[y - 224 : y + 224, x - 224 : x + 224])
    crop = make_crop(panel, Box(0, 0, 448, 448), (224.0, 224.0))
    text_only = create_perception(
        NO_CLASSIFIER.model_copy(update={"detector_enabled": False}), models
    )
    assert {r.kind for r in text_only.perceive(crop).regions} == {"text"}
    objects_only = create_perception(
        NO_CLASSIFIER.model_copy(update={"ocr_enabled": False}), models
    )
    assert [r.label for r in objects_only.perceive(crop).regions] == ["stop sign"]


def test_demo_panels_show_their_text_and_object(perception: Perception) -> None:
    scene = DemoScene(10.0)
    t_s = 2.0  # the camera has panned: frame and canvas pixels differ by a rounded offset
    ox, oy = (round(v) for v in scene.camera_offset_px(t_s))
    image = scene.render(60, t_s)
    frame = SceneFrame(START_NS + 2_000_000_000, 60, 1600, 1200, decode=lambda: image)
    for label, (wx, wy) in zip(DEMO_PANELS, scene.targets_world_px, strict=True):
        gx, gy = wx - ox, wy - oy  # the panel's target in frame pixels
        matched = MatchedFrame(frame, "ok", frame.timestamp_ns, gx, gy, 1)
        crop = crop_around_gaze(matched, image, "gaze", 448)
        regions = perception.perceive(crop).regions
        texts = [r for r in regions if r.kind == "text"]
        objects = [r for r in regions if r.kind == "object"]
        # The label is the text nearest the gaze; the stop sign's STOP is read too.
        assert texts[0].label.upper() == label
        assert {r.label.upper() for r in texts} <= {label, "STOP"}
        assert [r.label for r in objects] == [DEMO_PANEL_OBJECTS[label]], label
        assert objects[0].confidence >= 0.5
        assert [r.gaze_distance_px for r in regions] == sorted(r.gaze_distance_px for r in regions)
        for r in regions:
            assert r.frame_timestamp_ns == frame.timestamp_ns
            assert crop.box.x0 <= r.box.x0 < r.box.x1 <= crop.box.x1
            assert crop.box.y0 <= r.box.y0 < r.box.y1 <= crop.box.y1
        # The gaze rests on the label (drawn from 180 px left of the target, its baseline 10 px
        # below it): distance 0, and the text box is where the label's ink is in the frame.
        (ink_w, ink_h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 1.1, 3)
        ink = (gx - 180, gy + 10 - ink_h, gx - 180 + ink_w, gy + 10)
        assert texts[0].gaze_distance_px == 0.0
        assert iou(as_tuple(texts[0].box), ink) >= 0.6
        # The object is drawn centred under the label: the distance is the vertical gap.
        obj = objects[0].box
        assert abs((obj.x0 + obj.x1) / 2 - gx) <= 15
        assert obj.x0 <= gx <= obj.x1
        assert objects[0].gaze_distance_px == pytest.approx(obj.y0 - gy)
        assert 20 <= objects[0].gaze_distance_px <= 80
