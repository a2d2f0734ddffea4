"""The decoder's KV buffers, bound to the ONNX Runtime session: a step without avoidable copies.

The graph (``engines/llama_graph.py``) attends to the first P entries of per-layer KV buffers
[1, Hk, C, 64] and writes the new tokens' entries right after them. Each buffer is bound as
both the layer's past input and its present output (I/O binding), so GroupQueryAttention
writes in place, and a step copies nothing it does not have to:

- the buffers remember which groups' entries they hold, in order (``layout``: segments, a
  group's entries in order, possibly in several segments); a step keeps the longest start of
  that layout whose groups it attends, and copies in from the cache only the entries missing
  from it (attention does not depend on the order of the past entries: their keys carry
  their positions). A decoding step that attends the same groups as the last one copies
  nothing; one whose top-k changed copies the regions from the first one that changed, and
  the local group after them;
- the new entries of a step land after the attended ones; ``label`` records them as the next
  entries of the group they were stored in (the question and answer's local group), so the
  next step finds them in place.

A group is known by its id and serial (``KVGroup.serial``: new for every group made, and
after a ``shift``), so a group replaced or moved is never taken for its old entries.

Per-layer float32 buffers, not one tensor per kind: a graph input costs ONNX Runtime about
0.1 µs a run, while slicing one tensor per layer inside the graph would copy it and stop the
in-place writes; float16 buffers changed 3 of the 8 parity answers and decoded no faster on
x86 (``benchmarks/README.md``, bench_peers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gazecam.llm.kv import KVCache, KVGroup

F32 = NDArray[np.float32]


@dataclass(slots=True)
class Segment:
    """Entries of one group, laid out contiguously in the buffers."""

    group_id: str
    serial: int  # the group's serial when they were written; -1: entries no group claimed
    count: int


@dataclass(frozen=True, slots=True)
class Outputs:
    """One run's outputs; ``keys``/``values`` are views of the new entries in the buffers,
    valid until the next run."""

    logits: F32  # [V], last token
    keys: F32  # [layers, kv_heads, T, head_dim]
    values: F32
    probe: F32  # [heads, T, head_dim]


class BoundKV:
    """Per-layer KV buffers bound to a session, and the groups they hold."""

    def __init__(self, session: Any, layers: int, kv_heads: int, head_dim: int) -> None:
        import onnxruntime as ort

        self.session = session
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.layout: list[Segment] = []
        self.copied_entries = 0  # entries copied in from the cache (all runs), for benchmarks
        self._binding: Any = None
        self.keys: F32 = np.zeros(0, np.float32)
        self.values: F32 = np.zeros(0, np.float32)
        # A one-token step's outputs go to arrays of their fixed shapes, bound for it, so that
        # nothing reads back every output (``get_outputs`` wraps all 2·layers + 2 of them,
        # 0.3 ms a step).
        shapes = {o.name: o.shape for o in session.get_outputs()}
        self._step_logits = np.zeros((1, 1, shapes["logits"][2]), np.float32)
        self._step_probe = np.zeros((1, shapes["probe_query"][1], 1, head_dim), np.float32)
        self._step_outputs = {  # each shares its array's memory
            "logits": ort.OrtValue.ortvalue_from_numpy(self._step_logits),
            "probe_query": ort.OrtValue.ortvalue_from_numpy(self._step_probe),
        }
        self._allocate(1024)

    @property
    def capacity(self) -> int:
        """Entries each buffer holds."""
        return int(self.keys.shape[3])

    def _allocate(self, capacity: int) -> None:
        """New buffers [layers, 1, Hk, capacity, 64] (what they held is forgotten)."""
        import onnxruntime as ort

        shape = (self.layers, 1, self.kv_heads, capacity, self.head_dim)
        self.keys, self.values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        binding = self.session.io_binding()
        for i in range(self.layers):
            for kind, buffers in (("key", self.keys), ("value", self.values)):
                value = ort.OrtValue.ortvalue_from_numpy(buffers[i])  # shares its memory
                binding.bind_ortvalue_input(f"past_{kind}_{i}", value)
                binding.bind_ortvalue_output(f"present_{kind}_{i}", value)
        self._binding = binding
        self.layout = []

    def run(
        self, embeds: F32, positions: NDArray[np.int64], attend: Sequence[KVGroup], cache: KVCache
    ) -> Outputs:
        """Run the graph on new tokens ([T, hidden]) attending to these groups' entries."""
        past = self._prepare(attend, cache, len(embeds))
        binding = self._binding
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32)[None])
        binding.bind_cpu_input("position_ids", np.asarray(positions, np.int64)[None])
        binding.bind_cpu_input("past_length", np.array([past], np.int64))
        # Bound anew each run: ONNX Runtime keeps the last run's outputs bound, of its T.
        if len(embeds) == 1:
            for name, value in self._step_outputs.items():
                binding.bind_ortvalue_output(name, value)
            self.session.run_with_iobinding(binding)
            # Copies (200 KB): the caller reads them after releasing its lock, when another
            # one-token run on these buffers could overwrite the bound arrays.
            logits, probe = self._step_logits.copy(), self._step_probe.copy()
        else:
            binding.bind_output("logits")
            binding.bind_output("probe_query")
            self.session.run_with_iobinding(binding)
            *_, logits_value, probe_value = binding.get_outputs()  # bound in this order
            logits, probe = logits_value.numpy(), probe_value.numpy()
        new = slice(past, past + len(embeds))
        self.layout.append(Segment("", -1, len(embeds)))
        return Outputs(
            logits=logits[0, -1],
            keys=self.keys[:, 0, :, new],
            values=self.values[:, 0, :, new],
            probe=probe[0],
        )

    def label(self, group: KVGroup) -> None:
        """The last run's new entries are the end of ``group`` (now stored in the cache)."""
        new = self.layout.pop()
        held = sum(s.count for s in self.layout if (s.group_id, s.serial) == _key(group))
        if held + new.count == group.size:  # else not the group's entries in order: not kept
            self.layout.append(Segment(group.group_id, group.serial, new.count))

    def hold(self, groups: Sequence[KVGroup], cache: KVCache) -> None:
        """Lay these groups' entries out now (in the background, before a run needs them)."""
        self._prepare(groups, cache, 0)

    def _prepare(self, attend: Sequence[KVGroup], cache: KVCache, new: int) -> int:
        """Lay out the attended groups' entries first in the buffers; their number (P)."""
        needed = sum(g.size for g in attend) + new
        if needed > self.capacity:
            self._allocate(max(2 * self.capacity, needed))
        wanted = {_key(g): g for g in attend}
        held = dict.fromkeys(wanted, 0)  # entries of each group in the kept segments
        kept, past = 0, 0
        for segment in self.layout:
            key = (segment.group_id, segment.serial)
            if key not in wanted or held[key] + segment.count > wanted[key].size:
                break
            held[key] += segment.count
            past += segment.count
            kept += 1
        del self.layout[kept:]
        for key, group in wanted.items():  # the entries the kept segments lack, in order
            if held[key] < group.size:
                self._write(cache, group.slots[held[key] :], past)
                self.layout.append(Segment(group.group_id, group.serial, group.size - held[key]))
                past += group.size - held[key]
        return past

    def _write(self, cache: KVCache, slots: NDArray[np.int64], at: int) -> None:
        # Run by run of consecutive slots (a group's entries mostly are one run): a slice
        # copies straight from the cache, where fancy indexing would gather into a temporary
        # first (about 4x slower for a sparse step's few MB).
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        for run in np.split(slots, breaks):
            first, n = int(run[0]), len(run)
            self.keys[:, 0, :, at : at + n] = cache.keys[:, :, first : first + n]
            self.values[:, 0, :, at : at + n] = cache.values[:, :, first : first + n]
            at += n
        self.copied_entries += len(slots)


def _key(group: KVGroup) -> tuple[str, int]:
    return group.group_id, group.serial
