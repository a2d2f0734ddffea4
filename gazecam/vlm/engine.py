"""The vision-language answer engine: a keyframe's visual tokens as gaze-region KV groups.

At each keyframe the SmolVLM vision encoder (ONNX, ``engines/smolvlm_onnx.py``) turns images
into visual tokens, which are prefilled ONCE into the language model's KV cache, as one unit
that attends to the context only (``LanguageModel.add_unit``), and kept as groups:

- each tile's token grid (7×7 for the 448 px gaze crop, 8×8 at 512) is cut into 2×2 blocks;
  each block is a ``region`` group with a gaze prior from the distance between its centre and
  the gaze point (exp(−d / ``GAZECAM_GAZE_PRIOR_SCALE_PX``), as text regions have);
- the low-resolution whole-frame image (256 px: 16 tokens) and the image's marker tokens are a
  ``frame`` group, attended at every step: peripheral vision.

The sequence is SmolVLM's own for a split image (``Idefics3Processor``): per tile
``<fake_token_around_image><row_R_col_C>`` and its tokens, a newline after each row, then
``\\n<fake_token_around_image><global-img>``, the global image's tokens and
``<fake_token_around_image>``. The gaze crop is the one tile (row 1, column 1) and the
thumbnail the global image; ``full`` crops (``gazecam bench``) take the processor's stock
tiling of the whole frame. An image with no tiles is the processor's single image.

Decoding is the text engine's (``gazecam.llm.decoder``): the same cache, selection of the top-k
regions per step, and decode loop; with k = all it is dense attention. The memory holds the
last ``GAZECAM_VLM_KEYFRAMES`` keyframes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.assist.memory import MemoryRegion, MemorySettings
from gazecam.errors import MissingDependencyError
from gazecam.llm.converted import FORMAT_VERSION
from gazecam.llm.decoder import LanguageModel
from gazecam.llm.records import EngineInfo, UnitGroup
from gazecam.llm.settings import LLMSettings
from gazecam.llm.tokenizer import Special
from gazecam.models import ModelError, ModelSettings
from gazecam.records import Box, Crop
from gazecam.vlm.checkpoint import SmolVLMCheckpoint
from gazecam.vlm.preprocess import PreprocessConfig, crop_pixels, frame_pixels

F32 = NDArray[np.float32]
FAKE, GLOBAL = Special("<fake_token_around_image>"), Special("<global-img>")
BLOCK = 2  # a region is a BLOCK×BLOCK block of a tile's visual-token grid
VISION_FORMAT_VERSION = 1  # of vision.json; must match engines.smolvlm_onnx.FORMAT_VERSION


class VLMSettings(BaseSettings):
    """How the vision-language engine sees keyframes."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    vlm_tile_px: Literal[448, 512] = Field(
        448,
        description="The gaze crop's tile: 448 keeps the 448 px crop as it is (49 visual "
        "tokens, position embeddings bucketed as transformers does for small images); 512 "
        "resizes it to SmolVLM's native tile (64 tokens, about 30% more encoder time).",
    )
    vlm_thumbnail_px: Literal[256, 448, 512] = Field(
        256,
        description="The whole frame's low-resolution image, attended at every step: 256 px "
        "gives 16 visual tokens.",
    )
    vlm_keyframes: int = Field(
        8, ge=1, le=32, description="The visual memory holds the last this many keyframes."
    )
    vlm_int8: bool = Field(
        True, description="Run the int8 vision encoder (about 2× faster on CPU) where converted."
    )


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """A keyframe's images as visual tokens, and where its tiles lie in the frame."""

    tiles: F32  # [rows·cols, T, hidden], row-major; [0, T, hidden] for a single image
    rows: int
    cols: int
    tile_boxes: tuple[Box, ...]  # each tile's area of the frame, in frame pixels
    global_tokens: F32  # [Tg, hidden]: the whole image (the crop's frame, or the crop itself)
    encode_ms: float


