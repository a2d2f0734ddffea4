"""Text reading with PP-OCRv4 (PaddleOCR's detection and recognition models) on ONNX Runtime.

Two models, as PaddleOCR and RapidOCR run them, with the pre- and post-processing written here
on numpy and OpenCV (RapidOCR itself would pull in ``opencv-python``, which clashes with our
``opencv-python-headless``):

1. Detection, DB (Differentiable Binarization): the image, normalised to -1..1 and resized to
   a multiple of 32, gives a text probability map at the same size. The map is thresholded,
   each connected blob becomes a minimum-area rectangle, scored by the mean probability inside
   it, and grown ("unclipped") by area × 1.6 / perimeter on every side, because DB is trained
   to predict a shrunken text kernel.
2. Recognition, SVTR-LCNet with a CTC head: each text line is cut out upright with a small
   margin, resized to 48 px high, and batched; the output, per column a probability over the
   dictionary, is decoded greedily (best class per column, repeats merged, blanks dropped),
   and a 0 inside a word is read as the letter O (``fix_o_zero``).

The recognition model carries its dictionary (6,623 characters, Chinese and Latin) in its
ONNX metadata under "character", which is where RapidOCR 1.4.4 takes it from too; CTC's blank
is prepended and a space appended, as in PaddleOCR (``use_space_char``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.models import ModelError, ModelSettings, model_path
from gazecam.perception import PerceptionSettings, onnx_session, to_region
from gazecam.records import BGRImage, Crop, Region
from gazecam.trt import CPU_EP

# Detection. Images run at their own scale up to this side (RapidOCR also enlarges small ones
# to 736 px, at 2.7 times the cost for a 448 crop; our crops' text is at the camera's scale).
DET_MAX_SIDE_PX = 2048
# The DB thresholds are PaddleOCR's and RapidOCR's defaults for PP-OCRv4.
DET_PIXEL_THRESHOLD = 0.3  # a map pixel is text above this probability
DET_BOX_SCORE = 0.5  # a box is kept when its mean text probability reaches this
DET_UNCLIP_RATIO = 1.6
DET_MIN_SIDE_PX = 3  # shorter boxes are noise
DET_MAX_BOXES = 1000
# Recognition: input height, the narrowest batch (320 px, as the model was exported), batch size.
REC_HEIGHT_PX = 48
REC_MIN_WIDTH_PX = 320
# On a GPU, recogniser batches wider than the minimum are padded to a multiple of this (which
# divides the engines' widest profile, 8 crops of a multiple of 32 px) and to REC_BATCH lines.
REC_GPU_WIDTH_STEP_PX = 256
REC_BATCH = 6
LINE_MARGIN = 0.1  # of the line's height, added on every side of a line before reading it

Corners = NDArray[np.float32]  # (4, 2): top-left, top-right, bottom-right, bottom-left (x, y)


@dataclass(frozen=True, slots=True)
class TextLine:
    """A line of text read in an image; ``box_px`` is its axis-aligned box ``(x0, y0, x1, y1)``."""

    text: str
    score: float  # mean probability of the decoded characters
    box_px: tuple[float, float, float, float]


def _normalise(image: BGRImage) -> NDArray[np.float32]:
    """(H, W, 3) uint8 → (3, H, W) float32 in -1..1, as PaddleOCR's (x / 255 - 0.5) / 0.5."""
    return np.ascontiguousarray((image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1))


def _order_corners(points: NDArray[np.float32]) -> Corners:
    """Four points as top-left, top-right, bottom-right, bottom-left."""
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    top_left, bottom_left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    top_right, bottom_right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float32)


def _rect_corners(center: Sequence[float], size: Sequence[float], angle: float) -> Corners:
    """The ordered corners of a rotated rectangle as ``cv2.minAreaRect`` describes it."""
    return _order_corners(np.asarray(cv2.boxPoints((center, size, angle)), dtype=np.float32))


