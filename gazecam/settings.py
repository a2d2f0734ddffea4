"""Settings, one pydantic-settings model per concern, all read from ``GAZECAM_*`` variables.

The command line maps its flags onto these models (see ``gazecam.cli``), so a flag and its
environment variable always mean the same thing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.errors import ConfigError
from gazecam.records import CropMode

Pace = Literal["realtime", "fast"]


class SourceSettings(BaseSettings):
    """How sources are opened and replayed."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    pace: Pace = Field(
        "fast",
        description="Replay pacing of recorded sources: 'realtime' as the glasses deliver, "
        "or 'fast' as fast as possible.",
    )
    neon_discovery_timeout_s: float = Field(
        10.0, gt=0, description="How long neon://auto searches the network (mDNS) for glasses."
    )
    neon_connect_timeout_s: float = Field(
        5.0, gt=0, description="Timeout for connecting to a Neon Companion device."
    )
    neon_reconnect_attempts: int = Field(
        10, ge=0, description="How often a live source reconnects after a dropped stream."
    )
    neon_reconnect_backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first reconnect; doubles each try, up to 10 s."
    )
    neon_time_echo_samples: int = Field(
        20, ge=3, description="Time Echo round trips used to estimate the glasses' clock offset."
    )
    neon_max_frame_age_s: float = Field(
        1.0,
        gt=0,
        le=10,
        description="A live scene frame whose time (on the local clock) is further than this "
        "from its arrival is dropped, counted (frames_stale), and the glasses' clock offset "
        "measured again: a crop must never show the past as the present.",
    )
    synthetic_duration_s: float = Field(
        60.0, gt=0, description="Length of a synthetic source's scene, in seconds."
    )


class CaptureSettings(BaseSettings):
    """Gaze-to-frame matching, fixation detection, keyframes and foveal crops."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    crop_size_px: int = Field(
        448, ge=16, le=4096, description="Side of the square foveal crop, in pixels."
    )
    crop_mode: CropMode = Field(
        "gaze",
        description="'gaze': crop centred on the gaze point; 'center': the same size at the "
        "frame centre (baseline); 'full': the whole frame (baseline).",
    )
    keyframes_per_s: float = Field(
        1.0, gt=0, le=120, description="At most this many keyframes (crops) per second."
    )
    thumbnail_px: int = Field(
        0,
        ge=0,
        le=1024,
        description="Width of a low-resolution thumbnail of the whole frame kept beside each "
        "crop as peripheral context; 0 turns it off.",
    )
    match_method: Literal["interpolate", "nearest"] = Field(
        "interpolate",
        description="Gaze at a frame's time: linear interpolation between the samples around "
        "it, or the nearest sample.",
    )
    match_tolerance_ms: float = Field(
        20.0,
        gt=0,
        description="A frame whose nearest gaze sample is further away than this has no gaze.",
    )
    fixation_detector: Literal["auto", "source", "ivt"] = Field(
        "auto",
        description="'source': the recording's or device's own fixations; 'ivt': our "
        "velocity-threshold filter; 'auto': the source's where it has them, else I-VT.",
    )
    ivt_threshold_deg_s: float = Field(
        100.0,
        gt=0,
        description="I-VT: gaze slower than this (degrees/s, in the scene camera) is fixating. "
        "Higher than the 30 deg/s of head-fixed trackers: while the head turns, a fixation "
        "moves across the head-worn camera's image (100 agrees best with Neon's own detector).",
    )
    ivt_window_ms: float = Field(
        20.0, gt=0, description="I-VT: gaze velocity is measured over this window."
    )
    ivt_min_fixation_ms: float = Field(
        60.0, ge=0, description="I-VT: a fixation must last this long before it counts."
    )

    def with_thumbnail(self, width_px: int) -> CaptureSettings:
        """These settings with a thumbnail at least ``width_px`` wide (an answer engine's
        ``thumbnail_px``: the vlm engine's whole-frame image; 0: as they are)."""
        if width_px <= self.thumbnail_px:
            return self
        return self.model_copy(update={"thumbnail_px": width_px})


def settings_problem(exc: ValidationError, flags: Mapping[str, str]) -> str:
    """One line naming each bad setting as the user sets it: ``--FLAG / GAZECAM_NAME`` where the
    running command has a flag for it, else only ``GAZECAM_NAME``.

    ``flags``: the running command's flags, by the setting each sets (``crop_size_px``: ``size``).
    """
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        where = f"GAZECAM_{name.upper()}"
        if name in flags:
            where = f"--{flags[name].replace('_', '-')} / {where}"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def comma_names(spec: str, setting: str, known: Collection[str], why: str) -> list[str]:
    """The names a comma-separated setting lists, each one of ``known``; else a ConfigError
    naming the setting, the others and ``why`` they do not do (e.g. "not available (...)")."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    others = [name for name in names if name not in known]
    if not names or others:
        raise ConfigError(f"{setting}={spec!r}: {', '.join(others) or 'none named'} {why}")
    return names
