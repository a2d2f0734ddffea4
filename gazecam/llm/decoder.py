"""LanguageModel: a llama decoder on ONNX Runtime with our own KV cache, groups and decode loop.

One runtime for both answer engines: SmolLM2 with perception's regions as text (this class),
and SmolVLM's decoder with a vision encoder's visual tokens (``gazecam.vlm.engine``, a
subclass). The prompt is prefilled in independent pieces (see ``gazecam.llm.tokenizer``):

- the context (``set_context``) at positions 0..C-1, attending to itself;
- each region (``add_region``) as its own group at the next free positions, attending to the
  context only, so regions are independent and can be added whenever perception finishes (a
  keyframe's visual tokens are one such unit, kept as several groups: ``add_unit``);
- the question (``generate``) after the last region, in ONE pass attending to the context and
  ALL regions: it gives the question's KV entries, the first token, and the probe-layer queries
  that choose the top-k regions (``gazecam.llm.sparse``). Each decoding step then attends to
  the context, the top-k regions and the local group, and its probe query chooses again for
  the next step, so the attended regions can change while the answer is written.

Why not first a context-only pass to choose the regions, then a pass with only those: the
question's probe queries find the region it is about far better once they have seen the
regions (SmolLM2-135M, 12 regions, 8 questions: mean rank 2.5 and top-4 for 7 of 8, against
4.1 and 5 of 8), and with 40 regions (866 entries) in memory one pass over all of them takes
as long as the two passes (57 against 58 ms for a 25-token question on the 2-core CPU).

Positions only grow while regions are added; when they would run into the model's limit, the
regions in memory are packed right after the context by rotating their cached keys (``shift``).
Each question starts a new local group (no conversation history). The graph returns the last
token's logits only; its KV buffers stay bound to the session, holding the attended entries
(``gazecam.llm.binding``), so a decoding step copies only what changed. One ``generate`` at a
time; ``add_region``/``drop_region``/``set_context`` may come from other threads and take
effect between its steps (a lock guards the cache).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gazecam.assist.memory import MemoryRegion, MemorySettings
from gazecam.errors import ConfigError, first_line
from gazecam.llm.binding import BoundKV, Outputs
from gazecam.llm.converted import EMBEDDINGS, TokenEmbeddings, converted_model_dir
from gazecam.llm.kv import GroupKind, KVCache, KVGroup
from gazecam.llm.records import EngineInfo, GenerationStats, StopReason, UnitGroup
from gazecam.llm.sampling import sample, stream_piece
from gazecam.llm.settings import LLMSettings
from gazecam.llm.sparse import region_scores, select
from gazecam.llm.tokenizer import ChatTokenizer, Prompt, chat_format, region_prompt
from gazecam.models import ModelError, ModelSettings
from gazecam.records import Crop

CONTEXT, LOCAL = "context", "local"
LOCAL_RESERVE = 512  # positions kept free after the regions for a question and its answer
# A region's line ("- text 'CHECK FUSE', 12 px from the gaze point"): about 15 tokens; an OCR
# line across a whole 448 px crop stays well under this (the assistant cuts longer ones).
REGION_MAX_TOKENS = 64


class _Unset(Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET  # "use the settings' value"


class LanguageModel:
    """SmolLM2 with an always-kept context, droppable region groups and sparse attention."""

    def __init__(
        self, settings: LLMSettings | None = None, models: ModelSettings | None = None
    ) -> None:
        self.settings = settings or LLMSettings()
        model_dir = converted_model_dir(self.settings, models or ModelSettings())
        try:
            self.config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{model_dir}: no readable config.json ({exc})") from exc
        self.chat = chat_format(str(self.config.get("chat_format", "chatml")))
        self.tokenizer = ChatTokenizer.load(model_dir / "tokenizer.json", self.chat)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.llm_threads
        # Spinning only within a run: between steps numpy (selection, KV layout), and between
        # answers perception, need the same few cores.
        spinning = "1" if self.settings.llm_thread_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.force_spinning_stop", spinning)
        try:
            self.session = ort.InferenceSession(
                str(model_dir / "model.onnx"),
                sess_options=options,
                providers=self.settings.providers(),
            )
        except (RuntimeError, ValueError) as exc:  # onnxruntime's errors derive from these
            raise ModelError(
                f"{model_dir}: ONNX Runtime cannot load model.onnx ({first_line(exc)})"
            ) from exc
        self.embeddings = TokenEmbeddings.load(model_dir / EMBEDDINGS)
        c = self.config
        self.layers, self.max_positions = int(c["layers"]), int(c["max_positions"])
        self.probe_layer = int(c["probe_layer"])
        self.cache = KVCache(self.layers, c["kv_heads"], c["head_dim"], c["rope_base"])
        # Two sets of bound KV buffers: the memory's (context, frames and regions in memory
        # order, kept up to date as they change, so an ask's pass over all of them and dense
        # decoding copy nothing), and a scratch set for prefills and sparse decoding steps.
        self._memory = BoundKV(self.session, self.layers, c["kv_heads"], c["head_dim"])
        self._scratch = BoundKV(self.session, self.layers, c["kv_heads"], c["head_dim"])
        self._lock = threading.RLock()
        self._context_text: str | None = None
        self._probe_keys: tuple[tuple[int, ...], NDArray[np.float32]] = (
            (),
            np.zeros(0, np.float32),
        )
        # The whole-frame thumbnail width this engine wants beside each crop (0: none), and
        # the latest keyframe's vision encoding (the text engine has no encoder).
        self.thumbnail_px = 0
        self.last_encode_ms = 0.0
        self.info = EngineInfo(
            "text",
            str(c.get("name") or c.get("source")),
            bool(c.get("random_weights", c.get("source") == "random")),
        )

    def memory_tokens(self, memory: MemorySettings) -> tuple[int, str]:
        """The most positions a full visual memory takes (its regions' lines), and why."""
        return (
            memory.memory_max_regions * REGION_MAX_TOKENS,
            f"GAZECAM_MEMORY_MAX_REGIONS ({memory.memory_max_regions}) × {REGION_MAX_TOKENS} "
            "tokens",
        )

    def clear_memory(self) -> None:
        """Forget every keyframe's visual KV (the context stays)."""
        with self._lock:
            for unit in self.cache.units(("frame", "region")):
                self.cache.drop_unit(unit)
            self._hold_memory()

    @property
    def region_ids(self) -> list[str]:
        """The regions in memory, oldest first."""
        return [g.group_id.removeprefix("region:") for g in self.cache.of_kind("region")]

    def count_tokens(self, text: str | Prompt) -> int:
        """Tokens in text, or in a prompt (``set_context`` prefills ``chat.context(text)``)."""
        return len(
            self.tokenizer.encode(text)
            if isinstance(text, str)
            else self.tokenizer.encode_prompt(text)
        )

    def set_context(self, text: str) -> None:
        """Prefill the always-kept context; the same text again costs nothing.

        A changed context is prefilled anew. Regions already in memory keep the KV they were
        computed with against the old context (recomputing them would cost a prefill each);
        they are packed right after the new context. (Moving them only by the change in
        length could push regions that sit near the end of the positions past it.)
        """
        with self._lock:
            if text == self._context_text:
                return
            ids = self.tokenizer.encode_prompt(self.chat.context(text))
            self._check_positions(len(ids))
            step = self._forward(self.embeddings.lookup(ids), np.arange(len(ids)), [], memory=True)
            self.cache.drop(CONTEXT)
            positions = np.arange(len(ids))
            self._memory.label(
                self.cache.put(CONTEXT, "context", step.keys, step.values, positions)
            )
            self._pack()
            self._hold_memory()
            self._context_text = text

    def add_region(self, region_id: str, text: str, gaze_prior: float) -> None:
        """Prefill one region's text as its own KV group, attending to the context only.

        Its positions continue after the context and the regions in memory. A region_id
        already in memory is replaced. ``gaze_prior`` (0..1) is the gaze's vote for it.
        """
        ids = self.tokenizer.encode_prompt(region_prompt(text))
        group = UnitGroup(f"region:{region_id}", "region", np.arange(len(ids)), gaze_prior)
        self.add_unit(f"region:{region_id}", self.embeddings.lookup(ids), [group])

    def add_unit(self, unit: str, embeds: NDArray[np.float32], groups: Sequence[UnitGroup]) -> None:
        """Prefill a sequence ([T, hidden]: token embeddings, visual tokens) in ONE pass that
        attends to the context only, and keep its entries as these groups (each names the
        tokens it holds; together they cover the sequence). A unit already in memory is
        replaced. Its positions continue after the context and the units in memory.
        """
        with self._lock:
            self.cache.drop_unit(unit)
            start = self.cache.end_position()
            if start + len(embeds) > self.max_positions - LOCAL_RESERVE:
                start = self._pack()
            self._check_positions(start + len(embeds))
            positions = np.arange(start, start + len(embeds))
            step = self._forward(embeds, positions, self.cache.of_kind("context"))
            for g in groups:
                self.cache.put(
                    g.group_id, g.kind, step.keys[:, :, g.tokens], step.values[:, :, g.tokens],
                    positions[g.tokens], g.gaze_prior, unit,
                )  # fmt: skip
            self._hold_memory()

    def drop_unit(self, unit: str) -> bool:
        """Forget a unit's KV entries; False if it was not in memory."""
        with self._lock:
            dropped = self.cache.drop_unit(unit) > 0
            self._hold_memory()
            return dropped

    def _hold_memory(self) -> None:
        """Bring the memory's buffers up to date: context, frames, regions (as ``generate``
        attends them), copied now rather than when someone asks."""
        kinds: tuple[GroupKind, ...] = ("context", "frame", "region")
        self._memory.hold([g for kind in kinds for g in self.cache.of_kind(kind)], self.cache)

    def observe(self, crop: Crop, added: Sequence[MemoryRegion], dropped: Sequence[str]) -> None:
        """A keyframe's changes to the visual memory: its regions' lines in, old ones out."""
        for region_id in dropped:
            self.drop_region(region_id)
        for entry in added:
            self.add_region(entry.region_id, entry.text, entry.gaze_prior)

    def drop_region(self, region_id: str) -> bool:
        """Forget a region's KV entries; False if it was not in memory."""
        return self.drop_unit(f"region:{region_id}")

    def generate(
        self,
        question: str,
        *,
        answer_prefix: str = "",
        top_k_regions: int | _Unset | None = UNSET,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[str | GenerationStats]:
        """Answer a question: text pieces as they come, then one GenerationStats.

        ``answer_prefix``: the start of the answer, prefilled with the question (and not
        yielded), which the model continues. It is prefilled without trailing whitespace (BPE
        words carry their leading space); if it had some, the continuation's leading
        whitespace is dropped, so that prefix + pieces reads right.
        ``top_k_regions``: regions attended per step (None: all; unset: the settings' value,
        where 0 means all). Unset sampling arguments take the settings' values; temperature 0
        is greedy. Generation ends at the end-of-answer token, a stop string (not yielded) or
        ``max_tokens``.
        """
        s = self.settings
        if isinstance(top_k_regions, _Unset):
            top_k_regions = s.llm_top_k_regions or None
        return self._generate(
            self.chat.question(question, answer_prefix),
            answer_prefix != answer_prefix.rstrip(),
            top_k_regions,
            s.llm_max_tokens if max_tokens is None else max_tokens,
            s.llm_temperature if temperature is None else temperature,
            s.llm_top_p if top_p is None else top_p,
            [x for x in stop if x],
            np.random.default_rng(seed),
        )

    def _generate(
        self,
        prompt: Prompt,
        strip_leading_space: bool,
        k: int | None,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        rng: np.random.Generator,
    ) -> Iterator[str | GenerationStats]:
        started = time.perf_counter()
        ids = self.tokenizer.encode_prompt(prompt)
        with self._lock:
            self.cache.drop(LOCAL)
            position = self.cache.end_position()
            self._check_positions(position + len(ids))
            max_tokens = min(max_tokens, self.max_positions - position - len(ids))
            positions = np.arange(position, position + len(ids))
            frames, regions = self.cache.of_kind("frame"), self.cache.of_kind("region")
            context = [*self.cache.of_kind("context"), *frames]  # always attended
            embeds = self.embeddings.lookup(ids)
            step = self._forward(embeds, positions, [*context, *regions], memory=True)
            self._memory.label(self.cache.put(LOCAL, "local", step.keys, step.values, positions))
            frame_kv = sum(g.size for g in frames)
            attended = [frame_kv + sum(g.size for g in regions)]
        # The regions are chosen after the first token is out (it does not depend on them):
        # choosing costs a few ms (3.7 with 40 regions), which the first token need not wait.
        chosen: list[KVGroup] | None = None
        selected: list[str] = []
        changes = 0
        position += len(ids)
        generated: list[int] = []
        token_times: list[float] = []
        emitted = 0
        reason: StopReason = "max_tokens"
        while len(generated) < max_tokens:
            token = sample(step.logits, temperature, top_p, rng)
            token_times.append(time.perf_counter())
            if token in self.tokenizer.stop_ids:
                reason = "eos"
                break
            generated.append(token)
            text = self._text(generated, strip_leading_space)
            piece, emitted, hit = stream_piece(text, emitted, stop)
            if piece:
                yield piece
            if hit:
                reason = "stop"
                break
            if len(generated) == max_tokens:
                break
            with self._lock:  # groups may have come and gone since the last step
                frames = self.cache.of_kind("frame")
                context = [*self.cache.of_kind("context"), *frames]
                local = self.cache.groups[LOCAL]
                # The previous step's probe query chooses (for the first step, the question's).
                before, chosen = chosen, self._choose(step.probe, self.cache.of_kind("region"), k)
                if before is None:
                    selected = [g.group_id.removeprefix("region:") for g in chosen]
                else:
                    changes += [g.serial for g in chosen] != [g.serial for g in before]
                # In this order, not with the local group before the regions (which would then
                # stay in place when the choice changes): the order of the attended entries
                # changes attention's float sums, enough to flip near-ties (top-2 logit margins
                # of 0.006 on the parity prompts) and so the greedy answers.
                # Dense (every region chosen) decodes on the memory's buffers, sparse on the
                # scratch ones.
                dense = len(chosen) == len(self.cache.of_kind("region"))
                step = self._forward(
                    self.embeddings.lookup([token]),
                    np.array([position]),
                    [*context, *chosen, local],
                    memory=dense,
                )
                at = np.array([position])
                stored = self.cache.put(LOCAL, "local", step.keys, step.values, at)
                (self._memory if dense else self._scratch).label(stored)
            attended.append(sum(g.size for g in frames) + sum(g.size for g in chosen))
            position += 1
        if reason != "stop" and emitted < len(text := self._text(generated, strip_leading_space)):
            yield text[emitted:]  # held back for a stop string that did not come
        intervals = np.diff(token_times)
        yield GenerationStats(
            prompt_tokens=len(ids),
            generated_tokens=len(generated),
            ttft_ms=(token_times[0] - started) * 1e3 if token_times else 0.0,
            tpot_ms=float(intervals.mean()) * 1e3 if intervals.size else 0.0,
            attended_visual_kv=attended,
            visual_kv_total=self.cache.entries("region") + self.cache.entries("frame"),
            selected_regions=selected,
            selection_changes=changes,
            token_ids=generated,
            stop_reason=reason,
        )

    def _text(self, generated: list[int], strip_leading_space: bool) -> str:
        text = self.tokenizer.decode(generated)
        return text.lstrip() if strip_leading_space else text

    def _choose(
        self, probe: NDArray[np.float32], regions: list[KVGroup], k: int | None
    ) -> list[KVGroup]:
        """The top-k regions for a probe query [heads, T, head_dim] (all when k covers them)."""
        if k is None or k >= len(regions):
            return regions
        # The regions' probe-layer keys [kv_heads, N, head_dim], gathered once while the
        # regions stay the same (every decoding step chooses again).
        serials = tuple(g.serial for g in regions)
        if self._probe_keys[0] != serials:
            self._probe_keys = serials, self.cache.layer_keys(self.probe_layer, regions)
        keys = self._probe_keys[1]
        sizes = np.array([g.size for g in regions])
        priors = np.array([g.gaze_prior for g in regions])
        weight = self.settings.llm_gaze_prior_weight
        return [regions[i] for i in select(region_scores(probe, keys, sizes, priors, weight), k)]

    def _forward(
        self,
        embeds: NDArray[np.float32],
        positions: NDArray[np.int64],
        attend: Sequence[KVGroup],
        memory: bool = False,
    ) -> Outputs:
        """Run the graph on new tokens ([T, hidden] embeddings) attending to these groups'
        entries, on the memory's or the scratch buffers; the new entries' keys and values are
        valid until the next run on them."""
        bound = self._memory if memory else self._scratch
        return bound.run(embeds, positions, attend, self.cache)

    def _pack(self) -> int:
        """Move the units in memory right after the context, in order, each keeping its own
        layout (its groups' positions may interleave); their new end."""
        position = self.cache.end_position(("context",))
        units = self.cache.units(("frame", "region")).values()
        for groups in sorted(units, key=lambda gs: min(int(g.positions.min()) for g in gs)):
            start = min(int(g.positions.min()) for g in groups)
            span = max(g.end_position for g in groups) - start
            for g in groups:
                self.cache.shift(g, position - start)
            position += span
        return position

    def _check_positions(self, end: int) -> None:
        if end > self.max_positions:
            raise ConfigError(
                f"language model: {end} positions needed, the model has {self.max_positions}; "
                "keep fewer regions in memory or a shorter context"
            )
