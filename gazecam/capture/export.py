"""Writes crops to a folder: ``crops/NNNNNN.jpg``, ``crops.jsonl``, ``contact_sheet.jpg``.

Each crop is written and its JSON line flushed as soon as it is made, so an interrupted run
keeps every crop it produced; the contact sheet and ``summary.json`` are written at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gazecam.errors import ConfigError, SourceError
from gazecam.records import BGRImage, Crop

TILE_PX = 192
SHEET_COLUMNS = 8
SHEET_MAX_TILES = 96  # beyond this the sheet shows every 2nd, 4th, … crop
_OUTPUTS = ("crops", "crops.jsonl", "contact_sheet.jpg", "summary.json")


def crop_record(crop: Crop, index: int, file: str) -> dict[str, Any]:
    """The JSON object written for one crop (times in ns, coordinates in frame pixels)."""
    m = crop.matched
    return {
        "index": index,
        "file": file,
        "frame_index": m.frame.index,
        "frame_timestamp_ns": m.frame.timestamp_ns,
        "gaze_timestamp_ns": m.gaze_timestamp_ns,
        "gaze_x": m.gaze_x_px,
        "gaze_y": m.gaze_y_px,
        "box": crop.box.as_list(),
        "fixation": m.fixation_id,
        "worn": m.status != "not_worn",
        "mode": crop.mode,
    }


class CropWriter:
    """Writes a run's crops into ``out_dir`` (refuses to mix with an earlier run's output)."""

    def __init__(self, out_dir: Path, start_ns: int | None, overwrite: bool = False) -> None:
        self.out_dir = out_dir
        self.count = 0
        self._start_ns = start_ns
        existing = [name for name in _OUTPUTS if (out_dir / name).exists()]
        if existing and not overwrite:
            raise ConfigError(
                f"{out_dir}: already holds {', '.join(existing)} (choose another --out, or "
                "--force to replace them)"
            )
        try:
            for name in existing:
                target = out_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            (out_dir / "crops").mkdir(parents=True, exist_ok=True)
            self._jsonl = (out_dir / "crops.jsonl").open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{out_dir}: cannot write there ({exc.strerror})") from exc
        self._tiles: list[tuple[BGRImage, str]] = []
        self._tile_every = 1

    def write(self, crop: Crop) -> dict[str, Any]:
        """Write one crop's JPEG (and thumbnail) and its JSON line; return the JSON object."""
        self.count += 1
        name = f"crops/{self.count:06d}.jpg"
        self._imwrite(name, crop.pixels)
        record = crop_record(crop, self.count, name)
        if crop.thumbnail is not None:
            record["thumbnail"] = f"crops/{self.count:06d}_thumb.jpg"
            self._imwrite(record["thumbnail"], crop.thumbnail)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._keep_tile(crop)
        return record

    def _imwrite(self, name: str, image: BGRImage) -> None:
        if not cv2.imwrite(str(self.out_dir / name), image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise SourceError(f"{self.out_dir / name}: cannot write the image")

    def _keep_tile(self, crop: Crop) -> None:
        # Keep a bounded, evenly spaced selection: when full, drop every other tile and keep
        # only every 2× as many crops from then on.
        if (self.count - 1) % self._tile_every:
            return
        t_ns = crop.matched.frame.timestamp_ns - (self._start_ns or 0)
        label = (
            f"{t_ns / 1e9:.2f} s" if self._start_ns is not None else f"#{crop.matched.frame.index}"
        )
        tile = cv2.resize(crop.pixels, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
        self._tiles.append((np.asarray(tile, dtype=np.uint8), label))
        if len(self._tiles) > SHEET_MAX_TILES:
            self._tiles = self._tiles[::2]
            self._tile_every *= 2

    def contact_sheet(self) -> BGRImage | None:
        """The kept crops tiled in rows, each labelled with its time; None without crops."""
        if not self._tiles:
            return None
        rows = (len(self._tiles) + SHEET_COLUMNS - 1) // SHEET_COLUMNS
        cols = min(SHEET_COLUMNS, len(self._tiles))
        cell_h = TILE_PX + 28
        sheet = np.full((rows * cell_h, cols * TILE_PX, 3), 255, dtype=np.uint8)
        for i, (tile, label) in enumerate(self._tiles):
            y, x = (i // SHEET_COLUMNS) * cell_h, (i % SHEET_COLUMNS) * TILE_PX
            sheet[y : y + TILE_PX, x : x + TILE_PX] = tile
            cv2.putText(
                sheet,
                label,
                (x + 6, y + TILE_PX + 20),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.6,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
        return sheet

    def close(self, summary: dict[str, Any]) -> None:
        """Write the contact sheet and ``summary.json``; close ``crops.jsonl``."""
        if self._jsonl.closed:
            return
        self._jsonl.close()
        sheet = self.contact_sheet()
        if sheet is not None:
            self._imwrite("contact_sheet.jpg", sheet)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
