"""Pupil Cloud "Timeseries Data + Scene Video" export folders as a source.

An export holds ``gaze.csv``, ``world_timestamps.csv`` (one row per scene frame, in video
order) and one scene ``.mp4`` whose name varies; ``events.csv``, ``fixations.csv``,
``info.json`` and ``scene_camera.json`` are used where present. Everything is parsed and
checked in ``open()``; ``stream()`` then builds the records lazily from numpy arrays, so a long
recording never exists as millions of Python objects at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gazecam.errors import SourceError
from gazecam.records import (
    CameraIntrinsics,
    Fixation,
    GazeArrays,
    SceneFrame,
    SourceEvent,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import SourceSettings
from gazecam.sources.base import (
    SourceStats,
    item_time_ns,
    merge_by_time,
    recording_span,
    replay,
)
from gazecam.sources.csv_table import (
    Col,
    parse_finite,
    parse_fixation_id,
    parse_timestamp,
    parse_worn,
    read_csv,
)
from gazecam.sources.video import decode_frames, lazy_pixels, probe_video

log = logging.getLogger(__name__)

TIMESTAMP_COL = "timestamp [ns]"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read the JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _read_camera(path: Path) -> CameraIntrinsics:
    data = _read_json(path)
    try:
        matrix = np.asarray(data["camera_matrix"], dtype=np.float64)
        distortion = np.asarray(data["distortion_coefficients"], dtype=np.float64).ravel()
    except KeyError as exc:
        raise SourceError(f"{path}: missing key {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{path}: camera parameters are not numbers ({exc})") from exc
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise SourceError(f"{path}: 'camera_matrix' must be 3 by 3 numbers, got {matrix.shape}")
    if distortion.size not in (4, 5, 8, 12, 14) or not np.isfinite(distortion).all():
        raise SourceError(
            f"{path}: 'distortion_coefficients' must be 4, 5, 8, 12 or 14 numbers, "
            f"got {distortion.size}"
        )
    return CameraIntrinsics.from_raw(matrix, distortion)


def _read_gaze(path: Path) -> tuple[GazeArrays, NDArray[np.int64] | None]:
    """gaze.csv as arrays, and its fixation ids (-1: not in a fixation; None: no such column)."""
    cols = [
        Col(TIMESTAMP_COL, parse_timestamp, "q"),
        Col("gaze x [px]", parse_finite, "d"),
        Col("gaze y [px]", parse_finite, "d"),
        Col("worn", parse_worn, "b"),
        Col("fixation id", parse_fixation_id, "q", required=False),
    ]
    table = read_csv(path, cols, ordered_by=TIMESTAMP_COL)
    if not table[TIMESTAMP_COL].size:
        raise SourceError(f"{path}: no gaze samples")
    x_px, y_px, worn = table["gaze x [px]"], table["gaze y [px]"], table["worn"].astype(np.bool_)
    return GazeArrays(table[TIMESTAMP_COL], x_px, y_px, worn), table.get("fixation id")


def _fixations_from_gaze(gaze: GazeArrays, ids: NDArray[np.int64] | None) -> list[Fixation]:
    """One fixation per run of equal fixation ids: first to last sample, mean position."""
    if ids is None:
        return []
    change = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [ids.size]))  # exclusive
    keep = ids[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    cum_x = np.concatenate(([0.0], np.cumsum(gaze.x_px)))
    cum_y = np.concatenate(([0.0], np.cumsum(gaze.y_px)))
    counts = ends - starts
    mean_x = (cum_x[ends] - cum_x[starts]) / counts
    mean_y = (cum_y[ends] - cum_y[starts]) / counts
    t = gaze.timestamp_ns
    return [
        Fixation(int(t[s]), int(t[e - 1]), float(x), float(y))
        for s, e, x, y in zip(starts, ends, mean_x, mean_y, strict=True)
    ]


def _read_fixations(path: Path) -> list[Fixation]:
    cols = [
        Col("start timestamp [ns]", parse_timestamp, "q"),
        Col("end timestamp [ns]", parse_timestamp, "q"),
        Col("fixation x [px]", parse_finite, "d"),
        Col("fixation y [px]", parse_finite, "d"),
    ]
    table = read_csv(path, cols)
    rows = zip(*(table[c.name].tolist() for c in cols), strict=True)
    fixations = [Fixation(*row) for row in rows]
    for n, fixation in enumerate(fixations, start=1):
        if fixation.end_ns < fixation.start_ns:
            raise SourceError(f"{path} data row {n}: the fixation ends before it starts")
    return sorted(fixations, key=lambda f: f.start_ns)


def _read_events(path: Path) -> list[SourceEvent]:
    table = read_csv(path, [Col(TIMESTAMP_COL, parse_timestamp, "q"), Col("name", str, "")])
    rows = zip(table[TIMESTAMP_COL].tolist(), table["name"], strict=True)
    events = [SourceEvent(t_ns, name) for t_ns, name in rows]
    return sorted(events, key=lambda e: e.timestamp_ns)


def find_video(folder: Path) -> Path:
    """The export's one scene video."""
    # Names starting with "." are macOS resource forks or editor droppings, not videos.
    videos = sorted(p for p in folder.glob("*.mp4") if not p.name.startswith("."))
    if len(videos) != 1:
        found = ", ".join(p.name for p in videos) or "none"
        raise SourceError(f"{folder}: expected exactly one scene .mp4, found {found}")
    return videos[0]