class VisionEncoder:
    """The converted vision encoders (one ONNX graph per tile size), loaded when first used."""

    def __init__(self, folder: Path, int8: bool, llm: LLMSettings) -> None:
        from gazecam.perception import PerceptionSettings
        from gazecam.trt.providers import parse_tiers

        try:
            self.info: dict[str, Any] = json.loads((folder / "vision.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder / 'vision.json'}: not readable ({exc})") from exc
        self.folder, self.int8 = folder, int8 and bool(self.info.get("int8"))
        parse_tiers(llm.llm_providers)  # a setting naming no tier is refused now, not at first use
        # The encoders run on the vision models' provider chain (gazecam.trt.providers), with
        # the language model's providers and threads.
        self._settings = PerceptionSettings(
            onnx_providers=llm.llm_providers, onnx_threads=llm.llm_threads
        )
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def tile_sizes(self) -> list[int]:
        """The tile sizes converted (vision.json's ``tiles``)."""
        return sorted(int(s) for s in self.info["tiles"])

    def encode(self, pixel_values: F32) -> F32:
        """Pixel values [n, 3, S, S] → visual tokens [n, T, hidden].

        One tile per run: a batch is no faster on a CPU, and its attention matrices
        ([n, 12, 1024, 1024] floats per layer at 512 px) would take 50 MB per tile.
        """
        session = self._session(pixel_values.shape[-1])
        tiles = [session.run(None, {"pixel_values": tile[None]})[0] for tile in pixel_values]
        tokens: F32 = np.concatenate(tiles)
        return tokens

    def _session(self, size: int) -> Any:
        with self._lock:
            if size not in self._sessions:
                if str(size) not in self.info["tiles"]:
                    raise ModelError(
                        f"{self.folder}: no vision encoder for {size} px tiles "
                        f"(converted: {', '.join(map(str, self.tile_sizes))})"
                    )
                from gazecam.trt.cache import VLM_ENCODER
                from gazecam.trt.providers import open_session

                # The int8 graph is quantized for the CPU (integer ops that TensorRT and CUDA
                # do not run): a GPU runs the fp32 one, or its engine.
                int8 = self.folder / f"vision_{size}.int8.onnx"
                self._sessions[size] = open_session(
                    self.folder / f"vision_{size}.onnx",
                    f"{VLM_ENCODER}{size}",
                    self._settings,
                    cpu_path=int8 if self.int8 else None,
                )
            return self._sessions[size]


def converted_vlm_dir(checkpoint: SmolVLMCheckpoint, models: ModelSettings) -> Path:
    """The checkpoint converted to ONNX (decoder and vision encoders): ``NAME-onnx`` beside
    the checkpoint's name in a ``GAZECAM_MODEL_PATH`` folder or the cache, converted into the
    cache on first use (the ``vlm-build`` extra: torch, transformers).

    A conversion is used when its formats are the runtime's and its decoder has the
    checkpoint's shape (a folder converted on another machine is taken; ``gazecam models
    import`` removes the conversion of the checkpoint it replaces).
    """
    name = f"{checkpoint.path.name}-onnx"
    for folder in (*models.model_path, models.models_dir):
        if _conversion_of(checkpoint, folder / name):
            return folder / name
    try:
        from engines.smolvlm_onnx import convert
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            exc.name or "torch", "vlm-build", f"Converting {checkpoint.path} to ONNX"
        ) from exc
    return convert(checkpoint.path, models.models_dir / name)


