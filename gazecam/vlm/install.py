"""SmolVLM checkpoints in the model cache: importing or fetching one, listing them, and finding
the one the vision-language engine uses.

``gazecam models import NAME DIR`` checks a folder (``gazecam.vlm.checkpoint``) and copies its
files into the cache (``GAZECAM_MODELS_DIR/NAME/``) through a hidden temporary folder, renamed
into place last, so a failed import leaves nothing behind; ``gazecam models fetch NAME``
downloads the Hub's files with ``huggingface_hub`` into such a folder first, then imports them.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from gazecam.models import (
    CHECKPOINTS,
    ModelError,
    ModelSettings,
    cache_temporary,
    folder_written_atomically,
    progress,
)
from gazecam.vlm.checkpoint import (
    CHAT_TEMPLATES,
    OPTIONAL_FILES,
    REQUIRED_FILES,
    CheckpointError,
    SmolVLMCheckpoint,
    check_checkpoint,
)


def installed_dir(name: str, settings: ModelSettings) -> Path | None:
    """Where checkpoint ``name`` (smolvlm-256m or smolvlm-500m) is installed: NAME/ in a
    ``GAZECAM_MODEL_PATH`` folder, else in the cache; None if nowhere."""
    for folder in (*settings.model_path, settings.models_dir):
        if (folder / name).is_dir():
            return folder / name
    return None


def describe_checkpoint(name: str, settings: ModelSettings) -> str:
    """Where a checkpoint is, as ``gazecam models list`` shows it: its path and summary, what is
    wrong with it, or how to install it."""
    path = installed_dir(name, settings)
    if path is None:
        return f"not installed: gazecam models fetch {name}, or gazecam models import {name} DIR"
    try:
        return f"{path} ({check_checkpoint(path).summary()})"
    except CheckpointError as exc:
        return f"refused: {exc}"


def vlm_checkpoint(settings: ModelSettings | None = None) -> SmolVLMCheckpoint | None:
    """The checkpoint the vision-language engine uses: the folder ``GAZECAM_VLM`` names, else
    the installed smolvlm-256m, else smolvlm-500m, each checked; None if there is none."""
    settings = settings or ModelSettings()
    if settings.vlm is not None:
        return check_checkpoint(settings.vlm)
    for name in CHECKPOINTS:
        path = installed_dir(name, settings)
        if path is not None:
            return check_checkpoint(path)
    return None


def _repo(name: str) -> str:
    if name not in CHECKPOINTS:
        raise ModelError(f"{name}: not a SmolVLM checkpoint name (known: {', '.join(CHECKPOINTS)})")
    return CHECKPOINTS[name]


def import_checkpoint(
    name: str, source: Path, settings: ModelSettings | None = None
) -> SmolVLMCheckpoint:
    """Check a checkpoint folder and copy its files into the cache as ``name``, replacing an
    earlier one; returns the installed checkpoint.

    A checkpoint of the other released size is refused (a 500M folder imported as
    smolvlm-256m); one of a custom size (a fine-tune, a random test model) is taken as it is.
    """
    settings = settings or ModelSettings()
    _repo(name)
    checkpoint = check_checkpoint(source)
    if checkpoint.size not in (name.removeprefix("smolvlm-"), "custom"):
        raise CheckpointError(
            f"{source}: a SmolVLM-{checkpoint.size.upper()} checkpoint, not {name}; "
            f"import it as smolvlm-{checkpoint.size}"
        )
    target = settings.models_dir / name
    # An earlier import of the same name is replaced only once this one is complete.
    with folder_written_atomically(target) as staged:
        total = sum((source / file).stat().st_size for file in checkpoint.files)
        with progress(f"{name}: copying {len(checkpoint.files)} files into {target}", total) as bar:
            for file in checkpoint.files:
                try:
                    with (source / file).open("rb") as src, (staged / file).open("wb") as dst:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            dst.write(block)
                            bar.update(len(block))
                except OSError as exc:
                    raise ModelError(
                        f"{name}: copying {source / file} into {settings.models_dir} failed "
                        f"({exc.strerror or exc})"
                    ) from exc
    # Its ONNX conversion was of the checkpoint this one replaces: made anew at first use.
    shutil.rmtree(settings.models_dir / f"{name}-onnx", ignore_errors=True)
    return dataclasses.replace(checkpoint, path=target)


def fetch_checkpoint(name: str, settings: ModelSettings | None = None) -> SmolVLMCheckpoint:
    """Make checkpoint ``name`` present: the installed one (checked), else download it from the
    Hugging Face Hub (only the files an import takes) and import it.

    Where the Hub cannot be reached, ModelError says what to download and how to import it.
    """
    # Imported here: the engine's lookup (vlm_checkpoint) runs without the HTTP client.
    from huggingface_hub import snapshot_download

    settings = settings or ModelSettings()
    repo = _repo(name)
    path = installed_dir(name, settings)
    if path is not None:
        return check_checkpoint(path)
    patterns = [*REQUIRED_FILES, *CHAT_TEMPLATES, *OPTIONAL_FILES, "model*.safetensors*"]
    with cache_temporary(settings.models_dir, name) as tmp:
        print(f"{name}: downloading {repo} from the Hugging Face Hub", file=sys.stderr, flush=True)
        try:
            snapshot_download(repo, allow_patterns=patterns, local_dir=tmp)
        except Exception as exc:
            # Besides huggingface_hub's own errors (an unreachable Hub is a
            # LocalEntryNotFoundError caused by the connection error), a download cut short
            # raises its HTTP client's (requests, httpx or httpx2, by version), and an answer
            # that is not the Hub's (a captive portal) whatever its parsing meets. Each means:
            # no checkpoint came; the line says what to do instead.
            cause = exc.__cause__ or exc
            reason = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
            raise ModelError(
                f"{name}: no download from the Hugging Face Hub ({reason}); download {repo} on "
                f"a connected machine, then run: gazecam models import {name} DIR"
            ) from exc
        return import_checkpoint(name, Path(tmp), settings)