@dataclass(frozen=True, slots=True)
class _Export:
    """What ``open()`` parsed and checked; ``stream()`` turns it into records."""

    video: Path
    width_px: int
    height_px: int
    frame_ns: NDArray[np.int64]  # row i of world_timestamps.csv: frame i of the video
    video_frames: int | None  # as the container says; None where it does not
    gaze: GazeArrays
    fixations: list[Fixation]
    events: list[SourceEvent]


def _load(folder: Path) -> tuple[_Export, CameraIntrinsics | None, dict[str, Any]]:
    """Parse and check an export: the data, the camera model and info.json (or {})."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a folder")
    video = find_video(folder)
    gaze, fixation_ids = _read_gaze(folder / "gaze.csv")
    world_csv = folder / "world_timestamps.csv"
    frames = read_csv(
        world_csv, [Col(TIMESTAMP_COL, parse_timestamp, "q")], ordered_by=TIMESTAMP_COL
    )
    frame_ns = frames[TIMESTAMP_COL]
    width_px, height_px, video_frames = probe_video(video)
    fixations_csv = folder / "fixations.csv"
    fixations = (
        _read_fixations(fixations_csv)
        if fixations_csv.exists()
        else _fixations_from_gaze(gaze, fixation_ids)
    )
    events_csv = folder / "events.csv"
    events = _read_events(events_csv) if events_csv.exists() else []
    camera_json = folder / "scene_camera.json"
    camera = _read_camera(camera_json) if camera_json.exists() else None
    info_json = folder / "info.json"
    info = _read_json(info_json) if info_json.exists() else {}
    export = _Export(video, width_px, height_px, frame_ns, video_frames, gaze, fixations, events)
    return export, camera, info


class CloudExportSource:
    """A Pupil Cloud "Timeseries Data + Scene Video" export folder, replayed as a source.

    A recording cut off mid-write (killed, power lost) lists frames its video no longer holds,
    or holds frames it has no rows for: it replays up to its last good frame, with a warning
    saying how much is lost, and nothing after that frame.
    """

    def __init__(self, path: Path, settings: SourceSettings) -> None:
        self.uri = str(path)
        self.stats = SourceStats()
        self._path = path
        self._settings = settings
        self._export: _Export | None = None
        self._start_ns = 0
        self._end_ns: int | None = None  # items from here on are left out (the video ended)
        self._frame_items: Generator[SceneFrame, None, None] | None = None

    async def open(self) -> SourceInfo:
        """Parse and check every file of the export; raise SourceError naming what is wrong."""
        # An hour of gaze takes a second or two to parse: off the event loop, which may serve
        # other clients meanwhile.
        export, camera, info = await asyncio.to_thread(_load, self._path)
        gaze_ns, frame_ns = export.gaze.timestamp_ns, export.frame_ns
        ends_ns = np.concatenate((gaze_ns[:1], gaze_ns[-1:], frame_ns[:1], frame_ns[-1:]))
        start_ns, duration_ns = recording_span(
            info, str(self._path / "info.json"), int(ends_ns.min()), int(ends_ns.max())
        )
        self._start_ns = start_ns
        videos = export.video_frames
        if videos is not None and videos < frame_ns.size:
            self._end_video(export, videos, "")
            export = replace(export, frame_ns=frame_ns[:videos])
        elif videos is not None and videos > frame_ns.size:
            self._extra_frames(export)
        self._export = export
        return SourceInfo(
            uri=self.uri,
            kind="cloud-export",
            frame_width_px=export.width_px,
            frame_height_px=export.height_px,
            camera=camera,
            gaze_rate_hz=export.gaze.rate_hz(),
            frame_count=int(export.frame_ns.size),
            start_ns=start_ns,
            duration_ns=duration_ns,
            has_fixations=bool(export.fixations),
        )

    def stream(self) -> AsyncIterator[SourceItem]:
        """All items in timestamp order, paced as ``settings.pace`` says."""
        export = self._export
        if export is None:
            raise SourceError(f"{self.uri}: stream() called before open()")
        self._frame_items = self._frames(export)
        items = merge_by_time(
            export.gaze.samples(), self._frame_items, export.fixations, export.events
        )
        return replay(self._until_video_ends(items), self._settings.pace, self.stats)

    async def close(self) -> None:
        """Stop the video decoder, if one is running. Safe to call twice."""
        if self._frame_items is not None:
            # Closing the generator drops its decoder, whose own generator then closes the file.
            self._frame_items.close()
            self._frame_items = None

    def _until_video_ends(self, items: Iterator[SourceItem]) -> Iterator[SourceItem]:
        for item in items:
            if self._end_ns is not None and item_time_ns(item) >= self._end_ns:
                return
            yield item

    def _end_video(self, export: _Export, frames: int, reason: str) -> None:
        """The video holds only its first ``frames`` listed frames: warn, and end there."""
        frame_ns, video = export.frame_ns, export.video
        if frames == 0:
            raise SourceError(f"{video}: no frame of the video decodes{reason}")
        lost_s = (int(frame_ns[-1]) - int(frame_ns[frames - 1])) / 1e9
        up_to_s = (int(frame_ns[frames - 1]) - self._start_ns) / 1e9
        log.warning(
            "%s: the last %d frames (%.2f s) do not decode%s; replaying up to %.2f s",
            video,
            frame_ns.size - frames,
            lost_s,
            reason,
            up_to_s,
        )
        self._end_ns = int(frame_ns[frames])

    def _extra_frames(self, export: _Export) -> None:
        log.warning(
            "%s: more frames than the %d that world_timestamps.csv lists; the rest have no "
            "timestamps and are left out",
            export.video,
            export.frame_ns.size,
        )

    def _frames(self, export: _Export) -> Generator[SceneFrame, None, None]:
        """Frame i of the video with row i of world_timestamps.csv, up to the last good frame."""
        decoder = decode_frames(export.video)
        for index, t_ns in enumerate(export.frame_ns.tolist()):
            try:
                frame = next(decoder, None)
                reason = ""
            except SourceError as exc:  # damaged from here on: the frames before it replay
                frame, reason = None, f" ({str(exc).removeprefix(f'{export.video}: ')})"
            if frame is None:
                self._end_video(export, index, reason)
                return
            bgr, i420 = lazy_pixels(frame)
            yield SceneFrame(
                t_ns, index, export.width_px, export.height_px, decode=bgr, decode_i420=i420
            )
        if export.video_frames is None:  # else open() knew and said so
            try:
                more = next(decoder, None) is not None
            except SourceError:  # a damaged frame beyond the listed ones is one more all the same
                more = True
            if more:
                self._extra_frames(export)
