"""A Neon native recording folder, as the Neon Companion app writes it.

Read through Pupil Labs' ``pupil-labs-neon-recording``, which joins multi-part recordings
(``ps1…psN``) and decodes the scene video. Gaze, worn, fixations, events and the scene camera
calibration all come from the recording itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gazecam.errors import MissingDependencyError, SourceError
from gazecam.records import (
    BGRImage,
    CameraIntrinsics,
    Fixation,
    GazeArrays,
    I420Image,
    SceneFrame,
    SourceEvent,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import SourceSettings
from gazecam.sources.base import SourceStats, merge_by_time, recording_span, replay

log = logging.getLogger(__name__)

SCENE_BASENAME = "Neon Scene Camera v1"


def scene_parts(path: Path, suffix: str) -> list[Path]:
    """The scene camera's files of a recording with ``suffix`` ('.mp4', '.time'), part 1 first."""
    parts = path.glob(f"{SCENE_BASENAME} ps*{suffix}")
    return sorted(parts, key=lambda p: int(p.stem.rsplit("ps", 1)[1]))


def _check_sorted(ts: NDArray[np.int64], what: str) -> None:
    bad = np.flatnonzero(np.diff(ts) < 0)
    if bad.size:
        raise SourceError(f"{what}: timestamps out of order at index {int(bad[0]) + 1}")


class NeonRecordingSource:
    """Replays a Neon native recording folder."""

    def __init__(self, path: Path, settings: SourceSettings) -> None:
        self.uri = str(path)
        self.stats = SourceStats()
        self._path = path
        self._settings = settings
        self._recording: Any = None

    async def open(self) -> SourceInfo:
        """Load and check the recording's streams; raise SourceError naming what is wrong."""
        try:
            import pupil_labs.neon_recording as nr
        except ImportError as exc:
            raise MissingDependencyError(
                "pupil-labs-neon-recording", "neon", "Reading Neon recordings"
            ) from exc
        path = self._path
        try:
            rec = nr.open(path)
            info = rec.info
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path / 'info.json'}: cannot read ({exc})") from exc
        self._recording = rec

        gaze = self._stream(rec, "gaze", required=True)
        gaze_ts = np.asarray(gaze.time, dtype=np.int64)
        if gaze_ts.size == 0:
            raise SourceError(f"{path}: the recording has no gaze samples")
        gaze_file = "gaze_200hz.time" if (path / "gaze_200hz.time").exists() else "gaze ps1.time"
        _check_sorted(gaze_ts, str(path / gaze_file))
        xy = np.asarray(gaze.point, dtype=np.float64)  # (N, 2)
        self._gaze = GazeArrays(gaze_ts, xy[:, 0], xy[:, 1], self._worn_at(rec, gaze_ts))

        frame_ts = self._scene_timestamps()
        _check_sorted(frame_ts, f"{path / (SCENE_BASENAME + ' ps1.time')}")
        if not scene_parts(path, ".mp4"):
            raise SourceError(f"{path}: no scene video ('{SCENE_BASENAME} ps1.mp4' is missing)")
        scene = self._stream(rec, "scene", required=True)
        if len(scene) < frame_ts.size:
            raise SourceError(
                f"{path}: scene video has {len(scene)} frames but its timestamp files list "
                f"{frame_ts.size}"
            )
        self._scene = scene
        self._frame_ts = frame_ts

        fixations = self._stream(rec, "fixations", required=False)
        self._fixations: list[Fixation] = []
        if fixations is not None:
            data = fixations.data
            for start, stop, x, y in zip(
                data["start_time"].tolist(),
                data["stop_time"].tolist(),
                data["mean_gaze_x"].tolist(),
                data["mean_gaze_y"].tolist(),
                strict=True,
            ):
                self._fixations.append(Fixation(int(start), int(stop), float(x), float(y)))
        events = self._stream(rec, "events", required=False)
        self._events = (
            []
            if events is None
            else [
                SourceEvent(int(t), str(name))
                for t, name in zip(
                    events.data["time"].tolist(), events.data["event"].tolist(), strict=True
                )
            ]
        )

        ends_ns = np.concatenate((gaze_ts[:1], gaze_ts[-1:], frame_ts[:1], frame_ts[-1:]))
        start_ns, duration_ns = recording_span(
            info, str(path / "info.json"), int(ends_ns.min()), int(ends_ns.max())
        )

        camera = None
        if rec.calibration is not None:
            camera = CameraIntrinsics.from_raw(
                rec.calibration.scene_camera_matrix, rec.calibration.scene_distortion_coefficients
            )
        return SourceInfo(
            uri=self.uri,
            kind="neon-recording",
            frame_width_px=int(scene.width),
            frame_height_px=int(scene.height),
            camera=camera,
            gaze_rate_hz=self._gaze.rate_hz(),
            frame_count=int(frame_ts.size),
            start_ns=start_ns,
            duration_ns=duration_ns,
            has_fixations=bool(self._fixations),
        )

    def _stream(self, rec: Any, name: str, required: bool) -> Any:
        """One of the recording's streams; a missing optional one is None."""
        try:
            return getattr(rec, name)
        except Exception as exc:  # the library wraps every loading error in SensorError
            reason = exc.__cause__ or exc
            if required:
                raise SourceError(f"{self._path}: cannot load its {name} ({reason})") from exc
            log.info("%s: no %s stream (%s)", self._path, name, reason)
            return None

    def _worn_at(self, rec: Any, gaze_ts: NDArray[np.int64]) -> NDArray[np.bool_]:
        worn = self._stream(rec, "worn", required=False)
        if worn is None:
            log.warning("%s: no worn stream; assuming the glasses were worn", self._path)
            return np.ones(gaze_ts.size, dtype=np.bool_)
        worn_ts = np.asarray(worn.time, dtype=np.int64)
        values = np.asarray(worn.worn) > 0
        if worn_ts.size == gaze_ts.size and np.array_equal(worn_ts, gaze_ts):
            return values
        # Different clocks (realtime vs 200 Hz streams): take the latest worn state at each sample.
        idx = np.clip(np.searchsorted(worn_ts, gaze_ts, side="right") - 1, 0, None)
        result: NDArray[np.bool_] = values[idx]
        return result

    def _scene_timestamps(self) -> NDArray[np.int64]:
        parts = scene_parts(self._path, ".time")
        if not parts:
            raise SourceError(f"{self._path}: no scene timestamps ('{SCENE_BASENAME} ps1.time')")
        return np.concatenate([np.fromfile(p, dtype="<i8") for p in parts]).astype(np.int64)

    def _frames(self) -> Iterator[SceneFrame]:
        scene = self._scene
        w, h = int(scene.width), int(scene.height)
        for i, ts in enumerate(self._frame_ts.tolist()):
            yield SceneFrame(
                ts, i, w, h, decode=partial(self._decode, i), decode_i420=partial(self._i420, i)
            )

    def _decode(self, index: int) -> BGRImage:
        return np.asarray(self._scene[index].bgr, dtype=np.uint8)

    def _i420(self, index: int) -> I420Image:
        return np.asarray(self._scene[index].to_ndarray("yuv420p"), dtype=np.uint8)

    def stream(self) -> AsyncIterator[SourceItem]:
        """Gaze, frames, fixations (at their onset) and events, in time order."""
        return replay(
            merge_by_time(self._gaze.samples(), self._frames(), self._fixations, self._events),
            self._settings.pace,
            self.stats,
        )

    async def close(self) -> None:
        """Close the video decoders."""
        if self._recording is not None:
            self._recording.close()
            self._recording = None
