"""Foveal crops around the gaze point, the centre and full-frame baselines, and keyframes."""

from __future__ import annotations

import cv2
import numpy as np

from gazecam.records import BGRImage, Box, Crop, CropMode, MatchedFrame


def crop_box(
    center_x_px: float, center_y_px: float, width_px: int, height_px: int, size_px: int
) -> Box:
    """The size×size box centred on a point, slid to stay inside a width×height frame.

    Where the frame is smaller than the box in one direction, the box spans that direction.
    The box is centred on the point to within half a pixel unless it had to slide.
    """

    def span(center: float, extent: int) -> tuple[int, int]:
        if size_px >= extent:
            return 0, extent
        start = int(np.floor(center - size_px / 2 + 0.5))
        start = min(max(start, 0), extent - size_px)
        return start, start + size_px

    x0, x1 = span(center_x_px, width_px)
    y0, y1 = span(center_y_px, height_px)
    return Box(x0, y0, x1, y1)


def gaze_on_frame(x_px: float, y_px: float, width_px: int, height_px: int, size_px: int) -> bool:
    """Whether a gaze point may centre a crop: finite, and less than half a crop off the frame.

    A point up to half a crop outside an edge still has its surroundings partly in view, so
    its crop slides inside the frame as usual. Beyond that (bad calibration, a NaN that became
    a huge number) the slid crop would show the frame's edge, not where the wearer looks.
    """
    margin_px = size_px / 2
    return bool(
        -margin_px < x_px < width_px + margin_px and -margin_px < y_px < height_px + margin_px
    )


def box_for(matched: MatchedFrame, mode: CropMode, size_px: int) -> Box:
    """The crop box of a matched frame in a crop mode ('gaze' needs a matched gaze point)."""
    w, h = matched.frame.width_px, matched.frame.height_px
    if mode == "full":
        return Box(0, 0, w, h)
    if mode == "center":
        return crop_box(w / 2, h / 2, w, h, size_px)
    if matched.gaze_x_px is None or matched.gaze_y_px is None:
        raise ValueError(f"frame {matched.frame.index} has no gaze point to crop around")
    return crop_box(matched.gaze_x_px, matched.gaze_y_px, w, h, size_px)


def thumbnail(image: BGRImage, width_px: int) -> BGRImage:
    """The whole frame shrunk to ``width_px`` wide, aspect kept (area averaging)."""
    h, w = image.shape[:2]
    height_px = max(1, round(h * width_px / w))
    small = cv2.resize(image, (width_px, height_px), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.uint8)


def make_crop(
    matched: MatchedFrame,
    image: BGRImage,
    mode: CropMode,
    size_px: int,
    thumbnail_px: int = 0,
) -> Crop:
    """Cut the crop of a matched frame from its decoded pixels, (H, W, 3) BGR."""
    box = box_for(matched, mode, size_px)
    pixels = np.ascontiguousarray(image[box.y0 : box.y1, box.x0 : box.x1])
    thumb = thumbnail(image, thumbnail_px) if thumbnail_px else None
    return Crop(matched=matched, mode=mode, box=box, pixels=pixels, thumbnail=thumb)


class KeyframeSelector:
    """Chooses keyframes: one per fixation onset, at most ``max_per_s`` per second.

    A frame qualifies when its gaze is valid and it lies in a fixation that has no keyframe yet.
    If the rate limit blocks a fixation's first frame, a later frame of the same fixation is
    taken once the limit allows, so a long fixation is not missed.
    """

    def __init__(self, max_per_s: float) -> None:
        self.min_interval_ns = int(1e9 / max_per_s)
        self._last_fixation: int | None = None
        self._last_ns: int | None = None

    def select(self, matched: MatchedFrame) -> bool:
        """Whether this frame is a keyframe (and remember it if so)."""
        if matched.status != "ok" or matched.fixation_id is None:
            return False
        if matched.fixation_id == self._last_fixation:
            return False
        t = matched.frame.timestamp_ns
        if self._last_ns is not None and t - self._last_ns < self.min_interval_ns:
            return False
        self._last_fixation, self._last_ns = matched.fixation_id, t
        return True
