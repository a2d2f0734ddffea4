"""Fixations: the source's own detector where it has one, else an I-VT velocity-threshold filter.

Gaze velocity is measured in degrees of visual angle, so pixels are first turned into viewing
directions: through the scene camera's intrinsics (with lens distortion) where the source has
them, else through a pinhole model of Neon's 103°×77° field of view over 1600×1200.

Both trackers answer the same question for the capture pipeline: which fixation, if any, was
the wearer in at time t? The I-VT answer is causal, so live and replayed sessions agree: a
fixation counts at time t only once it has lasted ``ivt_min_fixation_ms`` by t.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.records import CameraIntrinsics, Fixation, GazeSample
from gazecam.settings import CaptureSettings

NEON_FOV_DEG = (103.0, 77.0)  # horizontal, vertical field of view of the Neon scene camera


class GazeAngles:
    """Turns scene-camera pixels into unit viewing directions."""

    def __init__(self, width_px: int, height_px: int, camera: CameraIntrinsics | None) -> None:
        if camera is not None:
            self._matrix = np.array(camera.camera_matrix, dtype=np.float64)
            self._distortion = np.array(camera.distortion, dtype=np.float64)
        else:
            fx = (width_px / 2) / math.tan(math.radians(NEON_FOV_DEG[0] / 2))
            fy = (height_px / 2) / math.tan(math.radians(NEON_FOV_DEG[1] / 2))
            self._matrix = np.array([[fx, 0, width_px / 2], [0, fy, height_px / 2], [0, 0, 1]])
            self._distortion = np.zeros(5)

    def directions(
        self, x_px: NDArray[np.float64], y_px: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """Unit direction vectors, shape (N, 3), for pixel coordinates of shape (N,)."""
        points = np.stack([x_px, y_px], axis=-1).reshape(-1, 1, 2).astype(np.float64)
        normalized = cv2.undistortPoints(points, self._matrix, self._distortion).reshape(-1, 2)
        rays = np.concatenate([normalized, np.ones((normalized.shape[0], 1))], axis=1)
        result: NDArray[np.float64] = rays / np.linalg.norm(rays, axis=1, keepdims=True)
        return result


def angle_deg(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Angle between unit vectors, row by row, shape (N, 3) → (N,)."""
    cos = np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)
    degrees: NDArray[np.float64] = np.degrees(np.arccos(cos))
    return degrees


@dataclass(slots=True)
class _Run:
    """A fixation (or a candidate one) being tracked."""

    fixation_id: int
    start_ns: int
    end_ns: int


class FixationTracker:
    """Which fixation the wearer is in, fed with gaze samples or with the source's fixations.

    Mode 'source' records the Fixation items a source yields. Mode 'ivt' classifies each gaze
    sample: it is fixating when its angular velocity over the last ``ivt_window_ms`` is below
    ``ivt_threshold_deg_s``; consecutive fixating samples (worn, no gap longer than the window)
    form a run, and a run is a fixation from ``ivt_min_fixation_ms`` after its start on.
    Fixation ids are unique and increase with onset (a run too short to count still uses one).
    Only the recent runs are kept.
    """

    def __init__(
        self,
        mode: str,
        settings: CaptureSettings,
        angles: GazeAngles,
        history: int = 256,
    ) -> None:
        if mode not in ("source", "ivt"):
            raise ValueError(f"unknown fixation tracker mode {mode!r}")
        self.mode = mode
        self._angles = angles
        self._threshold_deg_s = settings.ivt_threshold_deg_s
        self._window_ns = int(settings.ivt_window_ms * 1e6)
        self._min_ns = int(settings.ivt_min_fixation_ms * 1e6) if mode == "ivt" else 0
        self._runs: deque[_Run] = deque(maxlen=history)
        self._next_id = 1
        # I-VT state: recent (timestamp, direction) of worn samples, and the open run.
        self._recent: deque[tuple[int, NDArray[np.float64]]] = deque()
        self._open: _Run | None = None
        self._open_points: list[tuple[float, float]] = []
        self.completed: deque[Fixation] = deque(maxlen=history)  # I-VT fixations that ended

    def push_fixation(self, fixation: Fixation) -> None:
        """Record a fixation the source detected (mode 'source')."""
        self._runs.append(_Run(self._next_id, fixation.start_ns, fixation.end_ns))
        self._next_id += 1

    def push_gaze(self, sample: GazeSample) -> None:
        """Classify one gaze sample (mode 'ivt'); samples must come in time order."""
        if self.mode != "ivt":
            return
        t = sample.timestamp_ns
        if not sample.worn or (self._recent and t - self._recent[-1][0] > self._window_ns):
            self._close_run()
            self._recent.clear()
            if not sample.worn:
                return
        direction = self._angles.directions(np.array([sample.x_px]), np.array([sample.y_px]))[0]
        self._recent.append((t, direction))
        while len(self._recent) > 2 and t - self._recent[1][0] >= self._window_ns:
            self._recent.popleft()
        t0, d0 = self._recent[0]
        if t - t0 < self._window_ns // 2:
            return  # too short a span for a velocity that is not mostly noise
        velocity_deg_s = float(angle_deg(d0[None], direction[None])[0]) / ((t - t0) / 1e9)
        if velocity_deg_s < self._threshold_deg_s:
            if self._open is None:
                self._open = _Run(self._next_id, t0, t)
                self._next_id += 1
                self._runs.append(self._open)
                self._open_points = []
            self._open.end_ns = t
            self._open_points.append((sample.x_px, sample.y_px))
        else:
            self._close_run()

    def fixation_at(self, t_ns: int) -> int | None:
        """Id of the fixation the wearer was in at ``t_ns``, or None (saccade, unknown)."""
        for run in reversed(self._runs):
            if run.start_ns <= t_ns <= run.end_ns:
                return run.fixation_id if t_ns - run.start_ns >= self._min_ns else None
            if run.end_ns < t_ns:
                return None
        return None

    def _close_run(self) -> None:
        run, self._open = self._open, None
        if run is None:
            return
        if run.end_ns - run.start_ns < self._min_ns:
            return  # too short to be a fixation: fixation_at() never reported it
        x, y = np.mean(np.array(self._open_points), axis=0)
        self.completed.append(Fixation(run.start_ns, run.end_ns, float(x), float(y)))
