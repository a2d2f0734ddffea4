"""Faults a simulated Neon injects: as a plan from the command line, or directly from tests.

A plan step is ``KIND@AT[:VALUE]``, AT seconds after the simulator starts playing:

- ``drop@AT``: close every RTSP connection (a Wi-Fi hiccup); clients reconnect;
- ``stall-video@AT:S`` / ``stall-gaze@AT:S``: send nothing on that stream for S seconds;
- ``jump@AT:S``: move the device clock by S seconds (an NTP correction on the phone);
- ``away@AT:S``: vanish for S seconds (connections dropped, nothing sent, no HTTP answers);
- ``late-gaze@AT:S``: from then on hold gaze back S seconds and send it in bursts;
- ``reorder-gaze@AT:S``: the same, each burst newest first (out of order).
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_KINDS = ("drop", "stall-video", "stall-gaze", "jump", "away", "late-gaze", "reorder-gaze")


@dataclass
class Faults:
    """Faults being injected now (mutable: changed while the simulator plays)."""

    stall_video_until_ns: int = 0  # monotonic: no scene frames before then
    stall_gaze_until_ns: int = 0
    away_until_ns: int = 0  # no streams and no HTTP answers before then
    clock_jump_ns: int = 0  # added to the device clock
    gaze_delay_ns: int = 0  # gaze is held back this long and sent in bursts
    gaze_reorder: bool = False  # a held-back burst is sent newest first


@dataclass(frozen=True)
class FaultStep:
    """One step of a fault plan."""

    at_s: float
    kind: str
    value_s: float  # a duration, a clock jump or a delay; 0 for 'drop'


def parse_fault(spec: str) -> FaultStep:
    """A ``KIND@AT[:VALUE]`` step; ValueError naming what is wrong."""
    kind, _, rest = spec.partition("@")
    at, _, value = rest.partition(":")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    try:
        at_s, value_s = float(at), float(value or 0)
    except ValueError:
        raise ValueError(f"fault {spec!r}: expected KIND@SECONDS[:SECONDS]") from None
    if at_s < 0 or (kind != "jump" and value_s < 0):
        raise ValueError(f"fault {spec!r}: negative time")
    if (kind == "drop") != (not value):
        raise ValueError(
            f"fault {spec!r}: " + ("drop takes no value" if value else "give :SECONDS")
        )
    return FaultStep(at_s, kind, value_s)