def _conversion_of(checkpoint: SmolVLMCheckpoint, folder: Path) -> bool:
    try:
        decoder = json.loads((folder / "config.json").read_text())
        vision = json.loads((folder / "vision.json").read_text())
        text = checkpoint.text
        return bool(
            (decoder["format_version"], vision["format_version"])
            == (FORMAT_VERSION, VISION_FORMAT_VERSION)
            and (decoder["layers"], decoder["hidden"], decoder["vocab"])
            == (text.layers, text.hidden_size, text.vocab_size)
            and decoder["random_weights"] == checkpoint.random_weights
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def image_parts(image: ImageTokens) -> list[str | Special | F32]:
    """SmolVLM's sequence for an image: marker tokens and text, and the visual tokens."""
    parts: list[str | Special | F32] = []
    if image.rows:
        for r in range(image.rows):
            for c in range(image.cols):
                parts += [
                    FAKE,
                    Special(f"<row_{r + 1}_col_{c + 1}>"),
                    image.tiles[r * image.cols + c],
                ]
            parts.append("\n")
        parts.append("\n")
    return [*parts, FAKE, GLOBAL, image.global_tokens, FAKE]


class VisionLanguageModel(LanguageModel):
    """SmolVLM: keyframes in as visual-token regions, answers out by the shared decoder."""

    def __init__(
        self,
        checkpoint: SmolVLMCheckpoint,
        settings: VLMSettings | None = None,
        llm: LLMSettings | None = None,
        models: ModelSettings | None = None,
        memory: MemorySettings | None = None,
    ) -> None:
        models = models or ModelSettings()
        folder = converted_vlm_dir(checkpoint, models)
        llm = (llm or LLMSettings()).model_copy(update={"llm_model_dir": folder})
        super().__init__(llm, models)
        self.vlm = settings or VLMSettings()
        self.memory = memory or MemorySettings()
        self.encoder = VisionEncoder(folder, self.vlm.vlm_int8, llm)
        missing = {self.vlm.vlm_tile_px, self.vlm.vlm_thumbnail_px} - set(self.encoder.tile_sizes)
        if missing:
            raise ModelError(
                f"{folder / 'vision.json'}: no vision encoder for {sorted(missing)} px tiles "
                f"(GAZECAM_VLM_TILE_PX, GAZECAM_VLM_THUMBNAIL_PX); convert them with "
                f"python -m engines.smolvlm_onnx {checkpoint.path} {folder}"
            )
        self.preprocess = PreprocessConfig.load(checkpoint.path)
        self.checkpoint = checkpoint
        name = str(self.config.get("name") or checkpoint.path.name)
        self.info = EngineInfo("vlm", name, checkpoint.random_weights)
        # Squashed to the global tile from twice its width: enough pixels, cheap to make.
        self.thumbnail_px = 2 * self.vlm.vlm_thumbnail_px
        self._count = 0

    def memory_tokens(self, memory: MemorySettings) -> tuple[int, str]:
        """The most positions a full visual memory takes: its keyframes' sequences."""
        no_tokens = np.zeros((1, 0, 0), np.float32)
        parts = image_parts(ImageTokens(no_tokens, 1, 1, (), no_tokens[0], 0.0))
        markers = self.tokenizer.encode_prompt(
            tuple(p for p in parts if not isinstance(p, np.ndarray))
        )
        per = (
            len(markers)
            + self._tokens(self.vlm.vlm_tile_px)
            + self._tokens(self.vlm.vlm_thumbnail_px)
        )
        return (
            self.vlm.vlm_keyframes * per,
            f"GAZECAM_VLM_KEYFRAMES ({self.vlm.vlm_keyframes}) × {per} tokens",
        )

    def observe(self, crop: Crop, added: Sequence[MemoryRegion], dropped: Sequence[str]) -> None:
        """Encode a keyframe and prefill its visual tokens; the oldest keyframes beyond
        ``GAZECAM_VLM_KEYFRAMES`` are forgotten. (Perception's regions feed the step tracker
        and the answers' facts; this engine attends to what it sees itself.)"""
        image = self.encode(crop)
        self._count += 1
        x, y = crop.matched.gaze_x_px, crop.matched.gaze_y_px
        self.add_image(f"k{self._count}", image, None if x is None or y is None else (x, y))

    def encode(self, crop: Crop) -> ImageTokens:
        """A keyframe's images as visual tokens: the gaze crop as one tile and the whole frame
        as the global image, or for a ``full`` crop the stock tiling of the whole frame."""
        started = time.perf_counter()
        if crop.mode == "full":
            tiles = frame_pixels(crop.pixels, self.preprocess)
            tokens = self.encoder.encode(tiles.pixel_values)
            h, w = crop.pixels.shape[:2]
            boxes = tuple(
                Box(c * w // tiles.cols, r * h // tiles.rows, (c + 1) * w // tiles.cols,
                    (r + 1) * h // tiles.rows)
                for r in range(tiles.rows) for c in range(tiles.cols)
            )  # fmt: skip
            image = ImageTokens(tokens[:-1], tiles.rows, tiles.cols, boxes, tokens[-1], 0.0)
        else:
            tile = self.encoder.encode(
                crop_pixels(crop.pixels, self.preprocess, self.vlm.vlm_tile_px)
            )
            frame = crop.thumbnail if crop.thumbnail is not None else crop.matched.frame.bgr()
            thumb = self.encoder.encode(
                crop_pixels(frame, self.preprocess, self.vlm.vlm_thumbnail_px)
            )
            image = ImageTokens(tile, 1, 1, (crop.box,), thumb[0], 0.0)
        return replace(image, encode_ms=(time.perf_counter() - started) * 1e3)

    def add_image(self, unit: str, image: ImageTokens, gaze_px: tuple[float, float] | None) -> None:
        """Prefill an image's sequence as one unit: its tiles' 2×2 token blocks as regions
        (gaze priors from ``gaze_px``, frame pixels; none: 0), the rest as the frame group."""
        embeds, tile_starts = self._embed(image_parts(image))
        groups: list[UnitGroup] = []
        in_regions = np.zeros(len(embeds), bool)
        for i, (start, box) in enumerate(zip(tile_starts, image.tile_boxes, strict=True)):
            for name, tokens, centre in _blocks(image.tiles.shape[1], box):
                tokens = tokens + start
                in_regions[tokens] = True
                prior = 0.0 if gaze_px is None else _prior(centre, gaze_px, self.memory)
                groups.append(UnitGroup(f"region:{unit}/t{i}/{name}", "region", tokens, prior))
        groups.append(UnitGroup(f"frame:{unit}", "frame", np.flatnonzero(~in_regions)))
        self.add_unit(unit, embeds, groups)
        # The units in the cache (not a list of our own: gazecam bench swaps caches per mode).
        units = list(self.cache.units(("frame", "region")))
        for old in units[: max(0, len(units) - self.vlm.vlm_keyframes)]:
            self.drop_unit(old)
        self.last_encode_ms = image.encode_ms

    def _embed(self, parts: list[str | Special | F32]) -> tuple[F32, list[int]]:
        """The parts' embeddings [L, hidden] (text and markers looked up, visual tokens as
        they are) and where each visual-token run but the last (the global image) starts."""
        rows: list[F32] = []
        starts: list[int] = []
        run: list[str | Special] = []
        length = 0
        for part in [*parts, None]:
            if isinstance(part, (str, Special)):
                run.append(part)
                continue
            if run:
                ids = self.tokenizer.encode_prompt(tuple(run))
                rows.append(self.embeddings.lookup(ids))
                length += len(ids)
                run = []
            if part is not None:
                starts.append(length)
                rows.append(part)
                length += len(part)
        return np.concatenate(rows), starts[:-1]

    def _tokens(self, tile_px: int) -> int:
        return int(self.encoder.info["tiles"][str(tile_px)]["tokens"])


def _blocks(tokens: int, box: Box) -> list[tuple[str, NDArray[np.int64], tuple[float, float]]]:
    """A tile's g×g token grid (row-major) in BLOCK×BLOCK blocks: name, token indices, and the
    block's centre in frame pixels (the tile covers ``box``)."""
    g = math.isqrt(tokens)
    blocks = []
    for r0 in range(0, g, BLOCK):
        for c0 in range(0, g, BLOCK):
            r1, c1 = min(r0 + BLOCK, g), min(c0 + BLOCK, g)
            index = (np.arange(r0, r1)[:, None] * g + np.arange(c0, c1)[None]).reshape(-1)
            x = box.x0 + (c0 + c1) / 2 / g * box.width_px
            y = box.y0 + (r0 + r1) / 2 / g * box.height_px
            blocks.append((f"r{r0 // BLOCK}c{c0 // BLOCK}", index.astype(np.int64), (x, y)))
    return blocks


def _prior(
    centre: tuple[float, float], gaze_px: tuple[float, float], memory: MemorySettings
) -> float:
    """exp(−distance / scale): 1 under the gaze point, as text regions' priors."""
    distance = math.hypot(centre[0] - gaze_px[0], centre[1] - gaze_px[1])
    return math.exp(-distance / memory.gaze_prior_scale_px)
