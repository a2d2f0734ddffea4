"""Visual memory: the regions perception found in the keyframes of the last N seconds.

Each region becomes a short line of text ("text 'CHECK FUSE', at the gaze point"), which the
language model encodes once, as its own KV group, when the region arrives. The memory keeps
one entry per thing seen (the same text or object seen again replaces the older sighting, so a
long look at one panel does not fill the context with copies), forgets what is older than the
horizon, and is bounded in size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.records import Region


class MemorySettings(BaseSettings):
    """How much of what the wearer saw is kept for answering."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    memory_horizon_s: float = Field(
        60.0, gt=0, description="Regions seen longer ago than this are forgotten."
    )
    memory_max_regions: int = Field(
        64, ge=1, description="At most this many regions are kept (the oldest go first)."
    )
    gaze_prior_scale_px: float = Field(
        150.0,
        gt=0,
        description="Gaze prior of a region: exp(-distance from the gaze / this scale), so a "
        "region under the gaze scores 1 and one 150 px away about 0.37.",
    )


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A region as the language model sees it."""

    region_id: str
    region: Region
    text: str
    gaze_prior: float  # 0..1, 1 = under the gaze point


def describe(region: Region) -> str:
    """The line of text that stands for a region in the model's context."""
    where = (
        "at the gaze point"
        if region.gaze_distance_px < 1
        else f"{region.gaze_distance_px:.0f} px from the gaze point"
    )
    what = f"text '{region.label}'" if region.kind == "text" else f"a {region.label}"
    return f"- {what}, {where}\n"


class VisualMemory:
    """The regions of recent keyframes, one per distinct thing seen, newest last."""

    def __init__(self, settings: MemorySettings | None = None) -> None:
        self.settings = settings or MemorySettings()
        self._entries: OrderedDict[tuple[str, str], MemoryRegion] = OrderedDict()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def regions(self) -> list[MemoryRegion]:
        """The regions in memory, oldest first."""
        return list(self._entries.values())

    def add_keyframe(
        self, timestamp_ns: int, regions: list[Region]
    ) -> tuple[list[MemoryRegion], list[str]]:
        """Add a keyframe's regions; return (regions added, ids of regions dropped)."""
        dropped: list[str] = []
        added: list[MemoryRegion] = []
        for region in regions:
            key = (region.kind, " ".join(region.label.lower().split()))
            old = self._entries.pop(key, None)
            if old is not None:
                dropped.append(old.region_id)
            prior = math.exp(-region.gaze_distance_px / self.settings.gaze_prior_scale_px)
            entry = MemoryRegion(f"r{self._next_id}", region, describe(region), prior)
            self._next_id += 1
            self._entries[key] = entry
            added.append(entry)
        horizon_ns = int(self.settings.memory_horizon_s * 1e9)
        while self._entries:
            oldest = next(iter(self._entries.values()))
            too_old = timestamp_ns - oldest.region.frame_timestamp_ns > horizon_ns
            if not too_old and len(self._entries) <= self.settings.memory_max_regions:
                break
            self._entries.popitem(last=False)
            dropped.append(oldest.region_id)
        # A region added and evicted in the same call never reaches the model.
        gone = set(dropped)
        added_ids = {entry.region_id for entry in added}
        return (
            [entry for entry in added if entry.region_id not in gone],
            [region_id for region_id in dropped if region_id not in added_ids],
        )
