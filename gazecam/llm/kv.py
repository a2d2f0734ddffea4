"""Our own KV cache: per layer, the RoPE'd keys and the values of every cached token, in groups.

Entries live in two arrays ``keys``/``values`` of shape [layers, kv_heads, capacity, head_dim]
(grown by doubling); a group owns a set of slots in them, not necessarily contiguous, and the
RoPE positions of its tokens. Groups:

- ``context``: the always-kept text (system prompt, task card, current step);
- ``frame``: a keyframe's always-attended visual tokens (the vision-language engine's
  whole-frame thumbnail and the image's marker tokens: peripheral vision);
- ``region``: one per visual region, with the gaze prior perception gave it (a line of text,
  or a block of a keyframe's visual tokens);
- ``local``: the question and the generated tokens.

Groups prefilled together in one pass (a keyframe's frame and region groups) form a ``unit``:
they are moved and forgotten together, and their positions may interleave (a 2×2 block of an
image's token grid is not contiguous in the sequence).

The model attends to any subset: ``gazecam.llm.binding`` lays the chosen groups' entries out
in the session's KV buffers (copying only what they do not hold yet). Keys are cached already
rotated, so a group can be moved to other positions by rotating its keys further (``shift``):
RoPE turns each pair (2i, 2i + 1) of a key at position p by p·θ_i, and turning it by δ·θ_i
more is the same key at p + δ (what the model would have computed, up to the attention to the
context, which is not recomputed).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

GroupKind = Literal["context", "frame", "region", "local"]
F32 = NDArray[np.float32]


_serials = itertools.count()


@dataclass(slots=True)
class KVGroup:
    """A named set of cache entries."""

    group_id: str
    kind: GroupKind
    slots: NDArray[np.int64]  # [n]: where its entries live in the cache arrays
    positions: NDArray[np.int64]  # [n]: their RoPE positions
    gaze_prior: float = 0.0  # regions: 0..1, 1 = under the gaze point
    unit: str = ""  # the groups prefilled with it in one pass ("": only itself)
    # New for every group made and after every shift: entries copied elsewhere (the session's
    # KV buffers) are known to be this group's as they are now only while it is unchanged.
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def size(self) -> int:
        """Number of entries (tokens)."""
        return int(self.slots.size)

    @property
    def end_position(self) -> int:
        """One past its last position (0 when empty)."""
        return int(self.positions.max()) + 1 if self.size else 0


class KVCache:
    """Keys and values of all cached tokens, grouped; see the module docstring."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        rope_base: float,
        capacity: int = 512,
    ) -> None:
        self.inv_freq = rope_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self.keys: F32 = np.zeros((layers, kv_heads, capacity, head_dim), np.float32)
        self.values: F32 = np.zeros_like(self.keys)
        self._used = np.zeros(capacity, bool)
        self.groups: dict[str, KVGroup] = {}  # in insertion order

    def put(
        self,
        group_id: str,
        kind: GroupKind,
        keys: F32,
        values: F32,
        positions: NDArray[np.int64],
        gaze_prior: float = 0.0,
        unit: str = "",
    ) -> KVGroup:
        """Store new entries ([layers, kv_heads, T, head_dim], T positions) in a group.

        A new group_id makes a new group; an existing one is extended (the local group grows
        by a token per step).
        """
        slots = self._allocate(keys.shape[2])
        self.keys[:, :, slots] = keys
        self.values[:, :, slots] = values
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = KVGroup(
                group_id, kind, slots, positions, gaze_prior, unit or group_id
            )
        else:
            group.slots = np.concatenate([group.slots, slots])
            group.positions = np.concatenate([group.positions, positions])
        return group

    def drop(self, group_id: str) -> bool:
        """Forget a group and free its slots; False if there was none."""
        group = self.groups.pop(group_id, None)
        if group is None:
            return False
        self._used[group.slots] = False
        return True

    def drop_unit(self, unit: str) -> int:
        """Forget every group of a unit; how many there were."""
        members = [g.group_id for g in self.groups.values() if g.unit == unit]
        for group_id in members:
            self.drop(group_id)
        return len(members)

    def units(self, kinds: Sequence[GroupKind]) -> dict[str, list[KVGroup]]:
        """The groups of these kinds by unit, units in insertion order."""
        units: dict[str, list[KVGroup]] = {}
        for g in self.groups.values():
            if g.kind in kinds:
                units.setdefault(g.unit, []).append(g)
        return units

    def of_kind(self, kind: GroupKind) -> list[KVGroup]:
        """The groups of one kind, oldest first."""
        return [g for g in self.groups.values() if g.kind == kind]

    def entries(self, kind: GroupKind) -> int:
        """Total entries in the groups of one kind."""
        return sum(g.size for g in self.of_kind(kind))

    def end_position(self, kinds: Sequence[GroupKind] = ("context", "frame", "region")) -> int:
        """One past the last position used by groups of these kinds."""
        return max((g.end_position for g in self.groups.values() if g.kind in kinds), default=0)

    def layer_keys(self, layer: int, groups: Sequence[KVGroup]) -> F32:
        """One layer's keys of these groups' entries, concatenated: [kv_heads, N, head_dim]."""
        keys: F32 = self.keys[layer][:, np.concatenate([g.slots for g in groups])]
        return keys

    def shift(self, group: KVGroup, delta: int) -> None:
        """Move a group by delta positions: rotate its keys by delta·θ_i per pair (2i, 2i+1)."""
        if delta == 0 or group.size == 0:
            return
        angles = delta * self.inv_freq  # [head_dim / 2]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        k = self.keys[:, :, group.slots]  # [layers, kv_heads, n, head_dim]
        even, odd = k[..., 0::2].copy(), k[..., 1::2].copy()
        k[..., 0::2] = even * cos - odd * sin
        k[..., 1::2] = even * sin + odd * cos
        self.keys[:, :, group.slots] = k
        group.positions = group.positions + delta
        group.serial = next(_serials)

    def _allocate(self, count: int) -> NDArray[np.int64]:
        free = np.flatnonzero(~self._used)
        if free.size < count:
            self._grow(max(2 * self._used.size, self._used.size - free.size + count))
            free = np.flatnonzero(~self._used)
        slots = free[:count].astype(np.int64)
        self._used[slots] = True
        return slots

    def _grow(self, capacity: int) -> None:
        old = self._used.size
        shape = (*self.keys.shape[:2], capacity, self.keys.shape[3])
        keys, values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        keys[:, :, :old], values[:, :, :old] = self.keys, self.values
        self.keys, self.values = keys, values
        self._used = np.concatenate([self._used, np.zeros(capacity - old, bool)])
