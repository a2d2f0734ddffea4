"""The engine cache: one TensorRT engine per vision model and precision in
``MODELS_DIR/trt-engines/``, keyed by what makes an engine valid, and checked before each use.

An engine is only valid for the model file it was built from (sha256), the TensorRT version and
the GPU (compute capability) that built it, its precision, and the input shapes of its
optimisation profile (the crop size gazecam feeds). ``NAME.PRECISION.json`` holds that key and
the engine's own sha256; ``NAME.PRECISION.engine`` the engine; ``NAME.PRECISION.onnx`` the
"EPContext" model that lets ONNX Runtime's TensorRT EP run it. ``check_engine`` refuses an
engine whose key differs from this machine's (stale or foreign) or whose bytes differ from the
sidecar's sha256 (corrupt), with a one-line reason; ``gazecam engines build`` then rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gazecam.models import cache_temporary, sha256_of
from gazecam.trt import EngineError, Platform, Precision

ENGINE_DIR = "trt-engines"
# The vision models gazecam builds engines for, and the name of each one's single input.
INPUT_NAMES = {
    "ppocr-det": "x",
    "ppocr-rec": "x",
    "yolox-nano": "images",
    "efficientnet-lite0": "image",
}
# The vision-language engine's encoders are named by this and their tile size (one per size).
VLM_ENCODER = "smolvlm-vision-"


def has_engine(model: str | None) -> bool:
    """Whether gazecam builds a TensorRT engine for a model of this name."""
    return model is not None and (model in INPUT_NAMES or model.startswith(VLM_ENCODER))


# The OCR recogniser's widest line (the input is 48 px high): 8 crop widths, a line of aspect
# ratio up to 75 in a 448 crop. Lines of the same height are wider than the crop only when
# turned, so wider ones do not occur on crops of gazecam's size.
REC_MAX_WIDTH_PER_CROP = 8


@dataclass(frozen=True, slots=True)
class InputProfile:
    """An input's optimisation profile: its smallest, typical and largest shape."""

    name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @property
    def fixed(self) -> bool:
        """Whether the input has one shape only (no profile needed)."""
        return self.min_shape == self.max_shape


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything an engine's validity depends on; an engine is used only where all match."""

    model: str
    model_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: Precision
    profiles: tuple[InputProfile, ...]

    def to_json(self) -> dict[str, Any]:
        """The key as JSON (shape tuples as lists)."""
        return asdict(self)