def _box_score(prob: NDArray[np.float32], corners: Corners) -> float:
    """Mean text probability inside a quadrilateral of the map (RapidOCR's "fast" score)."""
    h, w = prob.shape
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, (w - 1, h - 1))
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, (w - 1, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.fillPoly(mask, [(corners - (x0, y0)).astype(np.int32)], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def boxes_from_map(prob: NDArray[np.float32]) -> list[tuple[Corners, float]]:
    """Text boxes (corners in map pixels) and their scores from a DB probability map (H, W)."""
    bitmap = cv2.dilate((prob > DET_PIXEL_THRESHOLD).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    found = []
    for contour in contours[:DET_MAX_BOXES]:
        center, (w, h), angle = cv2.minAreaRect(contour)
        if min(w, h) < DET_MIN_SIDE_PX:
            continue
        corners = _rect_corners(center, (w, h), angle)
        score = _box_score(prob, corners)
        if score < DET_BOX_SCORE:
            continue
        # Unclip by d = area × ratio / perimeter. PaddleOCR offsets the polygon with pyclipper
        # (round joins) and takes the result's minimum-area rectangle: for a rectangle, that
        # is the rectangle grown by d on every side.
        d = w * h * DET_UNCLIP_RATIO / (2 * (w + h))
        if min(w, h) + 2 * d < DET_MIN_SIDE_PX + 2:
            continue
        found.append((_rect_corners(center, (w + 2 * d, h + 2 * d), angle), score))
    return found


def cut_line(image: BGRImage, corners: Corners) -> BGRImage:
    """A text line's quadrilateral with a margin, warped upright (turned if it stands tall).

    The margin, a tenth of the line's height on every side, is ours: without it the recogniser
    often runs words together. On 84 rendered lines (random words in four Hershey fonts, and
    the demo panels' labels), PaddleOCR's own tight cut and linear resizing read 52 exactly;
    with cubic resizing and ``fix_o_zero`` 82, and with this margin too, all 84.
    """
    along, across = corners[1] - corners[0], corners[3] - corners[0]
    height = float(np.linalg.norm(across))
    unit_along = along / max(float(np.linalg.norm(along)), 1e-6)
    unit_across = across / max(height, 1e-6)
    margin = LINE_MARGIN * height
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float32)  # (4, 2)
    grown = corners + margin * (signs[:, :1] * unit_along + signs[:, 1:] * unit_across)
    width_px = int(max(np.linalg.norm(grown[0] - grown[1]), np.linalg.norm(grown[2] - grown[3])))
    height_px = int(max(np.linalg.norm(grown[0] - grown[3]), np.linalg.norm(grown[1] - grown[2])))
    width_px, height_px = max(width_px, 1), max(height_px, 1)
    target = np.array(
        [[0, 0], [width_px, 0], [width_px, height_px], [0, height_px]], dtype=np.float32
    )
    warp = cv2.getPerspectiveTransform(grown.astype(np.float32), target)
    line = cv2.warpPerspective(
        image, warp, (width_px, height_px), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if height_px >= 1.5 * width_px:  # vertical text: read it turned, as PaddleOCR does
        line = np.rot90(line)
    return np.asarray(line, dtype=np.uint8)


def fix_o_zero(text: str) -> str:
    """Read 0 as the letter O in words: the recogniser confuses the two (one oval in many fonts).

    A word (space-separated) with letters and no digit other than 0 gets O, or o where most of
    its letters are lower case: "T0" → "TO", "C0VER" → "COVER"; "230", "10A" and "0" stay.
    """
    words = []
    for word in text.split(" "):
        letters = [ch for ch in word if ch.isalpha()]
        digits = {ch for ch in word if ch.isdigit()}
        if letters and digits == {"0"}:
            lower = sum(ch.islower() for ch in letters) > len(letters) / 2
            word = word.replace("0", "o" if lower else "O")
        words.append(word)
    return " ".join(words)


class TextReader:
    """PP-OCRv4 detection + recognition; both sessions created once and reused."""

    def __init__(
        self, settings: PerceptionSettings | None = None, models: ModelSettings | None = None
    ) -> None:
        self.settings = settings or PerceptionSettings()
        det_path = model_path("ppocr-det", models)
        rec_path = model_path("ppocr-rec", models)
        self.det: Any = onnx_session(det_path, self.settings, "ppocr-det", models)
        self.rec: Any = onnx_session(rec_path, self.settings, "ppocr-rec", models)
        meta = self.rec.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ModelError(f"{rec_path}: no 'character' dictionary in its ONNX metadata")
        # Index 0 is CTC's blank; the model's last class is the space.
        self.characters: tuple[str, ...] = ("", *meta["character"].splitlines(), " ")
        # On a GPU each new input shape costs a plan search (cuDNN's, the EP's): with the
        # lines' own widths a crop took 46 ms on an H200 (18 ms on its CPU). There the batches
        # are padded to a few shapes, which the CPU would pay for in compute.
        self.padded_shapes = self.rec.get_providers()[0] != CPU_EP
        classes = self.rec.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.characters):
            raise ModelError(
                f"{rec_path}: {classes} output classes but {len(self.characters)} in its dictionary"
            )

    def detect(self, image: BGRImage) -> list[tuple[Corners, float]]:
        """Text line boxes in an image's pixels, with their detection scores."""
        h, w = image.shape[:2]
        scale = min(1.0, DET_MAX_SIDE_PX / max(h, w))
        # The network downsamples by 32: both sides must be multiples of it.
        det_w = max(32, round(w * scale / 32) * 32)
        det_h = max(32, round(h * scale / 32) * 32)
        resized = np.asarray(cv2.resize(image, (det_w, det_h)), dtype=np.uint8)
        blob = _normalise(resized)[None]  # (1, 3, det_h, det_w)
        prob = self.det.run(None, {self.det.get_inputs()[0].name: blob})[0][0, 0]  # (det_h, det_w)
        to_image = np.array([w / det_w, h / det_h], dtype=np.float32)
        limit = np.array([w, h], dtype=np.float32)
        boxes = [(np.clip(c * to_image, 0, limit), s) for c, s in boxes_from_map(prob)]
        # Reading order: top to bottom, then left to right.
        return sorted(boxes, key=lambda b: (round(float(b[0][0, 1]) / 10), float(b[0][0, 0])))

    def recognise(self, lines: list[BGRImage]) -> list[tuple[str, float]]:
        """The text of each cut-out line and its score, in the order given."""
        results: list[tuple[str, float]] = [("", 0.0)] * len(lines)
        ratios = [line.shape[1] / line.shape[0] for line in lines]
        order = np.argsort(ratios)  # similar widths together: less padding per batch
        input_name = self.rec.get_inputs()[0].name
        for begin in range(0, len(lines), REC_BATCH):
            batch = order[begin : begin + REC_BATCH].tolist()
            width = max(REC_MIN_WIDTH_PX, math.ceil(REC_HEIGHT_PX * max(ratios[i] for i in batch)))
            rows = len(batch)
            if self.padded_shapes:
                rows = REC_BATCH
                if width > REC_MIN_WIDTH_PX:
                    width = -(-width // REC_GPU_WIDTH_STEP_PX) * REC_GPU_WIDTH_STEP_PX
            blob = np.zeros((rows, 3, REC_HEIGHT_PX, width), dtype=np.float32)
            for row, i in enumerate(batch):
                w = min(width, math.ceil(REC_HEIGHT_PX * ratios[i]))
                line = cv2.resize(lines[i], (w, REC_HEIGHT_PX), interpolation=cv2.INTER_CUBIC)
                blob[row, :, :, :w] = _normalise(line)
            probs = self.rec.run(None, {input_name: blob})[0]  # (batch, width / 8, 6625)
            for row, i in enumerate(batch):
                results[i] = self._decode(probs[row])
        return results

    def _decode(self, probs: NDArray[np.float32]) -> tuple[str, float]:
        """CTC greedy decoding of one line's (T, classes) probabilities."""
        best = probs.argmax(axis=1)  # (T,)
        keep = best != 0  # not blank ...
        keep[1:] &= best[1:] != best[:-1]  # ... and not a repeat of the column before
        if not keep.any():
            return "", 0.0
        text = fix_o_zero("".join(self.characters[k] for k in best[keep].tolist()))
        return text, float(probs.max(axis=1)[keep].mean())

    def read(self, image: BGRImage) -> list[TextLine]:
        """The text lines in a BGR image whose recognition score reaches the threshold."""
        boxes = self.detect(image)
        if not boxes:
            return []
        texts = self.recognise([cut_line(image, corners) for corners, _ in boxes])
        lines = []
        for (corners, _), (text, score) in zip(boxes, texts, strict=True):
            if text.strip() and score >= self.settings.text_score:
                x0, y0 = corners.min(axis=0).tolist()
                x1, y1 = corners.max(axis=0).tolist()
                lines.append(TextLine(text.strip(), score, (x0, y0, x1, y1)))
        return lines

    def perceive(self, crop: Crop) -> list[Region]:
        """The text lines in a crop, as regions in frame pixels."""
        return [
            to_region(crop, "text", line.text, line.score, line.box_px)
            for line in self.read(crop.pixels)
        ]
