"""The synthetic source: reproducible scene, gaze at Neon's rates, readable frame codes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gazecam.errors import ConfigError
from gazecam.records import GazeSample, SceneFrame
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.synthetic import (
    START_NS,
    DemoScene,
    SyntheticSource,
    demo_photo,
    read_frame_code,
)
from gazecam.sources.video import VideoWriter, decode_frames
from tests.conftest import REPO


async def test_info_rates_and_order() -> None:
    source = open_source("synthetic:demo", SourceSettings(synthetic_duration_s=3.0))
    info = await source.open()
    assert (info.kind, info.frame_width_px, info.frame_height_px, info.frame_count) == (
        "synthetic",
        1600,
        1200,
        90,
    )
    items = [i async for i in source.stream()]
    frames = [i for i in items if isinstance(i, SceneFrame)]
    gaze = [i for i in items if isinstance(i, GazeSample)]
    assert (len(frames), len(gaze)) == (90, 600)
    assert np.allclose(np.diff([f.timestamp_ns for f in frames]), 1e9 / 30, atol=1)
    assert set(np.diff([g.timestamp_ns for g in gaze]).tolist()) == {5_000_000}
    assert frames[0].timestamp_ns == gaze[0].timestamp_ns == START_NS


def test_the_scene_is_reproducible() -> None:
    a, b = DemoScene(5.0).gaze_track(), DemoScene(5.0).gaze_track()
    np.testing.assert_array_equal(a.gaze.x_px, b.gaze.x_px)
    np.testing.assert_array_equal(DemoScene(5.0).render(3, 0.1), DemoScene(5.0).render(3, 0.1))


def test_frame_codes_survive_video_coding(tmp_path: Path) -> None:
    scene = DemoScene(2.0)
    path = tmp_path / "v.mp4"
    indices = [0, 1, 2, 1000, 65535, 12345]
    with VideoWriter(path, 1600, 1200) as writer:
        for i in indices:
            writer.write(scene.render(i, 0.0))
    decoded = [read_frame_code(f.to_ndarray(format="bgr24")) for f in decode_frames(path)]
    assert decoded == indices


def test_unknown_scene_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"synthetic:kitchen: unknown synthetic scene \(known: demo, demo-notext\)",
    ):
        open_source("synthetic:kitchen")


def test_the_textless_scene_differs_from_the_demo_only_in_its_labels() -> None:
    demo, textless = DemoScene(10.0), DemoScene(10.0, labels=False)
    assert textless.gaze_track().fixations == demo.gaze_track().fixations
    differ = np.any(demo.canvas != textless.canvas, axis=-1)
    ys, xs = np.nonzero(differ)
    # Every differing pixel lies in a label's line: 20-380 px right of a panel's left edge and
    # 125-170 px below its top (its target is (200, 150) into the panel).
    near = np.zeros(differ.shape, np.bool_)
    for x, y in demo.targets_world_px:
        near[int(y) - 25 : int(y) + 20, int(x) - 180 : int(x) + 180] = True
    assert differ.sum() > 6 * 3000 and near[ys, xs].all()
    source = open_source("synthetic:demo-notext", SourceSettings(synthetic_duration_s=1.0))
    assert isinstance(source, SyntheticSource) and not source.scene.labels


def test_the_demo_photos_are_what_the_scene_renders() -> None:
    for step in range(1, 7):
        committed = cv2.imread(str(REPO / "gazecam" / "data" / "demo_photos" / f"step{step}.jpg"))
        rendered = demo_photo(step)
        assert committed.shape == rendered.shape == (448, 448, 3)
        # JPEG at quality 90 moves pixels by a few levels, never the picture.
        assert np.abs(committed.astype(int) - rendered).mean() < 3
