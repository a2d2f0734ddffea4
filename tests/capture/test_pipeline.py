"""The capture pipeline end to end: a source in, matched frames and crops out."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gazecam.capture.crop import box_for
from gazecam.capture.pipeline import Capture, CaptureResult, FrameResult, capture
from gazecam.errors import ConfigError
from gazecam.records import (
    Box,
    Crop,
    Fixation,
    GazeSample,
    SceneFrame,
    SourceEvent,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.sources import open_source
from gazecam.sources.base import item_time_ns
from gazecam.sources.synthetic import START_NS, read_frame_code

SETTINGS = SourceSettings(synthetic_duration_s=12.0)
BLACK = np.zeros((1200, 1600, 3), np.uint8)


async def run(address: str, settings: CaptureSettings, sources: SourceSettings = SETTINGS):  # type: ignore[no-untyped-def]
    source = open_source(address, sources)
    info = await source.open()
    core = Capture(info, settings)
    results: list[CaptureResult] = []
    events: list[SourceEvent] = []
    keyframe_images: dict[int, np.ndarray] = {}  # frames decode only while the source is open
    try:
        async for r in capture(source, info, settings, core):
            if isinstance(r, CaptureResult):
                results.append(r)
                if r.crop is not None:
                    keyframe_images[r.matched.frame.index] = r.matched.frame.bgr()
            else:
                events.append(r)
    finally:
        await source.close()
    return info, core, results, events, source, keyframe_images


def assert_geometry(crop: Crop, image: np.ndarray, size: int = 448) -> None:
    """Crop centre = gaze except where the box had to slide; crop pixels = the frame's region."""
    m, box = crop.matched, crop.box
    assert m.gaze_x_px is not None and m.gaze_y_px is not None
    h, w = image.shape[:2]
    for centre, gaze, lo, extent in (
        ((box.x0 + box.x1) / 2, m.gaze_x_px, box.x0, w),
        ((box.y0 + box.y1) / 2, m.gaze_y_px, box.y0, h),
    ):
        clamped = lo == 0 or lo == extent - size
        assert abs(centre - gaze) <= 0.5 or clamped
    np.testing.assert_array_equal(crop.pixels, image[box.y0 : box.y1, box.x0 : box.x1])


async def test_synthetic_scene_end_to_end() -> None:
    info, core, results, _, source, _ = await run("synthetic:demo", CaptureSettings())
    assert len(results) == info.frame_count == 360
    assert [r.matched.frame.index for r in results] == list(range(360))  # every frame, in order
    crops = [r.crop for r in results if r.crop is not None]
    assert core.counts.keyframes == len(crops)
    assert 6 <= len(crops) <= 12  # ≤ 1 per second over 12 s, one per fixation onset
    times_s = np.array([c.matched.frame.timestamp_ns for c in crops]) / 1e9
    assert np.diff(times_s).min() >= 1.0 - 1e-9
    assert len({c.matched.fixation_id for c in crops}) == len(crops)
    scene = source.scene
    for c in crops:
        f = c.matched.frame
        assert_geometry(c, scene.render(f.index, (f.timestamp_ns - START_NS) / 1e9))
        assert c.matched.status == "ok" and c.matched.fixation_id is not None


async def test_no_crop_and_no_gaze_point_while_the_glasses_are_off() -> None:
    _, core, results, _, source, _ = await run("synthetic:demo", CaptureSettings())
    off = ~source.track.gaze.worn
    t_off = source.track.gaze.timestamp_ns[off]
    during = [
        r for r in results if t_off[0] + 10**7 < r.matched.frame.timestamp_ns < t_off[-1] - 10**7
    ]
    assert during and all(r.matched.status == "not_worn" for r in during)
    assert all(r.matched.gaze_x_px is None and r.crop is None for r in during)
    assert core.counts.not_worn >= len(during)


