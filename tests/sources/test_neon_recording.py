"""The Neon native recording source, on the real neon-demo recording with a rendered video."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from gazecam.errors import SourceError
from gazecam.records import Fixation, GazeSample, SceneFrame, SourceEvent
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.base import item_time_ns
from gazecam.sources.synthetic import read_frame_code
from tests.conftest import (
    SCENE_TIME,
    SCENE_VIDEO,
    copy_recording,
    render_scene_video,
    two_part_recording,
)


async def test_info_and_items(neon_demo: Path) -> None:
    source = open_source(str(neon_demo))
    info = await source.open()
    assert info.kind == "neon-recording"
    assert (info.frame_width_px, info.frame_height_px, info.frame_count) == (1600, 1200, 292)
    assert info.gaze_rate_hz == pytest.approx(200.0)
    assert info.camera is not None and info.camera.camera_matrix[0][0] == pytest.approx(
        888.41, abs=0.01
    )
    assert info.start_ns == 1760676788219000000 and info.duration_ns == 12443000000
    assert info.has_fixations
    items = [item async for item in source.stream()]
    assert [item_time_ns(i) for i in items] == sorted(item_time_ns(i) for i in items)
    frames = [i for i in items if isinstance(i, SceneFrame)]
    gaze = [i for i in items if isinstance(i, GazeSample)]
    fixations = [i for i in items if isinstance(i, Fixation)]
    assert (len(frames), len(gaze), len(fixations)) == (292, 1788, 23)
    assert frames[0].timestamp_ns == int(np.fromfile(neon_demo / SCENE_TIME, "<i8")[0])
    assert all(g.worn for g in gaze)
    assert gaze[0].timestamp_ns == 1760676790465965534
    assert [e.name for e in items if isinstance(e, SourceEvent)] == [
        "recording.begin",
        "recording.end",
    ]
    assert source.stats.frames_in == 292 and source.stats.gaze_in == 1788
    # Lazily decoded frames are the right ones, in and out of order.
    for i in (5, 100, 291, 17):
        assert read_frame_code(frames[i].bgr()) == i
    # The same frames as I420 straight from the decoder (what the Neon simulator encodes).
    for i in (5, 100):
        assert read_frame_code(cv2.cvtColor(frames[i].decode_i420(), cv2.COLOR_YUV2BGR_I420)) == i
        assert i420_error(frames[i]) < 2
    await source.close()


def i420_error(frame: SceneFrame) -> float:
    """Mean absolute difference of a frame's I420 pixels, as BGR, from its BGR pixels: only
    the rounding of two BT.601 conversions of the same decoded planes."""
    assert frame.decode_i420 is not None
    i420 = frame.decode_i420()
    assert i420.shape == (frame.height_px * 3 // 2, frame.width_px)
    bgr = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420).astype(np.int16)
    return float(np.abs(bgr - frame.bgr().astype(np.int16)).mean())


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    return copy_recording(tmp_path / "rec")


async def test_missing_video_is_named(broken: Path) -> None:
    with pytest.raises(SourceError, match=f"{broken}: no scene video .*ps1.mp4' is missing"):
        await open_source(str(broken)).open()


async def test_video_shorter_than_its_timestamps(broken: Path) -> None:
    render_scene_video(broken, frames=250)
    with pytest.raises(
        SourceError, match="scene video has 250 frames but its timestamp files list 292"
    ):
        await open_source(str(broken)).open()


async def test_gaze_out_of_order_is_named(broken: Path) -> None:
    time_file = broken / "gaze_200hz.time"
    ts = np.fromfile(time_file, "<i8")
    ts[100], ts[101] = ts[101], ts[100]
    ts.tofile(time_file)
    render_scene_video(broken, frames=3)
    with pytest.raises(
        SourceError, match=r"gaze_200hz.time: timestamps out of order at index 101$"
    ):
        await open_source(str(broken)).open()


async def test_recording_without_gaze(broken: Path) -> None:
    for f in [*broken.glob("gaze*"), *broken.glob("worn*")]:
        f.unlink()
    with pytest.raises(SourceError, match=f"{broken}: neither a Neon recording"):
        open_source(str(broken))
    (broken / "gaze ps1.raw").write_bytes(b"")
    (broken / "gaze ps1.time").write_bytes(b"")
    with pytest.raises(SourceError, match="the recording has no gaze samples"):
        await open_source(str(broken)).open()


async def test_corrupt_video_is_named(broken: Path) -> None:
    (broken / SCENE_VIDEO).write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError, match="cannot load its scene"):
        await open_source(str(broken)).open()


async def test_multipart_recordings_are_joined(tmp_path: Path, neon_demo: Path) -> None:
    """A recording in two parts (ps1, ps2) reads as one, frames and timestamps in order."""
    rec = two_part_recording(tmp_path / "two-parts", neon_demo, 150)
    ts = np.fromfile(neon_demo / SCENE_TIME, "<i8")
    source = open_source(str(rec))
    await source.open()
    frames = [i async for i in source.stream() if isinstance(i, SceneFrame)]
    assert len(frames) == 292
    assert [f.timestamp_ns for f in frames] == ts.tolist()
    assert [read_frame_code(frames[i].bgr()) for i in (149, 150, 200)] == [149, 150, 200]
    await source.close()


async def test_realtime_pacing_takes_recording_time(neon_demo: Path) -> None:
    source = open_source(str(neon_demo), SourceSettings(pace="realtime"))
    await source.open()
    t0 = time.monotonic()
    first = last = None
    async for item in source.stream():
        first = first or item_time_ns(item)
        last = item_time_ns(item)
        if last - first >= 300_000_000:
            break
    elapsed_s = time.monotonic() - t0
    await source.close()
    assert elapsed_s >= 0.29  # released no faster than recorded


@pytest.fixture
def editable(tmp_path: Path, neon_demo: Path) -> Path:
    """A copy of the neon-demo recording, with its rendered scene video, to edit."""
    recording = copy_recording(tmp_path / "rec")
    shutil.copyfile(neon_demo / SCENE_VIDEO, recording / SCENE_VIDEO)
    return recording


def set_info(recording: Path, **fields: object) -> None:
    path = recording / "info.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("value", ["yesterday", 99999999999999999999, 1.5e18, -1, True])
async def test_bad_start_time_is_named(editable: Path, value: object) -> None:
    set_info(editable, start_time=value)
    with pytest.raises(SourceError) as caught:
        await open_source(str(editable)).open()
    assert str(caught.value) == (
        f"{editable / 'info.json'}: 'start_time' is {value!r}, expected integer nanoseconds "
        "from 0 to 9223372036854775807"
    )


async def test_start_time_hours_from_the_data_is_replaced(
    editable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A phone clock three hours off: ``ask --at`` would count from the wrong moment.
    wrong_start_ns = 1760676788219000000 + 3 * 3600 * 10**9
    set_info(editable, start_time=wrong_start_ns)
    info = await open_source(str(editable)).open()
    first_frame_ns = int(np.fromfile(editable / SCENE_TIME, "<i8")[0])
    first_ns = min(1760676790465965534, first_frame_ns)  # the first gaze sample or frame
    assert info.start_ns == first_ns
    assert caplog.messages == [
        f"{editable / 'info.json'}: 'start_time' is {(wrong_start_ns - first_ns) / 1e9:.1f} s "
        "after the first data timestamp; using the first data timestamp as the start"
    ]
