"""Typed, immutable records that flow between the capture stages.

Every time field carries its unit in its name: ``*_ns`` is nanoseconds since the Unix epoch
on the clock of the machine that runs gazecam (live sources convert the glasses' clock with a
``ClockOffset``), ``*_px`` is scene-camera pixels with the origin at the top-left corner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

BGRImage = NDArray[np.uint8]  # (H, W, 3), BGR, uint8
I420Image = NDArray[np.uint8]  # (H * 3 / 2, W): the Y plane, then U and V at half resolution
CropMode = Literal["gaze", "center", "full"]
SourceKind = Literal["neon-recording", "cloud-export", "neon-live", "synthetic"]


@dataclass(frozen=True, slots=True)
class GazeSample:
    """One gaze point in scene-camera pixels."""

    timestamp_ns: int
    x_px: float
    y_px: float
    worn: bool


@dataclass(frozen=True, slots=True)
class GazeArrays:
    """Many gaze samples (a recording's), as arrays of shape (N,) sorted by time."""

    timestamp_ns: NDArray[np.int64]
    x_px: NDArray[np.float64]
    y_px: NDArray[np.float64]
    worn: NDArray[np.bool_]

    def rate_hz(self) -> float | None:
        """The sampling rate, from the median interval; None with fewer than two samples."""
        intervals_ns = np.diff(self.timestamp_ns)
        intervals_ns = intervals_ns[intervals_ns > 0]
        return 1e9 / float(np.median(intervals_ns)) if intervals_ns.size else None

    def samples(self) -> Iterator[GazeSample]:
        """The samples one by one, converted in chunks so an hour of gaze is not one big list."""
        chunk_samples = 4096
        for begin in range(0, self.timestamp_ns.size, chunk_samples):
            chunk = slice(begin, begin + chunk_samples)
            for t_ns, x_px, y_px, worn in zip(
                self.timestamp_ns[chunk].tolist(),
                self.x_px[chunk].tolist(),
                self.y_px[chunk].tolist(),
                self.worn[chunk].tolist(),
                strict=True,
            ):
                yield GazeSample(t_ns, x_px, y_px, worn)


@dataclass(frozen=True, slots=True)
class SceneFrame:
    """One scene-camera frame; its pixels are decoded or converted only when asked for.

    Decoding a 1600×1200 frame to BGR costs milliseconds, and most frames are never cropped,
    so a source hands over a ``decode`` callable instead of the pixels. It works while the
    source is open. A source whose decoder yields I420 (H.264 video) also hands over
    ``decode_i420``: the Neon simulator re-encodes that as it is, where the round trip through
    BGR cost twice the decoding itself.
    """

    timestamp_ns: int
    index: int
    width_px: int
    height_px: int
    decode: Callable[[], BGRImage] = field(repr=False, compare=False)
    decode_i420: Callable[[], I420Image] | None = field(default=None, repr=False, compare=False)

    def bgr(self) -> BGRImage:
        """The frame's pixels, (height_px, width_px, 3) BGR uint8."""
        return self.decode()


@dataclass(frozen=True, slots=True)
class Fixation:
    """A fixation from the recording's or the device's own fixation detector."""

    start_ns: int
    end_ns: int
    x_px: float
    y_px: float


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """A named event (Neon event annotation, or one sent by a client such as ``step.next``)."""

    timestamp_ns: int
    name: str


SourceItem = GazeSample | SceneFrame | Fixation | SourceEvent


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """Offset of a device clock from the local clock, with the spread of its measurements.

    ``offset_ns`` = device time - local time, so local time = device time - offset_ns.
    """

    offset_ns: int
    spread_ns: int
    samples: int

    def to_local_ns(self, device_ns: int) -> int:
        """Convert a device timestamp to the local clock."""
        return device_ns - self.offset_ns


@dataclass(frozen=True, slots=True)
class CameraIntrinsics:
    """Scene camera model: 3×3 camera matrix (row-major) and OpenCV distortion coefficients."""

    camera_matrix: tuple[tuple[float, float, float], ...]
    distortion: tuple[float, ...]

    @classmethod
    def from_raw(
        cls, camera_matrix: NDArray[np.float64], distortion: NDArray[np.float64]
    ) -> CameraIntrinsics:
        """Build from numpy arrays as the Neon calibration or the realtime API gives them."""
        m = np.asarray(camera_matrix, dtype=np.float64).reshape(3, 3)
        rows = tuple((float(r[0]), float(r[1]), float(r[2])) for r in m)
        return cls(rows, tuple(float(d) for d in np.asarray(distortion).ravel()))


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source knows before its first item: geometry, timing and what it carries."""

    uri: str
    kind: SourceKind
    frame_width_px: int
    frame_height_px: int
    camera: CameraIntrinsics | None = None
    gaze_rate_hz: float | None = None
    frame_count: int | None = None  # None for live sources
    start_ns: int | None = None
    duration_ns: int | None = None
    has_fixations: bool = False  # the source yields its own Fixation items
    clock_offset: ClockOffset | None = None  # live sources: glasses clock vs local clock


@dataclass(frozen=True, slots=True)
class Box:
    """A pixel box in frame coordinates, half-open: columns x0..x1-1, rows y0..y1-1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width_px(self) -> int:
        """Width of the box."""
        return self.x1 - self.x0

    @property
    def height_px(self) -> int:
        """Height of the box."""
        return self.y1 - self.y0

    def as_list(self) -> list[int]:
        """``[x0, y0, x1, y1]`` as written to JSON."""
        return [self.x0, self.y0, self.x1, self.y1]


# "off_frame": gaze matched, but so far outside the frame that it is no crop centre.
GazeStatus = Literal["ok", "no_gaze", "not_worn", "off_frame"]


@dataclass(frozen=True, slots=True)
class MatchedFrame:
    """A scene frame with the gaze matched to its timestamp and its fixation state.

    ``gaze_x_px``/``gaze_y_px`` are None unless ``status`` is "ok": a frame with no gaze in
    tolerance, taken while the glasses were off, or whose gaze lies off the frame never gets a
    stale or made-up gaze point.
    """

    frame: SceneFrame
    status: GazeStatus
    gaze_timestamp_ns: int | None
    gaze_x_px: float | None
    gaze_y_px: float | None
    fixation_id: int | None  # None: saccade, no gaze, or not worn


@dataclass(frozen=True, slots=True)
class Crop:
    """A keyframe's crop: the pixels of ``box`` in the frame, and where they came from."""

    matched: MatchedFrame
    mode: CropMode
    box: Box
    pixels: BGRImage = field(repr=False, compare=False)  # (box.height_px, box.width_px, 3)
    thumbnail: BGRImage | None = field(default=None, repr=False, compare=False)


RegionKind = Literal["text", "object"]


@dataclass(frozen=True, slots=True)
class Region:
    """Something perception found in a keyframe's crop: a line of text or a detected object.

    ``box`` is in frame pixels (the crop's offset added back); ``gaze_distance_px`` is the
    distance from the gaze point to the box (0 when the gaze is inside it).
    """

    kind: RegionKind
    label: str  # the text read, or the object class name
    confidence: float  # 0..1
    box: Box
    gaze_distance_px: float
    frame_timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Percept:
    """What perception made of one keyframe's crop: its regions and the crop's image feature.

    ``regions`` are sorted by distance from the gaze point (nearest first). ``feature`` is the
    vision encoder's pooled feature of the whole crop (EfficientNet-Lite0, 1280 values,
    L2-normalised, so the dot product of two features is their cosine similarity); None when
    the classifier is turned off.
    """

    regions: tuple[Region, ...]
    feature: NDArray[np.float32] | None = field(repr=False, compare=False)