@pytest.mark.parametrize("mode", ["center", "full"])
async def test_baselines_crop_the_same_keyframes(mode: str) -> None:
    _, _, gaze_results, _, _, _ = await run("synthetic:demo", CaptureSettings())
    _, _, results, _, _, _ = await run("synthetic:demo", CaptureSettings(crop_mode=mode))  # type: ignore[arg-type]
    keyframes = [r.matched.frame.index for r in results if r.crop is not None]
    assert keyframes == [r.matched.frame.index for r in gaze_results if r.crop is not None]
    expected = [576, 376, 1024, 824] if mode == "center" else [0, 0, 1600, 1200]
    assert all(r.crop.box.as_list() == expected for r in results if r.crop is not None)


async def test_crop_size_and_rate_follow_the_settings() -> None:
    _, _, results, _, _, _ = await run(
        "synthetic:demo", CaptureSettings(crop_size_px=224, keyframes_per_s=3.0, thumbnail_px=200)
    )
    crops = [r.crop for r in results if r.crop is not None]
    assert all(c.pixels.shape == (224, 224, 3) for c in crops)
    assert all(c.thumbnail is not None and c.thumbnail.shape == (150, 200, 3) for c in crops)
    assert len(crops) > 12  # more than the 1/s default allows over 12 s


async def test_neon_recording_end_to_end(neon_demo: Path) -> None:
    info, core, results, events, _, images = await run(str(neon_demo), CaptureSettings())
    assert info.has_fixations and len(results) == 292
    # The scene camera started 0.78 s before the gaze stream: those frames have no gaze.
    first_gaze = next(i for i, r in enumerate(results) if r.matched.status == "ok")
    assert all(r.matched.status == "no_gaze" for r in results[:first_gaze])
    assert core.counts.no_gaze == first_gaze > 20
    crops = [r.crop for r in results if r.crop is not None]
    assert len(crops) >= 8
    for c in crops:
        image = images[c.matched.frame.index]
        assert read_frame_code(image) == c.matched.frame.index  # the right frame was decoded
        assert_geometry(c, image)
    assert [e.name for e in events] == ["recording.begin", "recording.end"]


async def test_fixation_source_must_exist_when_asked_for() -> None:
    source = open_source("synthetic:demo", SETTINGS)
    info = await source.open()
    with pytest.raises(ConfigError, match="synthetic:demo: has no fixation stream"):
        Capture(info, CaptureSettings(fixation_detector="source"))


def test_gaze_off_the_frame_is_counted_and_never_a_crop_centre() -> None:
    info = SourceInfo("test", "synthetic", 1600, 1200, has_fixations=True)
    core = Capture(info, CaptureSettings(fixation_detector="source"))
    # One second each: gaze far off (bad calibration), huge, NaN, just off the left edge
    # (within half a 448 px crop), and on the frame; a fixation in the middle of each second.
    places = [(-5000.0, 600.0), (800.0, 1e9), (math.nan, 600.0), (-100.0, 600.0), (800.0, 600.0)]
    items: list[SourceItem] = []
    for k, (x, y) in enumerate(places):
        t0 = k * 10**9
        items += [GazeSample(t0 + i * 5_000_000, x, y, True) for i in range(200)]
        items += [
            SceneFrame(t0 + 10**7 + j * 33_333_333, 30 * k + j, 1600, 1200, decode=lambda: BLACK)
            for j in range(30)
        ]
        items.append(Fixation(t0 + 10**8, t0 + 9 * 10**8, x, y))
    items.sort(key=item_time_ns)
    results = [r for item in items for r in core.push(item)] + core.flush()
    frames = [r for r in results if isinstance(r, FrameResult)]
    assert len(frames) == 150
    assert {r.matched.status for r in frames[:90]} == {"off_frame"}
    assert all(r.matched.gaze_x_px is None and not r.keyframe for r in frames[:90])
    assert {r.matched.status for r in frames[90:]} == {"ok"}
    assert vars(core.counts) == {
        "frames": 150,
        "gaze_ok": 60,
        "no_gaze": 0,
        "not_worn": 0,
        "off_frame": 90,
        "in_fixation": 48,
        "keyframes": 2,
    }
    keyframes = [r.matched for r in frames if r.keyframe]
    # Just off the edge: the crop slides inside the frame, as on the frame's own edge.
    assert box_for(keyframes[0], "gaze", 448) == Box(0, 376, 448, 824)
    assert box_for(keyframes[1], "gaze", 448) == Box(576, 376, 1024, 824)
