"""record(): a source written as a Cloud export and read back, also after failures and Ctrl-C."""

from __future__ import annotations

import asyncio
import csv
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

import gazecam
import gazecam.sources.recorder
from gazecam.errors import ConfigError, DeviceUnreachableError, SourceError
from gazecam.records import Fixation, GazeSample, SceneFrame, SourceEvent, SourceInfo, SourceItem
from gazecam.sources.base import SourceStats
from gazecam.sources.cloud_export import CloudExportSource
from gazecam.sources.recorder import RecordSummary, record
from gazecam.sources.video import decode_frames
from tests.sources.test_cloud_export import (
    CAMERA_MATRIX,
    EVENTS,
    HEIGHT_PX,
    START_NS,
    WIDTH_PX,
    fast,
    frame_code,
    frame_image,
    of_type,
    read_all,
    write_export,
)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def expected_angles_deg(
    x_px: float, y_px: float, f_px: tuple[float, float], c_px: tuple[float, float]
) -> tuple[float, float]:
    """Azimuth (right +) and elevation (up +) of a pixel in an undistorted pinhole camera."""
    x = (x_px - c_px[0]) / f_px[0]
    y = (y_px - c_px[1]) / f_px[1]
    return math.degrees(math.atan(x)), -math.degrees(math.atan2(y, math.hypot(x, 1.0)))


