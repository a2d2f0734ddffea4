"""SmolVLM checkpoints: checking a folder in the Hugging Face layout.

A checkpoint is what ``HuggingFaceTB/SmolVLM-256M-Instruct`` (or ``-500M-``) holds on the Hub:
``config.json`` (an Idefics3 model), ``model.safetensors`` (or an index with its shards), the
tokenizer, processor and chat-template files. Checking one reads ``config.json`` and the
safetensors headers only (8-byte little-endian length, a JSON header, then the data): no
weights are loaded, no torch or transformers is needed, and a truncated download is caught
because its header's data offsets point beyond the end of the file. Each problem is one line
naming the file and what is wrong. Installing checkpoints into the cache, and finding the one
the engine uses: ``gazecam.vlm.install``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gazecam.models import ModelError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# What the engine reads besides the config and the weights: the tokenizer, the image
# preprocessing and the chat template (the Hub's chat_template.json; transformers 4.51 and
# later save it as chat_template.jinja).
REQUIRED_FILES = (CONFIG, "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
CHAT_TEMPLATES = ("chat_template.json", "chat_template.jinja")
# Copied along where present: the rest of the Hub's layout, for other tools reading the cache.
OPTIONAL_FILES = (
    "special_tokens_map.json",
    "processor_config.json",
    "generation_config.json",
    "added_tokens.json",
)

Size = Literal["256m", "500m", "custom"]


class CheckpointError(ModelError):
    """A SmolVLM checkpoint folder is missing, incomplete, of another architecture or corrupt."""


@dataclass(frozen=True, slots=True)
class VisionParams:
    """Hyper-parameters of the SigLIP vision encoder (``vision_config``)."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    image_size_px: int
    patch_size_px: int


