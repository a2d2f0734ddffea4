"""Pixel values for the vision encoder, from BGR frames and crops (numpy and Pillow).

Two ways in, both reading the checkpoint's ``preprocessor_config.json``:

- ``crop_pixels``: ours. The gaze crop is ONE tile: resized to S×S (unless it is S×S already),
  rescaled by 1/255, normalised with the checkpoint's mean/std → [1, 3, S, S].
- ``frame_pixels``: the stock tiling of transformers' ``Idefics3ImageProcessor`` for a whole
  frame: longest edge resized to ``size.longest_edge`` (2048), both edges rounded up to
  multiples of the tile (``max_image_size.longest_edge``, 512), cut into tiles row-major, and
  the whole image resized to one more tile (the global image) → [rows·cols + 1, 3, S, S].

Resizing is Pillow's LANCZOS, which is what the stock processor uses (``resample: 1``), so the
pixels match it exactly. cv2 has no such filter: on a 1600×1200 scene frame its INTER_LANCZOS4
is up to 21 grey levels off PIL's when enlarging to 2048×1536, and INTER_AREA / INTER_LANCZOS4
up to 45 / 132 levels off when shrinking that to the 512 global image (no antialiasing,
another kernel).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from gazecam.models import ModelError
from gazecam.records import BGRImage

F32 = NDArray[np.float32]
LANCZOS = 1  # PIL's resample code for LANCZOS, as preprocessor_config.json writes it


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """The image processor's settings that shape pixel values."""

    longest_edge_px: int  # size.longest_edge: the whole frame's longest edge before tiling
    tile_px: int  # max_image_size.longest_edge: the encoder's tile size
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def load(cls, path: Path) -> PreprocessConfig:
        """Read a preprocessor_config.json (or the folder holding it); ModelError if unusable."""
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            raw = json.loads(path.read_text())
            resample = raw.get("resample", LANCZOS)
            if resample != LANCZOS:
                raise ValueError(f"resample {resample}: only LANCZOS (1) is implemented")
            if not (raw.get("do_rescale", True) and raw.get("do_normalize", True)):
                raise ValueError("do_rescale and do_normalize must be true")
            return cls(
                longest_edge_px=int(raw["size"]["longest_edge"]),
                tile_px=int(raw["max_image_size"]["longest_edge"]),
                rescale_factor=float(raw["rescale_factor"]),
                image_mean=_triple(raw["image_mean"]),
                image_std=_triple(raw["image_std"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: not a usable SmolVLM preprocessor config ({exc})") from exc


def _triple(values: list[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass(frozen=True, slots=True)
class Tiles:
    """Pixel values of tiles [n, 3, S, S] and their grid (0×0: one tile, no global image)."""

    pixel_values: F32
    rows: int
    cols: int


def resize_lanczos(image: NDArray[np.uint8], width_px: int, height_px: int) -> NDArray[np.uint8]:
    """An (H, W, 3) uint8 image resized with PIL's LANCZOS, as the stock image processor does."""
    resized = Image.fromarray(image).resize((width_px, height_px), Image.Resampling.LANCZOS)
    return np.asarray(resized)


def _normalise(rgb_tiles: NDArray[np.uint8], config: PreprocessConfig) -> F32:
    """[n, S, S, 3] uint8 RGB → [n, 3, S, S] float32: rescaled, then (x − mean) / std."""
    scale = np.float32(config.rescale_factor)
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    pixels = (rgb_tiles.astype(np.float32) * scale - mean) / std
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def crop_pixels(crop: BGRImage, config: PreprocessConfig, tile_px: int | None = None) -> F32:
    """Our single tile: a BGR crop resized to S×S (S = tile_px or the config's tile) → [1,3,S,S]."""
    size = tile_px or config.tile_px
    rgb = np.ascontiguousarray(crop[:, :, ::-1])
    return _normalise(resize_lanczos(rgb, size, size)[None], config)


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The processor's first resize: longest edge to ``longest``, the other kept even."""
    if width >= height:
        new_w, new_h = longest, int(longest / (width / height))
        new_h += new_h % 2
    else:
        new_h, new_w = longest, int(longest * (width / height))
        new_w += new_w % 2
    return max(new_h, 1), max(new_w, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """The processor's second resize: both edges up to multiples of the tile, aspect kept."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def frame_pixels(frame: BGRImage, config: PreprocessConfig) -> Tiles:
    """The stock tiling of a whole BGR frame: row-major tiles, then the global image."""
    rgb = np.ascontiguousarray(frame[:, :, ::-1])
    height, width = _longest_edge_size(rgb.shape[0], rgb.shape[1], config.longest_edge_px)
    rgb = resize_lanczos(rgb, width, height)
    height, width = _tile_multiple_size(height, width, config.tile_px)
    rgb = resize_lanczos(rgb, width, height)
    s = config.tile_px
    if height <= s and width <= s:
        return Tiles(_normalise(rgb[None], config), 0, 0)  # one tile, as the processor does
    rows, cols = height // s, width // s
    tiles = rgb.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    whole = resize_lanczos(rgb, s, s)
    return Tiles(_normalise(np.concatenate([tiles, whole[None]]), config), rows, cols)