def input_profiles(
    model: str, crop_px: int, classifier_batch: int, rec_batch: int
) -> tuple[InputProfile, ...]:
    """The shapes gazecam feeds a model on crops of ``crop_px``: the OCR detector the crop (its
    sides rounded up to the network's multiple of 32), the recogniser batches of up to
    ``rec_batch`` lines 48 px high, YOLOX its fixed 416 input, the classifier the crop and up to
    ``classifier_batch - 1`` detection areas at 224."""
    if model.startswith(VLM_ENCODER):  # one graph per tile size, each at its fixed size
        side = int(model.removeprefix(VLM_ENCODER))
        return (
            InputProfile(
                "pixel_values", (1, 3, side, side), (1, 3, side, side), (1, 3, side, side)
            ),
        )
    name = INPUT_NAMES.get(model)
    if name is None:
        raise EngineError(
            f"{model}: no TensorRT engine for this model (known: {', '.join(INPUT_NAMES)}, "
            f"{VLM_ENCODER}SIZE)"
        )
    if model == "ppocr-det":
        side = -(-crop_px // 32) * 32
        return (InputProfile(name, (1, 3, 32, 32), (1, 3, side, side), (1, 3, side, side)),)
    if model == "ppocr-rec":
        widest = max(320, REC_MAX_WIDTH_PER_CROP * crop_px)
        return (
            InputProfile(
                name, (1, 3, 48, 320), (rec_batch, 3, 48, 320), (rec_batch, 3, 48, widest)
            ),
        )
    if model == "yolox-nano":
        fixed = (1, 3, 416, 416)
        return (InputProfile(name, fixed, fixed, fixed),)
    return (
        InputProfile(name, (1, 3, 224, 224), (1, 3, 224, 224), (classifier_batch, 3, 224, 224)),
    )


def engine_key(
    model: str,
    onnx_path: Path,
    platform: Platform,
    precision: Precision,
    profiles: tuple[InputProfile, ...],
) -> EngineKey:
    """The key of the engine this machine would build for a model; EngineError without a GPU
    or TensorRT."""
    if platform.compute_capability is None:
        raise EngineError("no NVIDIA GPU found (nvidia-smi lists none, and this is no Jetson)")
    if platform.tensorrt_version is None:
        raise EngineError(f"{platform.gpu}: the tensorrt package is not installed")
    return EngineKey(
        model,
        sha256_of(onnx_path),
        platform.tensorrt_version,
        platform.compute_capability,
        precision,
        profiles,
    )


def engine_paths(models_dir: Path, model: str, precision: Precision) -> tuple[Path, Path, Path]:
    """The engine, its EPContext wrapper and its sidecar for a model at a precision."""
    folder, stem = models_dir / ENGINE_DIR, f"{model}.{precision}"
    return folder / f"{stem}.engine", folder / f"{stem}.onnx", folder / f"{stem}.json"


def _mismatch(wanted: EngineKey, found: dict[str, Any]) -> str | None:
    """Why a sidecar's key is not ``wanted``, in words; None where it matches."""
    have = json.loads(json.dumps(wanted.to_json()))  # tuples as JSON lists, as in the sidecar
    if found == have:
        return None
    if (found.get("tensorrt_version"), found.get("compute_capability")) != (
        have["tensorrt_version"],
        have["compute_capability"],
    ):
        return (
            f"built with TensorRT {found.get('tensorrt_version')} for sm "
            f"{found.get('compute_capability')}, this is TensorRT {have['tensorrt_version']} "
            f"on sm {have['compute_capability']} (foreign engine)"
        )
    if found.get("model_sha256") != have["model_sha256"]:
        return "built from another version of the model file (stale engine)"
    if found.get("profiles") != have["profiles"]:
        return "built for other input shapes (another crop size or batch; stale engine)"
    return "built with other settings (stale engine)"


def check_engine(models_dir: Path, key: EngineKey) -> Path:
    """The EPContext model of a valid cached engine for ``key``; EngineError saying why not
    (none built, stale, foreign, corrupt). Never loads the engine to find out."""
    engine, wrapper, sidecar = engine_paths(models_dir, key.model, key.precision)
    rebuild = f"; run 'gazecam engines build --precision {key.precision} --models {key.model}'"
    if not sidecar.is_file():
        raise EngineError(
            f"{key.model}: no {key.precision} TensorRT engine in {sidecar.parent}{rebuild}"
        )
    try:
        meta = json.loads(sidecar.read_text())
        found, engine_sha = meta["key"], meta["engine_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{sidecar}: unreadable engine sidecar ({exc}){rebuild}") from exc
    why = _mismatch(key, found)
    if why is not None:
        raise EngineError(f"{engine}: {why}{rebuild}")
    if not engine.is_file() or not wrapper.is_file():
        raise EngineError(f"{engine}: engine or its wrapper {wrapper.name} missing{rebuild}")
    actual = sha256_of(engine)
    if actual != engine_sha:
        raise EngineError(
            f"{engine}: corrupt engine (sha256 {actual[:12]}…, its sidecar says "
            f"{str(engine_sha)[:12]}…){rebuild}"
        )
    return wrapper


def write_engine(
    models_dir: Path, key: EngineKey, engine_bytes: bytes, wrapper_bytes: bytes, build_s: float
) -> Path:
    """Put a built engine, its EPContext wrapper and sidecar into the cache; the engine's path.

    All three are written in a temporary folder and moved into place, the sidecar last (an
    engine without a matching sidecar is never used). A full disk raises one EngineError line
    and leaves no partial file.
    """
    engine, wrapper, sidecar = engine_paths(models_dir, key.model, key.precision)
    meta = {
        "key": key.to_json(),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "engine_bytes": len(engine_bytes),
        "build_s": round(build_s, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with cache_temporary(engine.parent, engine.stem) as tmp:
            for path, data in (
                (engine, engine_bytes),
                (wrapper, wrapper_bytes),
                (sidecar, json.dumps(meta, indent=1).encode()),
            ):
                (tmp / path.name).write_bytes(data)
            sidecar.unlink(missing_ok=True)  # the old key must not vouch for the new engine
            for path in (engine, wrapper, sidecar):
                os.replace(tmp / path.name, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise EngineError(
                f"{engine.parent}: disk full while writing the {key.model} engine "
                f"({len(engine_bytes) / 1e6:.1f} MB); partial files removed"
            ) from exc
        raise EngineError(f"{engine.parent}: cannot write the {key.model} engine ({exc})") from exc
    return engine