async def test_round_trip(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", fixations_csv=True)
    original_info, original, original_pixels = await read_all(
        CloudExportSource(export.folder, fast())
    )
    out = tmp_path / "recorded"
    progress: list[RecordSummary] = []
    summary = await record(CloudExportSource(export.folder, fast()), out, progress.append)

    last_ns = max(export.frame_ns[-1], export.gaze_ns[-1], START_NS + 600_000_000)
    assert summary == RecordSummary(
        frames=20,
        gaze_samples=len(export.gaze_ns),
        fixations=2,
        events=len(EVENTS),
        duration_ns=last_ns - START_NS,
    )
    assert [p.frames for p in progress] == [*range(1, 21), 20]  # the last: the final summary
    assert progress[-1] == summary

    info, items, pixels = await read_all(CloudExportSource(out, fast()))
    assert info == SourceInfo(
        uri=str(out),
        kind="cloud-export",
        frame_width_px=WIDTH_PX,
        frame_height_px=HEIGHT_PX,
        camera=original_info.camera,
        gaze_rate_hz=original_info.gaze_rate_hz,
        frame_count=20,
        start_ns=START_NS,
        duration_ns=summary.duration_ns,
        has_fixations=True,
    )
    for kind in (GazeSample, Fixation, SourceEvent):
        assert of_type(items, kind) == of_type(original, kind)
    frames = of_type(items, SceneFrame)
    assert [f.timestamp_ns for f in frames] == export.frame_ns
    for i, (copy, source) in enumerate(zip(pixels, original_pixels, strict=True)):
        diff = np.abs(copy.astype(np.int16) - source.astype(np.int16)).mean()
        assert diff < 3, f"frame {i} differs by {diff}"
        assert frame_code(copy) == i

    meta = json.loads((out / "info.json").read_text())
    gaze_rows = read_rows(out / "gaze.csv")
    assert {row["section id"] for row in gaze_rows} == {meta["recording_id"]}
    assert {row["recording id"] for row in gaze_rows} == {meta["recording_id"]}
    assert {row["fixation id"] + row["blink id"] for row in gaze_rows} == {""}
    assert meta["gazecam_version"] == gazecam.__version__
    assert meta["source_uri"] == str(export.folder)
    assert (meta["frame_width_px"], meta["frame_height_px"]) == (WIDTH_PX, HEIGHT_PX)
    camera = json.loads((out / "scene_camera.json").read_text())
    assert camera["camera_matrix"] == CAMERA_MATRIX
    for row in gaze_rows:  # the test camera has no distortion: plain pinhole angles
        az, el = expected_angles_deg(
            float(row["gaze x [px]"]), float(row["gaze y [px]"]), (200.0, 200.0), (160.0, 120.0)
        )
        assert float(row["azimuth [deg]"]) == pytest.approx(az, abs=1e-6)
        assert float(row["elevation [deg]"]) == pytest.approx(el, abs=1e-6)


async def test_angles_from_neon_field_of_view_without_intrinsics(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=3, camera_json=False)
    out = tmp_path / "recorded"
    await record(CloudExportSource(export.folder, fast()), out)
    assert not (out / "scene_camera.json").exists()
    f_px = (160 / math.tan(math.radians(103 / 2)), 120 / math.tan(math.radians(77 / 2)))
    # The frame's edges are at half the field of view.
    assert expected_angles_deg(WIDTH_PX, 120, f_px, (160, 120)) == pytest.approx((51.5, 0))
    assert expected_angles_deg(160, 0, f_px, (160, 120)) == pytest.approx((0, 38.5))
    rows = read_rows(out / "gaze.csv")
    assert len(rows) == len(export.gaze_ns)
    for row in rows:
        az, el = expected_angles_deg(
            float(row["gaze x [px]"]), float(row["gaze y [px]"]), f_px, (160.0, 120.0)
        )
        assert float(row["azimuth [deg]"]) == pytest.approx(az, abs=1e-6)
        assert float(row["elevation [deg]"]) == pytest.approx(el, abs=1e-6)


async def test_what_is_on_disk_while_recording_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every frame, the folder as it is on disk is a consistent recording: each frame that
    world_timestamps.csv lists is in the video, every gaze row is there, info.json is current."""
    monkeypatch.setattr(gazecam.sources.recorder, "_FLUSH_INTERVAL_S", 0.0)
    export = write_export(tmp_path / "export", frames=70)
    out = tmp_path / "recorded"
    listed_during: list[int] = []

    def check(summary: RecordSummary) -> None:
        listed = len(read_rows(out / "world_timestamps.csv"))
        assert listed == sum(1 for _ in decode_frames(out / "scene.mp4")) <= summary.frames
        assert len(read_rows(out / "gaze.csv")) == summary.gaze_samples
        info = json.loads((out / "info.json").read_text())
        assert (info["start_time"], info["duration"]) == (START_NS, summary.duration_ns)
        listed_during.append(listed)

    await record(CloudExportSource(export.folder, fast()), out, check)
    assert len(listed_during) == 71  # after each frame, and once finished
    # Frames are listed a fragment (up to a second, to the next keyframe) at a time.
    assert listed_during == sorted(listed_during) and 0 < listed_during[-2] < 70
    assert listed_during[-1] == 70


@pytest.mark.parametrize("make_out", ["file inside", "is a file"])
async def test_refuses_existing_content(tmp_path: Path, make_out: str) -> None:
    export = write_export(tmp_path / "export", frames=2)
    out = tmp_path / "recorded"
    if make_out == "file inside":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    with pytest.raises(ConfigError, match="recorded"):
        await record(CloudExportSource(export.folder, fast()), out)
    kept = out / "notes.txt" if make_out == "file inside" else out
    assert kept.read_text() == "keep me"
    assert not out.is_dir() or [p.name for p in out.iterdir()] == ["notes.txt"]


async def test_empty_existing_out_dir_is_used(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=2)
    out = tmp_path / "recorded"
    out.mkdir()
    assert (await record(CloudExportSource(export.folder, fast()), out)).frames == 2


async def test_a_cut_short_source_is_recorded_up_to_its_last_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    export = write_export(tmp_path / "export", frames=20, video_frames=12)
    out = tmp_path / "recorded"
    summary = await record(CloudExportSource(export.folder, fast()), out)
    assert "the last 8 frames (0.27 s) do not decode" in caplog.text

    info, items, pixels = await read_all(CloudExportSource(out, fast()))
    assert info.frame_count == summary.frames == 12
    assert [f.timestamp_ns for f in of_type(items, SceneFrame)] == export.frame_ns[:12]
    assert [frame_code(p) for p in pixels] == list(range(12))
    gaze_ns = [g.timestamp_ns for g in of_type(items, GazeSample)]
    # Nothing after the last good frame: the source ends where its video does.
    assert gaze_ns == [t for t in export.gaze_ns if t < export.frame_ns[12]]
    assert info.duration_ns is not None and info.duration_ns >= export.frame_ns[11] - START_NS


async def test_cancelled_recording_is_readable(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=20)
    out = tmp_path / "recorded"
    progress: list[RecordSummary] = []

    def cancel_at_five(summary: RecordSummary) -> None:
        progress.append(summary)
        if summary.frames == 5:
            task.cancel()  # what Ctrl-C does to asyncio.run's main task

    task = asyncio.create_task(
        record(CloudExportSource(export.folder, fast()), out, cancel_at_five)
    )
    with pytest.raises(asyncio.CancelledError):
        await task

    recorded_frames = progress[-1].frames
    assert 5 <= recorded_frames < 20
    info, items, _ = await read_all(CloudExportSource(out, fast()))
    assert info.frame_count == recorded_frames
    assert [f.timestamp_ns for f in of_type(items, SceneFrame)] == export.frame_ns[:recorded_frames]
    gaze_ns = [g.timestamp_ns for g in of_type(items, GazeSample)]
    assert gaze_ns == export.gaze_ns[: len(gaze_ns)]
    assert len(gaze_ns) >= progress[-1].gaze_samples
    assert json.loads((out / "info.json").read_text())["duration"] == info.duration_ns


class FailingSource:
    """Yields the given items, then raises: a live device that drops off mid-recording."""

    def __init__(self, items: list[SourceItem], error: Exception) -> None:
        self.uri = "neon://test"
        self.stats = SourceStats()
        self.closed = 0
        self._items = items
        self._error = error

    async def open(self) -> SourceInfo:
        return SourceInfo(self.uri, "neon-live", WIDTH_PX, HEIGHT_PX)

    async def _stream(self) -> AsyncIterator[SourceItem]:
        for item in self._items:
            yield item
        raise self._error

    def stream(self) -> AsyncIterator[SourceItem]:
        return self._stream()

    async def close(self) -> None:
        self.closed += 1


def _frame(index: int, t_ns: int, width_px: int = WIDTH_PX) -> SceneFrame:
    image: Callable[[], np.ndarray] = lambda: frame_image(index)[:, :width_px]  # noqa: E731
    return SceneFrame(t_ns, index, width_px, HEIGHT_PX, decode=image)


async def test_device_lost_mid_stream(tmp_path: Path) -> None:
    items: list[SourceItem] = [
        GazeSample(START_NS, 10.0, 20.0, True),
        _frame(0, START_NS + 1_000_000),
        SourceEvent(START_NS + 2_000_000, "step.next"),
        GazeSample(START_NS + 5_000_000, 11.0, 21.0, False),
        _frame(1, START_NS + 34_000_000),
    ]
    source = FailingSource(items, DeviceUnreachableError("neon://test: connection lost"))
    out = tmp_path / "recorded"
    with pytest.raises(DeviceUnreachableError, match="connection lost"):
        await record(source, out)
    assert source.closed == 1

    info, recorded, _ = await read_all(CloudExportSource(out, fast()))
    assert (info.frame_count, info.start_ns, info.duration_ns) == (2, START_NS, 34_000_000)
    assert [i for i in recorded if not isinstance(i, SceneFrame)] == [
        i for i in items if not isinstance(i, SceneFrame)
    ]
    assert not (out / "fixations.csv").exists()


async def test_frame_of_the_wrong_size_is_an_error(tmp_path: Path) -> None:
    source = FailingSource([_frame(0, START_NS, width_px=300)], AssertionError("not reached"))
    with pytest.raises(SourceError, match="frame 0 is 300x240 px, the source announced 320x240"):
        await record(source, tmp_path / "recorded")
    assert source.closed == 1
