"""PP-OCRv4 on ONNX Runtime: reads rendered words where they were drawn, and fails clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gazecam.models import ModelError, ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.perception.ocr import REC_BATCH, TextReader, cut_line, fix_o_zero
from gazecam.records import BGRImage, Box
from tests.perception import iou, make_crop, require_models

FONT = cv2.FONT_HERSHEY_SIMPLEX


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader(PerceptionSettings(), require_models("ppocr-det", "ppocr-rec"))


def draw_text(
    image: BGRImage, text: str, origin: tuple[int, int], scale: float, thickness: int = 2
) -> tuple[int, int, int, int]:
    """Draw ``text`` with its baseline at ``origin``; the box ``(x0, y0, x1, y1)`` of its ink."""
    ink = np.zeros(image.shape[:2], np.uint8)
    cv2.putText(ink, text, origin, FONT, scale, 255, thickness, cv2.LINE_AA)
    alpha = ink[..., None] / 255.0  # anti-aliased edges, as cv2.putText draws them
    image[:] = np.round(image * (1 - alpha) + 30 * alpha).astype(np.uint8)
    ys, xs = np.nonzero(ink)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_reads_rendered_lines_where_they_were_drawn(reader: TextReader) -> None:
    image = np.full((448, 448, 3), 235, np.uint8)
    drawn = {
        "CHECK FUSE": draw_text(image, "CHECK FUSE", (30, 80), 1.2, 3),
        "open the valve": draw_text(image, "open the valve", (60, 220), 1.0),
        "PRESS 3 TIMES": draw_text(image, "PRESS 3 TIMES", (120, 380), 0.8),
    }
    lines = reader.read(image)
    assert [line.text.lower() for line in lines] == [t.lower() for t in drawn]
    for line in lines:
        assert 0.5 <= line.score <= 1.0
        # The ink box lies inside the detected box, and the two mostly overlap.
        x0, y0, x1, y1 = line.box_px
        ink = drawn[next(t for t in drawn if t.lower() == line.text.lower())]
        assert x0 <= ink[0] + 2 and y0 <= ink[1] + 2 and x1 >= ink[2] - 2 and y1 >= ink[3] - 2
        assert iou(line.box_px, ink) >= 0.5


def test_reads_a_slanted_line(reader: TextReader) -> None:
    image = np.full((448, 448, 3), 240, np.uint8)
    draw_text(image, "REMOVE COVER", (60, 240), 1.2, 3)
    turn = cv2.getRotationMatrix2D((224, 224), 8, 1.0)  # 8° anticlockwise
    slanted = cv2.warpAffine(image, turn, (448, 448), borderValue=(240, 240, 240))
    lines = reader.read(np.asarray(slanted, np.uint8))
    assert [line.text.upper() for line in lines] == ["REMOVE COVER"]


def test_padded_shapes_read_the_same_text_in_few_shapes(reader: TextReader) -> None:
    # On a GPU the recogniser's batches are padded to a few shapes (each new shape costs a
    # plan search there); here on the CPU the padding is checked to change no reading.
    image = np.full((448, 448, 3), 235, np.uint8)
    texts = ["CHECK FUSE", "open the valve", "PRESS 3 TIMES", "7", "torque to 25 Nm now please"]
    for i, text in enumerate(texts):
        draw_text(image, text, (10, 50 + 85 * i), 0.9 - 0.1 * (i % 2))
    lines = [cut_line(image, corners) for corners, _ in reader.detect(image)]
    shapes: list[tuple[int, ...]] = []
    run = reader.rec.run

    def recorded(outputs: Any, feed: dict[str, Any]) -> Any:
        shapes.append(next(iter(feed.values())).shape)
        return run(outputs, feed)

    reader.rec.run = recorded
    try:
        exact = reader.recognise(lines)
        reader.padded_shapes = True
        padded = reader.recognise(lines)
    finally:
        reader.padded_shapes, reader.rec.run = False, run
    assert sorted(t.lower() for t, _ in exact) == sorted(t.lower() for t in texts)
    assert [t for t, _ in padded] == [t for t, _ in exact]
    assert np.allclose([s for _, s in padded], [s for _, s in exact], atol=0.01)
    (rows, _, _, width), padded_shape = shapes
    assert rows == len(texts) and width > 320  # one batch, its widest line's width
    assert padded_shape == (REC_BATCH, 3, 48, -(-width // 256) * 256)


def test_blank_image_has_no_text(reader: TextReader) -> None:
    assert reader.read(np.full((200, 300, 3), 200, np.uint8)) == []


def test_regions_are_in_frame_pixels_with_the_gaze_distance(reader: TextReader) -> None:
    frame = np.full((1200, 1600, 3), 230, np.uint8)
    ink = draw_text(frame, "CLOSE COVER", (900, 700), 1.1, 3)
    box = Box(800, 500, 1248, 948)
    regions = reader.perceive(make_crop(frame, box, gaze_px=(1000.0, 600.0), timestamp_ns=42))
    assert [(r.kind, r.label, r.frame_timestamp_ns) for r in regions] == [
        ("text", "CLOSE COVER", 42)
    ]
    r = regions[0]
    assert iou((r.box.x0, r.box.y0, r.box.x1, r.box.y1), ink) >= 0.5
    # The gaze is straight above the line: the distance is the gap to the box's top edge.
    assert r.gaze_distance_px == pytest.approx(r.box.y0 - 600.0)


def test_the_dictionary_comes_from_the_model(reader: TextReader) -> None:
    # CTC blank + 6,623 characters from the ONNX metadata + space = the model's 6,625 classes.
    assert len(reader.characters) == 6625
    assert (reader.characters[0], reader.characters[-1]) == ("", " ")
    assert {"A", "z", "0", "9"} <= set(reader.characters)


@pytest.mark.parametrize(
    ("read", "meant"),
    [
        ("4 SET DIAL T0 5", "4 SET DIAL TO 5"),
        ("C0VER", "COVER"),
        ("m0tor", "motor"),
        ("230 V", "230 V"),
        ("10A", "10A"),
        ("0", "0"),
    ],
)
def test_zero_in_a_word_is_the_letter_o(read: str, meant: str) -> None:
    assert fix_o_zero(read) == meant


def test_text_score_threshold_drops_lines() -> None:
    strict = TextReader(
        PerceptionSettings(text_score=1.0), require_models("ppocr-det", "ppocr-rec")
    )
    image = np.full((200, 448, 3), 235, np.uint8)
    draw_text(image, "CHECK FUSE", (30, 100), 1.2, 3)
    assert strict.read(image) == []


def test_missing_model_says_what_to_run(tmp_path: Path) -> None:
    empty = ModelSettings(models_dir=tmp_path, model_path=[])
    with pytest.raises(ModelError, match=r"ppocr-det: .* run 'gazecam models fetch ppocr-det'"):
        TextReader(models=empty)


def test_corrupt_model_file_is_a_model_error(tmp_path: Path) -> None:
    for name, filename in (
        ("ppocr-det", "ch_PP-OCRv4_det_infer.onnx"),
        ("ppocr-rec", "ch_PP-OCRv4_rec_infer.onnx"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / filename).write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match=r"ch_PP-OCRv4_det_infer.onnx: ONNX Runtime cannot load"):
        TextReader(models=ModelSettings(models_dir=tmp_path, model_path=[]))
