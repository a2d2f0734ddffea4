"""A synthetic source: a rendered workbench scene and a gaze track over it, for the demo and tests.

The scene is a textured canvas larger than the frame with labelled panels; the camera pans
slowly (head motion), and the gaze fixates panel targets in turn, with fixational jitter and
minimum-jerk saccades between them, at Neon's rates (scene 30 Hz, gaze 200 Hz). Everything is
generated from a fixed seed, so a scene and its ground-truth fixations are reproducible.
Each frame carries a 16-bit frame code (white/black blocks along the bottom edge) so that a test
can tell which frame it is looking at, even after video coding. (No text timecode: OCR would
read a new line of text in every frame, which no real scene has.)

``synthetic:demo-notext`` is the same scene (same canvas noise, same gaze track) with no label
on any panel: only the drawings tell the panels apart. ``demo_photo`` renders the reference
photo of a panel that the demo card's photo cues name (gazecam/data/demo_photos).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.errors import ConfigError
from gazecam.records import BGRImage, Fixation, GazeArrays, SceneFrame, SourceInfo, SourceItem
from gazecam.settings import SourceSettings
from gazecam.sources.base import SourceStats, merge_by_time, replay

FRAME_SIZE_PX = (1600, 1200)  # Neon scene camera
FRAME_RATE_HZ = 30.0
GAZE_RATE_HZ = 200.0
START_NS = 1_760_000_000_000_000_000  # a fixed epoch, so runs are reproducible
FRAME_CODE_BITS = 16
FRAME_CODE_BLOCK_PX = 24
_PAN_AMPLITUDE_PX = (120.0, 60.0)
_PAN_PERIOD_S = (17.0, 11.0)
_MARGIN_PX = 200  # canvas border beyond the frame, covers the pan

DEMO_PANELS = (
    "1 REMOVE COVER",
    "2 CHECK FUSE",
    "3 CONNECT CABLE",
    "4 SET DIAL TO 5",
    "5 PRESS RESET",
    "6 CLOSE COVER",
)
# The object drawn below each panel's label: the COCO class YOLOX-Nano finds in the 448 px crop
# around the panel's target (score >= 0.4; tests/perception/test_perception.py checks it).
DEMO_PANEL_OBJECTS = {
    "1 REMOVE COVER": "stop sign",
    "2 CHECK FUSE": "cup",
    "3 CONNECT CABLE": "laptop",
    "4 SET DIAL TO 5": "clock",
    "5 PRESS RESET": "keyboard",
    "6 CLOSE COVER": "teddy bear",
}
_INK = (20, 20, 20)
_OBJECT_BELOW_LABEL_PX = 86  # from a panel's target (its label) to the centre of its object
_AA = cv2.LINE_AA


@dataclass(frozen=True, slots=True)
class GazeTrack:
    """Gaze in frame pixels, and the fixations that made it (the ground truth)."""

    gaze: GazeArrays
    fixations: tuple[Fixation, ...]


# Flat drawings that YOLOX-Nano takes for COCO objects, each drawn below the label of the
# 400×300 panel whose top-left corner is (x, y). Sizes, proportions and places were found by
# trying: plainer or smaller drawings (a flat mug, a phone, a book) are not detected reliably.


def _draw_stop_sign(canvas: BGRImage, x: int, y: int) -> None:
    angles = np.pi / 8 + np.arange(8) * np.pi / 4
    for radius_px, color in ((60, (30, 30, 200)), (55, (255, 255, 255)), (51, (30, 30, 200))):
        corners = np.stack([200 + radius_px * np.cos(angles), 236 + radius_px * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [corners.astype(np.int32) + np.array([x, y])], color, _AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, "STOP", (x + 160, y + 248), font, 1.0, (255, 255, 255), 5, _AA)


def _draw_clock(canvas: BGRImage, x: int, y: int) -> None:
    cx, cy = x + 200, y + 236
    cv2.circle(canvas, (cx, cy), 60, (255, 255, 255), -1, _AA)
    cv2.circle(canvas, (cx, cy), 60, _INK, 4, _AA)
    for hour in range(12):
        dx, dy = math.sin(hour * math.pi / 6), -math.cos(hour * math.pi / 6)
        inner, outer = ((round(cx + r * dx), round(cy + r * dy)) for r in (48, 56))
        cv2.line(canvas, inner, outer, _INK, 2, _AA)
    cv2.line(canvas, (cx, cy), (cx, cy - 39), _INK, 4, _AA)  # minute hand at 12
    cv2.line(canvas, (cx, cy), (cx + 15, cy + 26), _INK, 4, _AA)  # hour hand at 5


def _draw_cup(canvas: BGRImage, x: int, y: int) -> None:
    # A red mug, shaded across as a lit cylinder: a flat-coloured one is seldom taken for a cup.
    cv2.ellipse(canvas, (x + 230, y + 236), (26, 28), 0, -90, 90, (50, 50, 170), 13, _AA)  # handle
    body = canvas[y + 186 : y + 297, x + 140 : x + 231]  # a view: drawing on it draws the canvas
    mask = np.zeros(body.shape[:2], np.uint8)
    cv2.rectangle(mask, (0, 0), (90, 102), 1, -1)
    cv2.ellipse(mask, (45, 102), (45, 8), 0, 0, 180, 1, -1)  # the rounded bottom edge
    light = 1.15 - 0.6 * np.abs(np.linspace(0, 1, 91) - 0.35) / 0.65  # brightest left of centre
    rows, cols = np.nonzero(mask)
    body[rows, cols] = (np.array([60, 60, 200]) * light[cols, None]).astype(np.uint8)
    cv2.ellipse(canvas, (x + 185, y + 186), (45, 10), 0, 0, 360, (70, 70, 210), -1, _AA)  # rim
    cv2.ellipse(canvas, (x + 185, y + 186), (40, 7), 0, 0, 360, (30, 50, 80), -1, _AA)  # coffee


def _draw_laptop(canvas: BGRImage, x: int, y: int) -> None:
    # Screen (a dark bezel round a blue window with white lines of text) over a grey keyboard
    # deck seen in perspective, its keys in four rows of twelve.
    offset = np.array([x, y])
    lid = np.array([[143, 180], [258, 180], [254, 258], [147, 258]])
    window = np.array([[151, 188], [250, 188], [248, 252], [153, 252]])
    deck = np.array([[147, 258], [254, 258], [280, 290], [120, 290]])
    cv2.fillPoly(canvas, [lid + offset], (50, 50, 50), _AA)
    cv2.fillPoly(canvas, [window + offset], (230, 170, 90), _AA)
    for line in range(4):
        x1 = x + 159 + int(115 * (0.6 - 0.1 * line))
        cv2.rectangle(
            canvas, (x + 159, y + 196 + 14 * line), (x1, y + 202 + 14 * line), (250,) * 3, -1
        )
    cv2.fillPoly(canvas, [deck + offset], (185, 185, 185), _AA)
    cv2.rectangle(canvas, (x + 120, y + 290), (x + 280, y + 296), (120, 120, 120), -1)
    for row in range(4):
        t0, t1 = (row + 0.5) / 5, (row + 1.2) / 5
        top, bottom = y + 258 + int(32 * t0), y + 258 + int(32 * t1)
        left, right = 147 - 27 * t0, 254 + 26 * t0
        for key in range(12):
            x0_key = x + int(left + (right - left) * (key + 0.1) / 12)
            x1_key = x + int(left + (right - left) * (key + 0.9) / 12)
            cv2.rectangle(canvas, (x0_key, top), (x1_key, bottom - 1), (70, 70, 70), -1)
    cv2.rectangle(canvas, (x + 180, y + 280), (x + 220, y + 288), (150, 150, 150), -1)  # touchpad


def _draw_keyboard(canvas: BGRImage, x: int, y: int) -> None:
    # Seen at a slant: the case and each key row narrow towards the top. Light keys with
    # letters on a dark case: a plain grid of keys is detected much less reliably.
    x0, y0, x1, y1 = x + 60, y + 186, x + 340, y + 294
    slant_px = 0.06 * (x1 - x0)
    case = np.array([[x0 + slant_px, y0], [x1 - slant_px, y0], [x1, y1], [x0, y1]])
    cv2.fillPoly(canvas, [case.astype(np.int32)], (45, 45, 45), _AA)
    # Key widths in key units, 14 units a row: four rows of keys, then the space bar row.
    rows = ([1.0] * 14, [1.5] + [1.0] * 12 + [1.5], [1.75] + [1.0] * 11 + [2.25],
            [2.25] + [1.0] * 10 + [2.75], [1.5, 1.0, 1.5, 6.0, 1.5, 1.0, 1.5])  # fmt: skip
    letters = iter("QWERTYUIOPASDFGHJKLZXCVBNM1234567890" * 2)
    for r, widths in enumerate(rows):
        top, bottom = (r + 0.06) / len(rows), (r + 0.94) / len(rows)  # of the height
        y_top, y_bottom = y0 + 4 + top * (y1 - y0 - 8), y0 + 4 + bottom * (y1 - y0 - 8)
        left, right = x0 + 4 + slant_px * (1 - top), x1 - 4 - slant_px * (1 - top)
        units = 0.0
        for width in widths:
            x_left = left + (right - left) * units / 14 + 2
            x_right = left + (right - left) * (units + width) / 14 - 2
            corner = (int(x_left), int(y_top))
            cv2.rectangle(canvas, corner, (int(x_right), int(y_bottom)), (215, 215, 215), -1)
            if width == 1.0 and r < 4:
                at = (int(x_left) + 2, int(y_top + 0.75 * (y_bottom - y_top)))
                cv2.putText(
                    canvas, next(letters), at, cv2.FONT_HERSHEY_PLAIN, 0.6, (40, 40, 40), 1, _AA
                )
            units += width


def _draw_teddy_bear(canvas: BGRImage, x: int, y: int) -> None:
    fur, muzzle = (60, 110, 160), (140, 180, 210)
    blobs = (  # (x, y, radius x, radius y): ears, body, arms, feet, then the head over them
        (176, 194, 12, 12), (224, 194, 12, 12), (200, 263, 28, 33), (169, 257, 12, 12),
        (231, 257, 12, 12), (181, 288, 12, 12), (219, 288, 12, 12), (200, 210, 24, 24),
    )  # fmt: skip
    for bx, by, rx, ry in blobs:
        cv2.ellipse(canvas, (x + bx, y + by), (rx, ry), 0, 0, 360, fur, -1, _AA)
    cv2.circle(canvas, (x + 200, y + 218), 8, muzzle, -1, _AA)
    for ex, ey in ((192, 204), (208, 204), (200, 216)):  # eyes and nose
        cv2.circle(canvas, (x + ex, y + ey), 3, (0, 0, 0), -1, _AA)


_DRAW_OBJECT = {
    "stop sign": _draw_stop_sign,
    "cup": _draw_cup,
    "laptop": _draw_laptop,
    "clock": _draw_clock,
    "keyboard": _draw_keyboard,
    "teddy bear": _draw_teddy_bear,
}


class DemoScene:
    """The 'demo' workbench scene; renders frame i at time t and generates its gaze track."""

    def __init__(self, duration_s: float, seed: int = 7, labels: bool = True) -> None:
        self.duration_s = duration_s
        self.labels = labels
        self.width_px, self.height_px = FRAME_SIZE_PX
        self._rng = np.random.default_rng(seed)
        self.canvas, self.targets_world_px = self._draw_canvas()

    def _draw_canvas(self) -> tuple[BGRImage, list[tuple[float, float]]]:
        h, w = self.height_px + 2 * _MARGIN_PX, self.width_px + 2 * _MARGIN_PX
        # Low-contrast blurred noise, so that every crop of the scene is unique.
        noise = self._rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        canvas = np.asarray(smooth // 4 + 150, dtype=np.uint8)
        targets = []
        for i, label in enumerate(DEMO_PANELS):
            col, row = i % 3, i // 3
            x0 = _MARGIN_PX + 120 + col * 480
            y0 = _MARGIN_PX + 200 + row * 480
            cv2.rectangle(canvas, (x0, y0), (x0 + 400, y0 + 300), (245, 245, 245), -1)
            cv2.rectangle(canvas, (x0, y0), (x0 + 400, y0 + 300), (40, 40, 40), 4)
            if self.labels:
                font = cv2.FONT_HERSHEY_SIMPLEX
                cv2.putText(canvas, label, (x0 + 20, y0 + 160), font, 1.1, _INK, 3, _AA)
            _DRAW_OBJECT[DEMO_PANEL_OBJECTS[label]](canvas, x0, y0)
            targets.append((x0 + 200.0, y0 + 150.0))
        return canvas, targets

    def camera_offset_px(self, t_s: float) -> tuple[float, float]:
        """Top-left corner of the frame on the canvas at time t (the head's slow pan)."""
        ax, ay = _PAN_AMPLITUDE_PX
        px, py = _PAN_PERIOD_S
        return (
            _MARGIN_PX + ax * math.sin(2 * math.pi * t_s / px),
            _MARGIN_PX + ay * math.sin(2 * math.pi * t_s / py),
        )

    def render(self, index: int, t_s: float) -> BGRImage:
        """Frame ``index``, ``t_s`` seconds into the scene, (1200, 1600, 3) BGR."""
        ox, oy = self.camera_offset_px(t_s)
        x, y = round(ox), round(oy)
        frame: BGRImage = self.canvas[y : y + self.height_px, x : x + self.width_px].copy()
        draw_frame_code(frame, index)
        return frame

    def step_at(self, t_s: float) -> int:
        """The procedure step (1-based) the wearer works on ``t_s`` seconds in: the ground truth.

        The scene's time is split evenly over the six panels, in order.
        """
        steps = len(self.targets_world_px)
        return min(int(t_s / (self.duration_s / steps)), steps - 1) + 1

    def gaze_track(self, rate_hz: float = GAZE_RATE_HZ) -> GazeTrack:
        """Fixations on the panels joined by minimum-jerk saccades, in frame pixels.

        The wearer works through the procedure (``step_at``): most fixations fall on the current
        step's panel, alternating between its label and its object (86 px, about 6° apart), and
        one in five is a glance at another panel. The eyes hold a world target while the head
        pans (the frame-space gaze drifts with the pan, as with the vestibulo-ocular reflex).
        One second in the middle is 'not worn'.
        """
        n = int(self.duration_s * rate_hz)
        t_s = np.arange(n) / rate_hz
        world = np.zeros((n, 2))
        fixations: list[Fixation] = []
        panels = len(self.targets_world_px)
        pos = np.array(self.targets_world_px[0])
        on_object = False
        i = 0
        while i < n:
            fix_n = int(self._rng.uniform(0.25, 0.9) * rate_hz)
            jitter = self._rng.normal(0, 2.0, size=(fix_n, 2))  # ~0.15° fixational jitter
            world[i : i + fix_n] = pos + jitter[: n - i]
            end = min(i + fix_n, n) - 1
            fixations.append(
                Fixation(START_NS + round(t_s[i] * 1e9), START_NS + round(t_s[end] * 1e9), 0.0, 0.0)
            )
            i += fix_n
            step = self.step_at(t_s[min(i, n - 1)]) - 1
            if self._rng.random() < 0.2:  # a glance at another panel's label
                panel = (step + 1 + int(self._rng.integers(panels - 1))) % panels
                point, on_object = self.targets_world_px[panel], False
            else:
                on_object = not on_object
                x, y = self.targets_world_px[step]
                point = (x, y + _OBJECT_BELOW_LABEL_PX) if on_object else (x, y)
            target = np.array(point) + self._rng.normal(0, 10, 2)
            sac_n = int(self._rng.uniform(0.03, 0.06) * rate_hz)
            s = np.linspace(0, 1, sac_n + 2)[1:-1, None]
            world[i : i + sac_n] = (pos + (target - pos) * (10 * s**3 - 15 * s**4 + 6 * s**5))[
                : max(0, n - i)
            ]
            i += sac_n
            pos = target
        offsets = np.array([self.camera_offset_px(t) for t in t_s])
        frame_xy = world - offsets
        worn = np.ones(n, dtype=np.bool_)
        mid = int(n / 2)
        worn[mid : mid + int(rate_hz)] = False
        timestamps = START_NS + np.round(t_s * 1e9).astype(np.int64)
        # Report each fixation at its mean frame-space position, as a detector would.
        placed = []
        for f in fixations:
            sel = (timestamps >= f.start_ns) & (timestamps <= f.end_ns)
            mx, my = frame_xy[sel].mean(axis=0)
            placed.append(Fixation(f.start_ns, f.end_ns, float(mx), float(my)))
        return GazeTrack(
            GazeArrays(timestamps, frame_xy[:, 0], frame_xy[:, 1], worn), tuple(placed)
        )


# A reference photo is taken as a person would, not as the glasses see the panel: closer (the
# panel fills 98 % of its width rather than 89 % of a crop), turned by a few degrees, in other
# light.
DEMO_PHOTO_PX = 448
_PHOTO_SCALE = 1.1
_PHOTO_ANGLE_DEG = (4.0, -3.0, 5.0, -5.0, 3.0, -4.0)
_PHOTO_GAIN = (0.85, 1.1, 0.9, 1.05, 0.8, 1.1)


def demo_photo(step: int) -> BGRImage:
    """The reference photo of the demo's step ``step`` (1-based): its panel, without its label.

    The demo card's photos (gazecam/data/demo_photos/step{N}.jpg) are these, written by
    ``write_demo_photos``.
    """
    scene = DemoScene(1.0, labels=False)
    x, y = scene.targets_world_px[step - 1]
    centre = (x, y + _OBJECT_BELOW_LABEL_PX / 2)  # between the label's place and the drawing
    angle_deg = _PHOTO_ANGLE_DEG[step - 1]
    turn = np.asarray(cv2.getRotationMatrix2D(centre, angle_deg, _PHOTO_SCALE), np.float64)
    turn[:, 2] += np.array([DEMO_PHOTO_PX / 2, DEMO_PHOTO_PX / 2]) - centre
    photo = cv2.warpAffine(
        scene.canvas, turn, (DEMO_PHOTO_PX, DEMO_PHOTO_PX), flags=cv2.INTER_LINEAR
    )
    return np.asarray(cv2.convertScaleAbs(photo, alpha=_PHOTO_GAIN[step - 1]), np.uint8)


def write_demo_photos(folder: Path) -> list[Path]:
    """Write the demo card's reference photos (JPEG, quality 90) to ``folder``."""
    paths = []
    for step in range(1, len(DEMO_PANELS) + 1):
        path = folder / f"step{step}.jpg"
        cv2.imwrite(str(path), demo_photo(step), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def draw_frame_code(image: BGRImage, index: int) -> None:
    """Burn the frame index into the bottom-left corner as 16 white (1) / black (0) blocks."""
    b = FRAME_CODE_BLOCK_PX
    y0 = image.shape[0] - b
    for bit in range(FRAME_CODE_BITS):
        value = 255 if (index >> bit) & 1 else 0
        image[y0:, bit * b : (bit + 1) * b] = value


def read_frame_code(image: BGRImage) -> int:
    """Read back the index burnt in by ``draw_frame_code`` (robust to video coding)."""
    b = FRAME_CODE_BLOCK_PX
    row = image[image.shape[0] - b // 2, :, :].mean(axis=-1)
    index = 0
    for bit in range(FRAME_CODE_BITS):
        if row[bit * b + b // 2] > 127:
            index |= 1 << bit
    return index


SCENES: dict[str, Callable[[float], DemoScene]] = {
    "demo": DemoScene,
    "demo-notext": partial(DemoScene, labels=False),
}


class SyntheticSource:
    """``synthetic:NAME``: a rendered scene and its gaze track, replayed like a recording."""

    def __init__(self, address: str, settings: SourceSettings) -> None:
        self.uri = address
        self.stats = SourceStats()
        self._settings = settings
        name = address.removeprefix("synthetic:")
        if name not in SCENES:  # check_address() refuses it first when opened by address
            raise ConfigError(f"{address}: unknown synthetic scene (known: {', '.join(SCENES)})")
        self.scene = SCENES[name](settings.synthetic_duration_s)
        self.track = self.scene.gaze_track()
        self._frame_count = int(settings.synthetic_duration_s * FRAME_RATE_HZ)

    async def open(self) -> SourceInfo:
        """Metadata of the rendered scene."""
        return SourceInfo(
            uri=self.uri,
            kind="synthetic",
            frame_width_px=self.scene.width_px,
            frame_height_px=self.scene.height_px,
            gaze_rate_hz=GAZE_RATE_HZ,
            frame_count=self._frame_count,
            start_ns=START_NS,
            duration_ns=int(self._settings.synthetic_duration_s * 1e9),
        )

    def frame_timestamps_ns(self) -> NDArray[np.int64]:
        """Timestamps of the scene frames, shape (frame_count,)."""
        return START_NS + np.round(np.arange(self._frame_count) * (1e9 / FRAME_RATE_HZ)).astype(
            np.int64
        )

    def _frames(self) -> Iterator[SceneFrame]:
        scene = self.scene
        for i, ts in enumerate(self.frame_timestamps_ns().tolist()):
            yield SceneFrame(
                ts,
                i,
                scene.width_px,
                scene.height_px,
                decode=partial(scene.render, i, (ts - START_NS) / 1e9),
            )

    def stream(self) -> AsyncIterator[SourceItem]:
        """Frames and gaze in time order, paced as the settings say."""
        return replay(
            merge_by_time(self.track.gaze.samples(), self._frames()),
            self._settings.pace,
            self.stats,
        )

    async def close(self) -> None:
        """Nothing to release."""
