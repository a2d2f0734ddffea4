"""Crop geometry, baselines, thumbnails and keyframe choice."""

from __future__ import annotations

import numpy as np
import pytest

from gazecam.capture.crop import KeyframeSelector, box_for, crop_box, gaze_on_frame, make_crop
from gazecam.records import Box, GazeStatus, MatchedFrame, SceneFrame

MS = 1_000_000


def matched(
    x: float | None,
    y: float | None,
    t_ms: float = 0.0,
    fixation: int | None = 1,
    status: GazeStatus = "ok",
    size: tuple[int, int] = (1600, 1200),
) -> MatchedFrame:
    frame = SceneFrame(
        int(t_ms * MS), 0, size[0], size[1], decode=lambda: np.zeros((1, 1, 3), np.uint8)
    )
    return MatchedFrame(frame, status, int(t_ms * MS), x, y, fixation)


@pytest.mark.parametrize(
    ("x", "y"), [(800.0, 600.0), (300.5, 900.2), (224.0, 224.0), (1376.0, 976.0), (1000.49, 500.51)]
)
def test_box_is_centred_on_the_gaze_to_half_a_pixel(x: float, y: float) -> None:
    box = crop_box(x, y, 1600, 1200, 448)
    assert (box.width_px, box.height_px) == (448, 448)
    assert abs((box.x0 + box.x1) / 2 - x) <= 0.5
    assert abs((box.y0 + box.y1) / 2 - y) <= 0.5


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (10.0, 10.0, Box(0, 0, 448, 448)),
        (1590.0, 1195.0, Box(1152, 752, 1600, 1200)),
        (-300.0, 600.0, Box(0, 376, 448, 824)),  # gaze off the frame: the box stays inside
        (800.0, 1800.0, Box(576, 752, 1024, 1200)),
    ],
)
def test_box_slides_to_stay_inside_the_frame(x: float, y: float, expected: Box) -> None:
    assert crop_box(x, y, 1600, 1200, 448) == expected


def test_box_spans_a_frame_smaller_than_the_crop() -> None:
    assert crop_box(100.0, 100.0, 320, 240, 448) == Box(0, 0, 320, 240)
    assert crop_box(100.0, 100.0, 640, 240, 448) == Box(0, 0, 448, 240)


def test_baseline_modes_ignore_the_gaze() -> None:
    m = matched(100.0, 100.0)
    assert box_for(m, "center", 448) == Box(576, 376, 1024, 824)
    assert box_for(m, "full", 448) == Box(0, 0, 1600, 1200)
    assert box_for(m, "gaze", 448) == Box(0, 0, 448, 448)
    with pytest.raises(ValueError, match="no gaze point"):
        box_for(matched(None, None, status="no_gaze"), "gaze", 448)


def test_crop_pixels_are_the_frames_region_and_thumbnail_keeps_aspect() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1200, 1600, 3), dtype=np.uint8)
    crop = make_crop(matched(1500.0, 300.0), image, "gaze", 448, thumbnail_px=160)
    assert crop.box == Box(1152, 76, 1600, 524)
    np.testing.assert_array_equal(crop.pixels, image[76:524, 1152:1600])
    assert crop.pixels.flags["C_CONTIGUOUS"]
    assert crop.thumbnail is not None and crop.thumbnail.shape == (120, 160, 3)
    # Area averaging: the thumbnail's mean is the frame's mean.
    assert crop.thumbnail.mean() == pytest.approx(image.mean(), abs=1.0)


def test_one_keyframe_per_fixation_onset() -> None:
    selector = KeyframeSelector(max_per_s=1.0)
    picks = [
        selector.select(matched(800.0, 600.0, t, fixation=f))
        for t, f in [(0, 1), (33, 1), (1100, 1), (1200, 2), (1233, 2), (2500, None), (2600, 3)]
    ]
    assert picks == [True, False, False, True, False, False, True]


def test_rate_limit_defers_a_keyframe_within_the_same_fixation() -> None:
    selector = KeyframeSelector(max_per_s=1.0)
    picks = [
        selector.select(matched(800.0, 600.0, t, fixation=f))
        for t, f in [(0, 1), (400, 2), (700, 2), (1000, 2), (1100, 3), (1500, 4), (2100, 4)]
    ]
    # Fixation 2 started too soon; its frame at 1000 ms is taken. Fixation 3 is too short.
    assert picks == [True, False, False, True, False, False, True]


def test_frames_without_gaze_or_fixation_are_never_keyframes() -> None:
    selector = KeyframeSelector(max_per_s=30.0)
    assert not selector.select(matched(None, None, status="no_gaze", fixation=None))
    assert not selector.select(matched(None, None, status="not_worn", fixation=None))
    assert not selector.select(matched(800.0, 600.0, fixation=None))


@pytest.mark.parametrize(
    ("x", "y", "on_frame"),
    [
        (800.0, 600.0, True),
        (0.0, 1199.9, True),
        (-223.0, 600.0, True),  # within half a crop of the edge: its crop slides in
        (1600 + 223.0, 1200 + 223.0, True),
        (-224.0, 600.0, False),  # a centred crop would not show any of the frame
        (800.0, 1424.0, False),
        (-5000.0, 600.0, False),
        (800.0, 1e9, False),
        (float("nan"), 600.0, False),
        (800.0, float("inf"), False),
    ],
)
def test_gaze_far_off_the_frame_is_no_crop_centre(x: float, y: float, on_frame: bool) -> None:
    assert gaze_on_frame(x, y, 1600, 1200, 448) is on_frame
