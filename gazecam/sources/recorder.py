"""Record any source to a Pupil Cloud export folder, which ``CloudExportSource`` replays.

The folder gets ``gaze.csv``, ``world_timestamps.csv``, ``events.csv``, ``fixations.csv`` (when
the source has fixations), ``scene_camera.json`` (when it has intrinsics), ``info.json`` and
the scene video ``scene.mp4``. A failing or cancelled recording finishes its files and keeps
what it had. A killed one (SIGKILL, out of memory) keeps everything up to its last flush, once a
second: rows reach the disk then, whole lines only; ``info.json`` is written at the start and
rewritten (atomically) at each flush with the duration so far; the video is written in
one-second fragments (see ``VideoWriter``), and a frame's row in ``world_timestamps.csv`` is
written only once its fragment is on disk, so every frame listed is in the video.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gazecam import __version__
from gazecam.capture.fixations import GazeAngles
from gazecam.errors import ConfigError, SourceError
from gazecam.records import Fixation, GazeSample, SceneFrame, SourceInfo, SourceItem
from gazecam.sources.base import Source, item_time_ns
from gazecam.sources.video import VideoWriter

if TYPE_CHECKING:
    from _csv import Writer as CsvWriter

VIDEO_NAME = "scene.mp4"
# The video's own frame rate only matters for playing it; the frame times are in
# world_timestamps.csv. Neon's scene camera runs at 30 Hz.
_VIDEO_FPS = 30.0
_FLUSH_INTERVAL_S = 1.0
# Rows are written to the operating system only at a flush, in one piece, so that a killed
# recording never leaves half a line: a second of 200 Hz gaze is about 30 KB.
_CSV_BUFFER_BYTES = 1 << 20

_ANGLE_COLUMNS = ["azimuth [deg]", "elevation [deg]"]
_IDS = ["section id", "recording id"]
_GAZE_HEADER = [*_IDS, "timestamp [ns]", "gaze x [px]", "gaze y [px]", "worn", "fixation id"]
_GAZE_HEADER += ["blink id", *_ANGLE_COLUMNS]
_FIXATIONS_HEADER = [*_IDS, "fixation id", "start timestamp [ns]", "end timestamp [ns]"]
_FIXATIONS_HEADER += ["duration [ms]", "fixation x [px]", "fixation y [px]", *_ANGLE_COLUMNS]


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """What a recording holds so far."""

    frames: int
    gaze_samples: int
    fixations: int
    events: int
    duration_ns: int


def _angles_deg(
    angles: GazeAngles, points_px: NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    """Azimuth (right +) and elevation (up +) of the rays through (N, 2) pixel points."""
    d = angles.directions(points_px[:, 0], points_px[:, 1])  # (N, 3), camera axes: x right, y down
    azimuth_deg = np.degrees(np.arctan2(d[:, 0], d[:, 2]))
    elevation_deg = -np.degrees(np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2])))
    return azimuth_deg.tolist(), elevation_deg.tolist()


class _ExportWriter:
    """The open files of one recording; ``close()`` finishes every one of them."""

    def __init__(self, out_dir: Path, info: SourceInfo) -> None:
        self._dir = out_dir
        self._info = info
        self._id = str(uuid.uuid4())
        # The source's intrinsics, else a pinhole of Neon's field of view.
        self._angles = GazeAngles(info.frame_width_px, info.frame_height_px, info.camera)
        self._pending_gaze: list[GazeSample] = []
        self._fixations: CsvWriter | None = None  # fixations.csv is opened at the first one
        self._files: list[IO[str]] = []
        self._counts = {"frames": 0, "gaze": 0, "fixations": 0, "events": 0}
        self._start_ns = info.start_ns
        self._last_ns: int | None = None
        self._flushed_at_s = time.monotonic()
        self._frames_pending: deque[int] = deque()  # timestamps of frames not yet on disk
        self._frames_listed = 0  # rows in world_timestamps.csv
        with ExitStack() as stack:
            # The callbacks and files close in reverse order: pending gaze rows, the video and
            # the rows of its last frames, the CSV files, and last info.json, which then
            # describes the finished files.
            stack.callback(self._write_info)
            self._gaze = self._open_csv(stack, "gaze.csv", _GAZE_HEADER)
            self._world = self._open_csv(stack, "world_timestamps.csv", [*_IDS, "timestamp [ns]"])
            self._events = self._open_csv(
                stack, "events.csv", ["recording id", "timestamp [ns]", "name", "type"]
            )
            self._video = VideoWriter(
                out_dir / VIDEO_NAME, info.frame_width_px, info.frame_height_px, _VIDEO_FPS
            )
            stack.callback(self._close_video)
            stack.callback(self._write_pending_gaze)
            if info.camera is not None:
                camera = {
                    "camera_matrix": [list(row) for row in info.camera.camera_matrix],
                    "distortion_coefficients": [list(info.camera.distortion)],
                }
                (out_dir / "scene_camera.json").write_text(json.dumps(camera, indent=2))
            self._write_info()
            self._stack = stack.pop_all()

    def _open_csv(self, stack: ExitStack, name: str, header: list[str]) -> CsvWriter:
        path = self._dir / name
        file = stack.enter_context(
            path.open("w", newline="", encoding="utf-8", buffering=_CSV_BUFFER_BYTES)
        )
        self._files.append(file)
        writer = csv.writer(file)
        writer.writerow(header)
        return writer

    def add(self, item: SourceItem) -> None:
        """Write one item (gaze rows wait for the next flush, which adds their angles)."""
        t_ns = item_time_ns(item)
        if self._start_ns is None:
            self._start_ns = t_ns
        end_ns = item.end_ns if isinstance(item, Fixation) else t_ns
        self._last_ns = end_ns if self._last_ns is None else max(self._last_ns, end_ns)
        if isinstance(item, GazeSample):
            self._pending_gaze.append(item)
            self._counts["gaze"] += 1
        elif isinstance(item, SceneFrame):
            self._add_frame(item)
        elif isinstance(item, Fixation):
            self._add_fixation(item)
        else:
            self._events.writerow([self._id, item.timestamp_ns, item.name, "recording"])
            self._counts["events"] += 1
        if time.monotonic() - self._flushed_at_s >= _FLUSH_INTERVAL_S:
            self.flush()

    def _add_frame(self, frame: SceneFrame) -> None:
        size_px = (self._info.frame_width_px, self._info.frame_height_px)
        if (frame.width_px, frame.height_px) != size_px:
            raise SourceError(
                f"{self._info.uri}: frame {frame.index} is {frame.width_px}x{frame.height_px} px, "
                f"the source announced {size_px[0]}x{size_px[1]}"
            )
        self._video.write(frame.bgr())
        self._frames_pending.append(frame.timestamp_ns)
        self._write_frames_on_disk()
        self._counts["frames"] += 1

    def _close_video(self) -> None:
        try:
            self._video.close()
        finally:
            self._write_frames_on_disk()

    def _write_frames_on_disk(self) -> None:
        # A frame's timestamp is written only once the frame is on disk, so that every frame
        # world_timestamps.csv lists is in the video, even if the process is killed.
        while self._frames_listed < self._video.frames_on_disk:
            self._world.writerow([self._id, self._id, self._frames_pending.popleft()])
            self._frames_listed += 1

    def _add_fixation(self, fixation: Fixation) -> None:
        if self._fixations is None:
            self._fixations = self._open_csv(self._stack, "fixations.csv", _FIXATIONS_HEADER)
        self._counts["fixations"] += 1
        point_px = np.array([[fixation.x_px, fixation.y_px]])
        (azimuth_deg,), (elevation_deg,) = _angles_deg(self._angles, point_px)
        duration_ms = (fixation.end_ns - fixation.start_ns) / 1e6
        self._fixations.writerow(
            [
                *(self._id, self._id, self._counts["fixations"]),
                *(fixation.start_ns, fixation.end_ns, duration_ms),
                *(fixation.x_px, fixation.y_px, azimuth_deg, elevation_deg),
            ]
        )

    def _write_pending_gaze(self) -> None:
        if not self._pending_gaze:
            return
        points_px = np.array([(g.x_px, g.y_px) for g in self._pending_gaze], dtype=np.float64)
        azimuth_deg, elevation_deg = _angles_deg(self._angles, points_px)
        self._gaze.writerows(
            [self._id, self._id, g.timestamp_ns, g.x_px, g.y_px, int(g.worn), "", "", az, el]
            for g, az, el in zip(self._pending_gaze, azimuth_deg, elevation_deg, strict=True)
        )
        self._pending_gaze.clear()

    def flush(self) -> None:
        """Put every row so far on the disk (frames: those whose video fragment is there)."""
        self._write_pending_gaze()
        for file in self._files:
            file.flush()
        self._write_info()
        self._flushed_at_s = time.monotonic()

    def summary(self) -> RecordSummary:
        """The counts and the duration so far."""
        duration_ns = 0
        if self._start_ns is not None and self._last_ns is not None:
            duration_ns = max(0, self._last_ns - self._start_ns)
        c = self._counts
        return RecordSummary(c["frames"], c["gaze"], c["fixations"], c["events"], duration_ns)

    def _write_info(self) -> None:
        info = {
            "recording_id": self._id,
            "start_time": self._start_ns,
            "duration": self.summary().duration_ns,
            "frame_width_px": self._info.frame_width_px,
            "frame_height_px": self._info.frame_height_px,
            "source_uri": self._info.uri,
            "gazecam_version": __version__,
        }
        # Written aside and renamed, so info.json is never half a file.
        partial = self._dir / "info.json.partial"
        partial.write_text(json.dumps(info, indent=2))
        os.replace(partial, self._dir / "info.json")

    def close(self) -> None:
        """Write what is pending, close the files and the video, then write info.json."""
        self._stack.close()


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that holds anything: a recording is never overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: not empty; record into a new or empty folder")


def _create_out_dir(out_dir: Path) -> None:
    check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out_dir}: cannot create the folder ({exc})") from exc


async def record(
    source: Source,
    out_dir: Path,
    on_progress: Callable[[RecordSummary], None] | None = None,
) -> RecordSummary:
    """Open ``source``, write everything it yields to ``out_dir`` as a Pupil Cloud export, close it.

    ``out_dir`` must not exist or be empty; it is created once the source has opened (a
    recording that never began leaves no folder). When the stream fails or the task is
    cancelled, the files are finished first (so they hold everything up to then) and the
    exception then propagates. ``on_progress`` is called after every scene frame, and once
    more with the final summary when the files are finished (also after a failure).
    """
    check_out_dir(out_dir)  # before opening the source, which may take a while
    try:
        info = await source.open()
        _create_out_dir(out_dir)
        writer = _ExportWriter(out_dir, info)
        try:
            async for item in source.stream():
                writer.add(item)
                if on_progress is not None and isinstance(item, SceneFrame):
                    on_progress(writer.summary())
        finally:
            writer.close()
            if on_progress is not None:
                on_progress(writer.summary())
    finally:
        await source.close()
    return writer.summary()
