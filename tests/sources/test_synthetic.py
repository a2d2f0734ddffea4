"""The synthetic source: reproducible scene, gaze at Neon's rates, readable frame codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gazecam.errors import ConfigError
from gazecam.records import GazeSample, SceneFrame
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.synthetic import START_NS, DemoScene, read_frame_code
from gazecam.video import VideoWriter, decode_frames


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
        ConfigError, match=r"synthetic:kitchen: unknown synthetic scene \(known: demo\)"
    ):
        open_source("synthetic:kitchen")
