"""Sources of scene frames and gaze, chosen from a source address.

Addresses: a folder path (a Neon native recording or a Pupil Cloud export, told apart by their
files), ``neon://auto`` (the first Neon found by mDNS), ``neon://HOST[:PORT]``, and
``synthetic:NAME``. Each backend module is imported only when its address is used, so a
machine without the Neon packages can still replay exports and synthetic scenes.
"""

from __future__ import annotations

from pathlib import Path

from gazecam.errors import ConfigError, SourceError
from gazecam.settings import SourceSettings
from gazecam.sources.base import Source, SourceStats

__all__ = [
    "Source",
    "SourceStats",
    "check_address",
    "detect_folder_format",
    "open_source",
    "scene_video_files",
]


def detect_folder_format(path: Path) -> str:
    """'neon-recording' for a Neon native recording, 'cloud-export' for a Pupil Cloud export."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder (a source is a recording or export folder)")
    if (path / "info.json").is_file() and any(path.glob("gaze ps*.raw")):
        return "neon-recording"
    if (path / "gaze.csv").is_file() and (path / "world_timestamps.csv").is_file():
        return "cloud-export"
    raise SourceError(
        f"{path}: neither a Neon recording (info.json with 'gaze ps1.raw') nor a Pupil Cloud "
        "export (gaze.csv with world_timestamps.csv)"
    )


_ADDRESS_FORMS = "a folder, neon://auto, neon://HOST[:PORT] or synthetic:NAME"


def check_address(address: str) -> None:
    """Refuse a malformed source address with one line, before anything is started.

    Checks the form only (a known synthetic scene, a well-formed neon:// address, a folder that
    holds a recording or an export); whether the glasses answer is found out by ``open()``.
    """
    if not address.strip():
        raise ConfigError(f"empty source address (use {_ADDRESS_FORMS})")
    if address.startswith("synthetic:"):
        from gazecam.sources.synthetic import SCENES

        if address.removeprefix("synthetic:") not in SCENES:
            raise ConfigError(f"{address}: unknown synthetic scene (known: {', '.join(SCENES)})")
    elif address.startswith("neon://"):
        from gazecam.sources.neon_live import parse_neon_address

        parse_neon_address(address)
    elif "://" in address:
        raise ConfigError(f"{address}: unknown source address (use {_ADDRESS_FORMS})")
    else:
        detect_folder_format(Path(address).expanduser())


def open_source(address: str, settings: SourceSettings | None = None) -> Source:
    """Create the source for an address (checked first); nothing is read until its ``open()``."""
    check_address(address)
    settings = settings or SourceSettings()
    if address.startswith("synthetic:"):
        from gazecam.sources.synthetic import SyntheticSource

        return SyntheticSource(address, settings)
    if address.startswith("neon://"):
        from gazecam.sources.neon_live import NeonLiveSource

        return NeonLiveSource(address, settings)
    path = Path(address).expanduser()
    if detect_folder_format(path) == "neon-recording":
        from gazecam.sources.neon_recording import NeonRecordingSource

        return NeonRecordingSource(path, settings)
    from gazecam.sources.cloud_export import CloudExportSource

    return CloudExportSource(path, settings)


def scene_video_files(address: str) -> list[Path]:
    """A recording's scene video files as stored, in order (a Neon recording's parts); none for
    a live or synthetic source. For a consumer that passes the video on undecoded."""
    if address.startswith(("synthetic:", "neon://")):
        return []
    path = Path(address).expanduser()
    if detect_folder_format(path) == "neon-recording":
        from gazecam.sources.neon_recording import scene_parts

        return scene_parts(path, ".mp4")
    from gazecam.sources.cloud_export import find_video

    return [find_video(path)]