@dataclass(frozen=True, slots=True)
class TextParams:
    """Hyper-parameters of the language backbone (``text_config``, a Llama model)."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int


# The released checkpoints: SigLIP base patch-16 at 512 px, pixel shuffle 4, and SmolLM2-135M
# (256M) or SmolLM2-360M (500M).
_SIGLIP_B16_512 = VisionParams(768, 3072, 12, 12, 512, 16)
SIZES: dict[Size, tuple[VisionParams, TextParams, int]] = {
    "256m": (_SIGLIP_B16_512, TextParams(576, 1536, 30, 9, 3, 64, 49280), 4),
    "500m": (_SIGLIP_B16_512, TextParams(960, 2560, 32, 15, 5, 64, 49280), 4),
}


@dataclass(frozen=True, slots=True)
class SmolVLMCheckpoint:
    """A checked SmolVLM checkpoint folder."""

    path: Path
    size: Size  # "custom" where the hyper-parameters are neither released model's
    vision: VisionParams
    text: TextParams
    scale_factor: int  # pixel shuffle: scale_factor² patches become one visual token
    tied_embeddings: bool  # no lm_head.weight: the output layer is embed_tokens
    random_weights: bool  # config.json says gazecam_random_weights (engines/random_smolvlm.py)
    parameters: int
    files: tuple[str, ...]  # the files an import copies, relative to path

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens of one image tile (64 for 512 px, patch 16, pixel shuffle 4)."""
        return self.tokens_at(self.vision.image_size_px)

    def tokens_at(self, tile_px: int) -> int:
        """Visual tokens of one ``tile_px``² tile: (S / patch / scale_factor)², 49 at 448 px."""
        step_px = self.vision.patch_size_px * self.scale_factor
        if tile_px % step_px:
            raise CheckpointError(
                f"tile size {tile_px} is not a multiple of patch × scale_factor {step_px}"
            )
        return (tile_px // step_px) ** 2

    def summary(self) -> str:
        """One line for ``gazecam models list``, e.g. "256m, 256.5M parameters"."""
        size: str = self.size
        if size == "custom":
            size = (
                f"custom size: vision {self.vision.hidden_size}×{self.vision.layers} layers, "
                f"text {self.text.hidden_size}×{self.text.layers} layers"
            )
        weights = ", random weights" if self.random_weights else ""
        return f"{size}, {self.parameters / 1e6:.1f}M parameters{weights}"


def check_checkpoint(path: Path) -> SmolVLMCheckpoint:
    """Check a SmolVLM checkpoint folder (files, config, safetensors headers, key tensor shapes).

    CheckpointError names the file and what is wrong with it; nothing is loaded.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    templates = [name for name in CHAT_TEMPLATES if (path / name).is_file()]
    if not templates:
        missing.append(CHAT_TEMPLATES[0])
    weight_files = _weight_files(path, missing)
    if missing:
        raise CheckpointError(
            f"{path}: missing {', '.join(missing)} (a SmolVLM checkpoint in the Hugging Face "
            "layout, e.g. HuggingFaceTB/SmolVLM-256M-Instruct, has them)"
        )
    config = _read_config(path / CONFIG)
    vision, text, scale_factor = _params(path / CONFIG, config)
    shapes: dict[str, tuple[int, ...]] = {}
    holder: dict[str, Path] = {}  # which file holds each tensor, for the messages
    for name in weight_files:
        for tensor, shape in read_safetensors_header(path / name).items():
            shapes[tensor] = shape
            holder[tensor] = path / name
    sharded = weight_files != [WEIGHTS]
    if sharded:
        _check_index(path, holder)
    where = path / (WEIGHTS_INDEX if sharded else WEIGHTS)
    tied = _check_tensors(where, shapes, holder, vision, text, scale_factor, config)
    size: Size = "custom"
    for name, params in SIZES.items():
        if params == (vision, text, scale_factor):
            size = name
    optional = [name for name in OPTIONAL_FILES if (path / name).is_file()]
    index = [WEIGHTS_INDEX] if sharded else []
    return SmolVLMCheckpoint(
        path=path,
        size=size,
        vision=vision,
        text=text,
        scale_factor=scale_factor,
        tied_embeddings=tied,
        random_weights=bool(config.get("gazecam_random_weights")),
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        files=(*REQUIRED_FILES, *templates, *optional, *index, *weight_files),
    )


def _weight_files(path: Path, missing: list[str]) -> list[str]:
    """The safetensors files: model.safetensors, or the shards the index lists (adds to
    ``missing`` what is not there)."""
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    if not (path / WEIGHTS_INDEX).is_file():
        missing.append(f"{WEIGHTS} (or {WEIGHTS_INDEX} with its shards)")
        return []
    shards = sorted(set(_weight_map(path / WEIGHTS_INDEX).values()))
    missing += [name for name in shards if not (path / name).is_file()]
    return shards


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(file, str) and "/" not in file for file in weight_map.values()
    ):
        raise CheckpointError(f"{index}: weight_map is not a map of tensor names to shard files")
    return weight_map


def _check_index(path: Path, holder: dict[str, Path]) -> None:
    for tensor, shard in _weight_map(path / WEIGHTS_INDEX).items():
        if holder.get(tensor) != path / shard:
            raise CheckpointError(
                f"{path / WEIGHTS_INDEX}: lists {tensor} in {shard}, which lacks it"
            )


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a model configuration (a JSON object)")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "idefics3" and (
        "Idefics3ForConditionalGeneration" not in architectures
    ):
        what = ", ".join(map(str, architectures)) or f"model_type {config.get('model_type')!r}"
        raise CheckpointError(f"{file}: a {what} checkpoint, not SmolVLM (Idefics3)")
    return config


# transformers' defaults (Idefics3VisionConfig, LlamaConfig, Idefics3Config): a saved config.json
# leaves out the values equal to them (SmolVLM's has no vision num_hidden_layers, 12).
_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 32,
}
_TEXT_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
_SCALE_FACTOR_DEFAULT = 2


def _params(file: Path, config: dict[str, Any]) -> tuple[VisionParams, TextParams, int]:
    """The hyper-parameters, each a positive integer (CheckpointError naming the field)."""

    def read(section: str, key: str, default: int) -> int:
        values = config.get(section, {}) if section else config
        value = values.get(key, default) if isinstance(values, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            field = f"{section}.{key}" if section else key
            raise CheckpointError(f"{file}: {field} is {value!r}, not a positive integer")
        return value

    v = {key: read("vision_config", key, default) for key, default in _VISION_DEFAULTS.items()}
    t = {key: read("text_config", key, default) for key, default in _TEXT_DEFAULTS.items()}
    heads = t["num_attention_heads"]
    vision = VisionParams(
        v["hidden_size"],
        v["intermediate_size"],
        v["num_hidden_layers"],
        v["num_attention_heads"],
        v["image_size"],
        v["patch_size"],
    )
    text = TextParams(
        t["hidden_size"],
        t["intermediate_size"],
        t["num_hidden_layers"],
        heads,
        read("text_config", "num_key_value_heads", heads),
        read("text_config", "head_dim", t["hidden_size"] // heads),
        t["vocab_size"],
    )
    scale_factor = read("", "scale_factor", _SCALE_FACTOR_DEFAULT)
    grid = vision.image_size_px // vision.patch_size_px
    if vision.image_size_px % vision.patch_size_px or grid % scale_factor:
        raise CheckpointError(
            f"{file}: image_size {vision.image_size_px} is not a multiple of patch_size "
            f"{vision.patch_size_px} × scale_factor {scale_factor}"
        )
    return vision, text, scale_factor


VISION = "model.vision_model."
TEXT = "model.text_model."


def _check_tensors(
    weights: Path,
    shapes: dict[str, tuple[int, ...]],
    holder: dict[str, Path],
    vision: VisionParams,
    text: TextParams,
    scale_factor: int,
    config: dict[str, Any],
) -> bool:
    """Check the key tensors' shapes and the layer counts against the config; returns whether
    the output layer is tied to the embeddings (no lm_head.weight)."""
    vh, th, patch = vision.hidden_size, text.hidden_size, vision.patch_size_px
    vq = f"{VISION}encoder.layers.0.self_attn."
    tq = f"{TEXT}layers.0.self_attn."
    kv = text.kv_heads * text.head_dim
    expected = {
        f"{VISION}embeddings.patch_embedding.weight": (vh, 3, patch, patch),
        f"{VISION}embeddings.position_embedding.weight": (
            (vision.image_size_px // vision.patch_size_px) ** 2,
            vh,
        ),
        f"{vq}q_proj.weight": (vh, vh),
        f"{vq}k_proj.weight": (vh, vh),
        f"{vq}v_proj.weight": (vh, vh),
        "model.connector.modality_projection.proj.weight": (th, vh * scale_factor**2),
        f"{TEXT}embed_tokens.weight": (text.vocab_size, th),
        f"{tq}q_proj.weight": (text.heads * text.head_dim, th),
        f"{tq}k_proj.weight": (kv, th),
        f"{tq}v_proj.weight": (kv, th),
    }
    tied = "lm_head.weight" not in shapes
    text_config = config.get("text_config")
    tie_flags = (config, text_config if isinstance(text_config, dict) else {})
    if tied and not any(flags.get("tie_word_embeddings") for flags in tie_flags):
        raise CheckpointError(
            f"{weights}: tensor lm_head.weight is missing (config.json does not tie it to "
            "the embeddings)"
        )
    if not tied:
        expected["lm_head.weight"] = (text.vocab_size, th)
    for tensor, shape in expected.items():
        if tensor not in shapes:
            raise CheckpointError(f"{weights}: tensor {tensor} is missing")
        if shapes[tensor] != shape:
            raise CheckpointError(
                f"{holder[tensor]}: tensor {tensor} has shape {list(shapes[tensor])}, "
                f"config.json needs {list(shape)}"
            )
    for prefix, what, layers in (
        (f"{VISION}encoder.layers.", "vision", vision.layers),
        (f"{TEXT}layers.", "text", text.layers),
    ):
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for tensor in shapes if (m := pattern.match(tensor))}
        if found != set(range(layers)):
            raise CheckpointError(
                f"{weights}: has {len(found)} {what} layers, config.json says {layers}"
            )
    return tied


# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def read_safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read from its header.

    Checks that the header parses, that each tensor's byte range fits its shape and dtype, and
    that the data the header describes is all in the file (a truncated download is refused).
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", start)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{file}: header length {length} does not fit the file's {size} bytes "
                "(corrupt, or not safetensors)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: header is not JSON (corrupt, or not safetensors)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object (corrupt, or not safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    data_end = 0
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            itemsize = _DTYPE_BYTES[dtype]
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{file}: header entry {tensor} is malformed ({exc!r})") from exc
        if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{file}: tensor {tensor} has data_offsets [{begin}, {end}], its shape "
                f"{list(shape)} of {dtype} takes {math.prod(shape) * itemsize} bytes"
            )
        shapes[tensor] = shape
        data_end = max(data_end, end)
    if 8 + length + data_end > size:
        raise CheckpointError(
            f"{file}: truncated: {size} bytes, its header describes {8 + length + data_end}"
        )
    return shapes
