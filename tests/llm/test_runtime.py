"""The runtime on a tiny random-weight model: sparse attention is exact attention over the
chosen KV entries, regions come and go, positions stay in range."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.llama_graph import FORMAT_VERSION
from gazecam.errors import MissingDependencyError
from gazecam.llm import LanguageModel, LLMSettings, converted, decoder
from gazecam.llm.binding import BoundKV
from gazecam.llm.converted import converted_model_dir
from gazecam.llm.decoder import LOCAL_RESERVE
from gazecam.llm.kv import KVCache, KVGroup
from gazecam.llm.records import UnitGroup
from gazecam.llm.sampling import sample, stream_piece
from gazecam.models import ModelSettings
from tests.conftest import gguf_path
from tests.llm.conftest import answer
from tests.llm.reference import Reference

REGIONS = {
    "r0": ("- text 'PUSH', at the gaze point", 1.0),
    "r1": ("- a cup, 200 px from the gaze point", 0.2),
    "r2": ("- text 'MAX 3 BAR', 90 px from the gaze point", 0.5),
    "r3": ("- a valve, 30 px from the gaze point", 0.8),
    "r4": ("- text 'EXIT', 400 px from the gaze point", 0.0),
}


@dataclass
class Call:
    """One forward of the graph, as the runtime made it."""

    embeds: np.ndarray  # [T, hidden]: the new tokens' embeddings
    positions: list[int]
    attend: list[str]  # group ids, in the order their entries were given
    logits: np.ndarray


def record(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Record every forward the model makes from now on."""
    calls: list[Call] = []
    forward = lm._forward

    def spy(
        embeds: np.ndarray, positions: np.ndarray, attend: list[KVGroup], **kwargs: bool
    ) -> object:
        step = forward(embeds, positions, attend, **kwargs)
        calls.append(Call(embeds, positions.tolist(), [g.group_id for g in attend], step.logits))
        return step

    monkeypatch.setattr(lm, "_forward", spy)
    return calls


def fill(lm: LanguageModel) -> None:
    lm.set_context("You help with a pump. Step 2 of 4: open the valve.")
    for region_id, (text, prior) in REGIONS.items():
        lm.add_region(region_id, text, prior)


def reference_logits(model_dir: Path, calls: list[Call]) -> list[np.ndarray]:
    """Last-token logits of every call, from ONE numpy forward over all tokens whose mask is
    what each call attended to: its chosen groups' entries and, causally, its own tokens."""
    group_of_call = ["context", *(f"region:{r}" for r in REGIONS)]
    group_of_call += ["local"] * (len(calls) - len(group_of_call))
    indices: dict[str, list[int]] = {}
    embeds, positions, visible, last = [], [], [], []
    for call, group in zip(calls, group_of_call, strict=True):
        seen = [i for g in call.attend for i in indices.get(g, [])]
        start = len(positions)
        for t in range(len(call.embeds)):
            visible.append([*seen, *range(start, start + t + 1)])
        embeds.append(call.embeds)
        positions += call.positions
        indices.setdefault(group, []).extend(range(start, len(positions)))
        last.append(len(positions) - 1)
    mask = np.zeros((len(positions), len(positions)), bool)
    for i, row in enumerate(visible):
        mask[i, row] = True
    logits = Reference.load(model_dir).forward(np.concatenate(embeds), positions, mask).logits
    return [logits[i] for i in last]


@pytest.mark.parametrize("k", [None, len(REGIONS), 2])
def test_sparse_attention_is_exact_attention_over_the_chosen_entries(
    tiny_lm: LanguageModel, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, k: int | None
) -> None:
    calls = record(tiny_lm, monkeypatch)
    fill(tiny_lm)
    _, stats = answer(tiny_lm, "Which valve?", top_k_regions=k, max_tokens=5, temperature=0)
    question = calls[len(REGIONS) + 1]
    assert all(g.startswith("region:") for g in question.attend[1:]) and len(question.attend) == 6
    for call in calls[len(REGIONS) + 2 :]:  # decoding steps: context, chosen regions, local
        chosen = [g for g in call.attend if g.startswith("region:")]
        assert len(chosen) == (len(REGIONS) if k is None else k)
        assert call.attend == ["context", *chosen, "local"]
    expected = reference_logits(tiny_dir, calls)
    for call, logits in zip(calls, expected, strict=True):
        np.testing.assert_allclose(call.logits, logits, atol=1e-5)
    assert len(stats.attended_visual_kv) == len(calls) - len(REGIONS) - 1


def test_k_equal_to_all_regions_is_the_dense_path(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tiny_lm)
    runs = []
    for k in (None, len(REGIONS), 99):
        calls = record(tiny_lm, monkeypatch)
        text, _ = answer(tiny_lm, "Which valve?", top_k_regions=k, max_tokens=6, temperature=0)
        runs.append((text, [c.logits for c in calls]))
    for text, logits in runs[1:]:
        assert text == runs[0][0]
        for got, want in zip(logits, runs[0][1], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_top_k_attends_fewer_visual_entries(tiny_lm: LanguageModel) -> None:
    fill(tiny_lm)
    sizes = {g.group_id: g.size for g in tiny_lm.cache.of_kind("region")}
    total = sum(sizes.values())
    _, dense = answer(tiny_lm, "Which valve?", top_k_regions=None, max_tokens=6)
    _, sparse = answer(tiny_lm, "Which valve?", top_k_regions=2, max_tokens=6)
    assert dense.visual_kv_total == sparse.visual_kv_total == total
    assert set(dense.attended_visual_kv) == {total}
    assert sparse.attended_visual_kv[0] == total  # the question sees all regions, to choose
    largest_two = sum(sorted(sizes.values())[-2:])
    assert sparse.attended_visual_kv[1:]
    assert all(n <= largest_two < total for n in sparse.attended_visual_kv[1:])
    assert len(sparse.selected_regions) == 2


def test_the_first_token_does_not_wait_for_the_region_choice(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tiny_lm)
    events: list[str] = []
    choose = tiny_lm._choose

    def choosing(*args: Any) -> list[KVGroup]:
        chosen = choose(*args)
        events.append(f"choose {len(chosen)}")
        return chosen

    def sampling(*args: Any) -> int:
        events.append("token")
        return sample(*args)

    monkeypatch.setattr(tiny_lm, "_choose", choosing)
    monkeypatch.setattr(decoder, "sample", sampling)
    _, stats = answer(tiny_lm, "Which valve?", top_k_regions=2, max_tokens=3, temperature=0)
    assert events == ["token", "choose 2", "token", "choose 2", "token"]
    assert len(stats.selected_regions) == 2
    _, alone = answer(tiny_lm, "Which valve?", top_k_regions=2, max_tokens=1)
    assert alone.selected_regions == [] and alone.attended_visual_kv == [total_entries(tiny_lm)]


def total_entries(lm: LanguageModel) -> int:
    return lm.cache.entries("region") + lm.cache.entries("frame")


def test_gaze_prior_decides_when_weighted_heavily(tiny_dir: Path) -> None:
    lm = LanguageModel(LLMSettings(llm_model_dir=tiny_dir, llm_gaze_prior_weight=100.0))
    fill(lm)
    _, stats = answer(lm, "Which valve?", top_k_regions=2, max_tokens=2)
    assert stats.selected_regions == ["r0", "r3"]  # priors 1.0 and 0.8


def test_dropping_a_region_removes_its_entries(tiny_lm: LanguageModel) -> None:
    fill(tiny_lm)
    size = tiny_lm.cache.groups["region:r2"].size
    before = tiny_lm.cache.entries("region")
    capacity = tiny_lm.cache.keys.shape[2]
    assert tiny_lm.drop_region("r2") and not tiny_lm.drop_region("r2")
    assert tiny_lm.region_ids == ["r0", "r1", "r3", "r4"]
    assert tiny_lm.cache.entries("region") == before - size
    _, stats = answer(tiny_lm, "Which valve?", top_k_regions=None, max_tokens=3)
    assert stats.visual_kv_total == before - size
    assert set(stats.attended_visual_kv) == {before - size}
    tiny_lm.add_region("r2", REGIONS["r2"][0], 0.5)  # the freed slots are reused
    assert tiny_lm.cache.keys.shape[2] == capacity


def test_same_context_is_free_and_a_new_one_moves_the_regions(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tiny_lm)
    calls = record(tiny_lm, monkeypatch)
    tiny_lm.set_context("You help with a pump. Step 2 of 4: open the valve.")
    assert calls == []
    first = tiny_lm.cache.of_kind("region")[0]
    old_start = int(first.positions[0])
    tiny_lm.set_context("Step 3 of 4: close the valve slowly, then check the gauge.")
    context_end = tiny_lm.cache.end_position(("context",))
    assert len(calls) == 1 and int(first.positions[0]) == context_end != old_start
    starts = [int(g.positions[0]) for g in tiny_lm.cache.of_kind("region")]
    assert starts == sorted(starts) and starts[0] == context_end


def test_a_longer_context_packs_regions_that_sat_near_the_end(tiny_lm: LanguageModel) -> None:
    # Regions keep being added at the end of the positions (and the oldest dropped) until they
    # reach the reserve; a longer context then must not push them past the model's positions.
    tiny_lm.set_context("Pump.")
    limit = tiny_lm.max_positions - LOCAL_RESERVE
    for i in itertools.count():
        tiny_lm.add_region(f"k{i}", f"- text 'FRAME {i:02}' " + "x" * 20, 1.0)
        if len(tiny_lm.region_ids) > 3:
            tiny_lm.drop_region(tiny_lm.region_ids[0])
        if tiny_lm.cache.end_position() > limit - 50:
            break
    tiny_lm.set_context("A much longer task card. " * 24)  # 600 tokens more
    _, stats = answer(tiny_lm, "What frame?", max_tokens=3)
    assert stats.visual_kv_total == tiny_lm.cache.entries("region") > 0
    assert tiny_lm.cache.end_position(("region",)) < 800  # right after the new context


def test_shifting_keys_equals_computing_them_at_the_new_position(tiny_lm: LanguageModel) -> None:
    # Layer 0's keys depend only on the token and its position, so a shifted copy must equal
    # the keys computed at the new position.
    ids = tiny_lm.tokenizer.encode("- text 'PUSH'\n")
    embeds = tiny_lm.embeddings.lookup(ids)
    # The keys of a run are views of the session's buffers, valid until the next run.
    keys = {
        p: tiny_lm._forward(embeds, np.arange(p, p + len(ids)), []).keys.copy() for p in (7, 300)
    }
    cache = KVCache(2, 1, 64, 10000.0)
    group = cache.put("g", "region", keys[7], keys[7], np.arange(7, 7 + len(ids)))
    cache.shift(group, 293)
    assert group.positions.tolist() == list(range(300, 300 + len(ids)))
    np.testing.assert_allclose(cache.keys[0][:, group.slots], keys[300][0], atol=1e-5)


def test_regions_are_packed_when_positions_run_out(tiny_lm: LanguageModel) -> None:
    fill(tiny_lm)
    ends = []
    for i in range(150):  # keyframes come and go: add one, forget the oldest
        tiny_lm.add_region(f"k{i}", f"- text 'FRAME {i}', at the gaze point", 1.0)
        tiny_lm.drop_region(tiny_lm.region_ids[0])
        ends.append(tiny_lm.cache.end_position())
    assert max(ends) <= tiny_lm.max_positions - LOCAL_RESERVE
    assert any(b < a for a, b in itertools.pairwise(ends))  # packed at least once
    groups = tiny_lm.cache.of_kind("region")
    previous_ends = [tiny_lm.cache.end_position(("context",))] + [g.end_position for g in groups]
    assert all(g.positions[0] >= end for g, end in zip(groups, previous_ends, strict=False))
    _, stats = answer(tiny_lm, "What frame?", max_tokens=3)
    assert stats.visual_kv_total == tiny_lm.cache.entries("region")


def test_stream_pieces_hold_back_stop_prefixes_and_partial_characters() -> None:
    assert stream_piece("Hello wor", 0, ["world"]) == ("Hello ", 6, False)
    assert stream_piece("Hello world!", 6, ["world"]) == ("", 6, True)
    assert stream_piece("Hello\n\nUser:", 0, ["\n\nUser:"]) == ("Hello", 5, True)
    assert stream_piece("caf\ufffd", 0, []) == ("caf", 3, False)
    assert stream_piece("café", 3, []) == ("é", 4, False)


def test_sampling() -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, 0.0, 0.9, rng) == 1
    assert sample(logits, 1.0, 1e-6, rng) == 1  # top-p that keeps one token is greedy
    draws = [sample(logits, 1.0, 1.0, np.random.default_rng(seed)) for seed in range(200)]
    assert set(draws) >= {0, 1, 2} and draws.count(1) > draws.count(2) > draws.count(0)
    again = [sample(logits, 1.0, 1.0, np.random.default_rng(seed)) for seed in range(200)]
    assert draws == again


def test_max_tokens_and_seeded_sampling(tiny_lm: LanguageModel) -> None:
    fill(tiny_lm)
    _, stats = answer(tiny_lm, "Which valve?", max_tokens=4, temperature=0)
    assert stats.generated_tokens <= 4 and stats.stop_reason in ("max_tokens", "eos")
    if stats.stop_reason == "max_tokens":
        assert stats.generated_tokens == 4
    a = answer(tiny_lm, "Which valve?", max_tokens=8, temperature=1.0, top_p=0.95, seed=3)[0]
    b = answer(tiny_lm, "Which valve?", max_tokens=8, temperature=1.0, top_p=0.95, seed=3)[0]
    assert a == b


def test_converted_folder_format_matches_the_runtime(tiny_dir: Path) -> None:
    assert FORMAT_VERSION == converted.FORMAT_VERSION
    config = Reference.load(tiny_dir).config
    assert config["format_version"] == FORMAT_VERSION
    assert (config["chat_format"], config["weight_bits"]) == ("chatml", 4)


def test_conversion_without_the_engines_extra_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = ModelSettings(models_dir=tmp_path, model_path=[gguf_path().parent])
    monkeypatch.setitem(sys.modules, "onnx", None)  # "not installed"
    for module in ("engines.smollm2_onnx", "engines.llama_graph"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingDependencyError, match=r"'onnx'.*pip install 'gazecam\[engines\]'"):
        converted_model_dir(LLMSettings(), models)


def test_a_unit_is_prefilled_once_and_kept_as_interleaved_groups(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the vision-language engine keeps a keyframe: one pass over its sequence, then groups
    # whose tokens interleave (2×2 blocks of a token grid) and an always-attended frame group.
    tiny_lm.set_context("You help with a pump.")
    ids = tiny_lm.tokenizer.encode("- text 'PUSH', a cup and a valve, at the gaze point\n")
    embeds, n = tiny_lm.embeddings.lookup(ids), len(ids)
    split = [
        UnitGroup("frame:k", "frame", np.arange(2)),
        UnitGroup("region:k/a", "region", np.arange(2, n, 2), 1.0),
        UnitGroup("region:k/b", "region", np.arange(3, n, 2), 0.0),
    ]
    calls = record(tiny_lm, monkeypatch)
    tiny_lm.add_unit("k", embeds, split)
    assert len(calls) == 1 and calls[0].attend == ["context"]
    start = tiny_lm.cache.end_position(("context",))
    groups = tiny_lm.cache.groups
    assert groups["region:k/b"].positions.tolist() == list(range(start + 3, start + n, 2))
    assert {g.unit for g in tiny_lm.cache.units(("frame", "region"))["k"]} == {"k"}
    dense, stats = answer(tiny_lm, "Which valve?", top_k_regions=None, max_tokens=6)
    dense_logits = [c.logits for c in calls[1:]]
    assert stats.attended_visual_kv == [n] * len(stats.attended_visual_kv)
    # The same entries as one region: the same answer, the same logits (up to summation order).
    tiny_lm.add_unit("k", embeds, [UnitGroup("region:k", "region", np.arange(n))])
    assert set(tiny_lm.cache.groups) == {"context", "local", "region:k"}  # replaced
    del calls[:]
    assert answer(tiny_lm, "Which valve?", top_k_regions=None, max_tokens=6)[0] == dense
    for a, b in zip(dense_logits, [c.logits for c in calls], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Sparse: the frame group at every step, and one of the two regions.
    tiny_lm.add_unit("k", embeds, split)
    del calls[:]
    _, stats = answer(tiny_lm, "Which valve?", top_k_regions=1, max_tokens=4)
    for call in calls[1:]:  # the decoding steps
        assert call.attend[:2] == ["context", "frame:k"] and len(call.attend) == 4
    assert stats.attended_visual_kv[1:] and all(
        kv in (2 + len(split[1].tokens), 2 + len(split[2].tokens))
        for kv in stats.attended_visual_kv[1:]
    )
    # A new context packs the unit right after it, its layout kept.
    before = {g: tiny_lm.cache.groups[g].positions.copy() for g in ("frame:k", "region:k/b")}
    tiny_lm.set_context("A longer task card: " + "open the valve, " * 20)
    delta = tiny_lm.cache.end_position(("context",)) - start
    for g, positions in before.items():
        assert tiny_lm.cache.groups[g].positions.tolist() == (positions + delta).tolist()
    assert tiny_lm.drop_unit("k") and not tiny_lm.drop_unit("k")
    assert set(tiny_lm.cache.groups) == {"context", "local"}


def test_bound_buffers_hold_groups_whose_cache_slots_are_not_contiguous(
    tiny_lm: LanguageModel,
) -> None:
    fill(tiny_lm)
    tiny_lm.drop_region("r1")  # a hole in the cache's slots, which the next region fills first
    tiny_lm.add_region("r5", "- text 'CAUTION: HOT SURFACE, DO NOT TOUCH', 10 px away", 0.9)
    cache = tiny_lm.cache
    straddling = cache.groups["region:r5"]
    assert (np.diff(straddling.slots) != 1).any()
    groups = [cache.groups["context"], straddling, *cache.of_kind("region")[:2]]
    bound = tiny_lm._scratch
    bound.hold(groups, cache)
    slots = np.concatenate([g.slots for g in groups])
    held = slice(0, len(slots))
    np.testing.assert_array_equal(bound.keys[:, 0, :, held], cache.keys[:, :, slots])
    np.testing.assert_array_equal(bound.values[:, 0, :, held], cache.values[:, :, slots])


@pytest.mark.parametrize("k", [None, 2])
def test_a_step_copies_only_the_entries_the_bound_buffers_lack(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch, k: int | None
) -> None:
    fill(tiny_lm)
    # The memory's buffers got each region as it came (in the background): an ask copies none.
    memory, scratch = tiny_lm._memory, tiny_lm._scratch
    assert memory.copied_entries >= tiny_lm.cache.entries("region")
    runs: list[tuple[str, list[str], int]] = []  # buffers, attended groups, entries copied in

    def spying(name: str, bound: BoundKV) -> None:
        run = bound.run

        def spy(*args: Any) -> Any:
            before = bound.copied_entries
            out = run(*args)
            runs.append((name, [g.group_id for g in args[2]], bound.copied_entries - before))
            return out

        monkeypatch.setattr(bound, "run", spy)

    spying("memory", memory)
    spying("scratch", scratch)
    _, stats = answer(tiny_lm, "Which valve?", top_k_regions=k, max_tokens=12)
    assert runs[0][0] == "memory" and runs[0][2] == 0  # the question's pass over all regions
    steps = runs[1:]
    assert len(steps) == stats.generated_tokens - 1 >= 5
    if k is None:  # dense: every step on the memory's buffers, nothing copied
        assert all(name == "memory" and copied == 0 for name, _, copied in steps)
        assert stats.selection_changes == 0
        return
    assert all(name == "scratch" for name, _, _ in steps)
    for (_, before, _), (_, now, copied) in itertools.pairwise(steps):
        if now == [*before[:-1], "local"]:
            assert copied == 0  # the same regions: the new token's entries are in place
        else:  # another choice: the regions from the first that changed, and the local group
            assert copied > 0
    assert stats.selection_changes == sum(c > 0 for _, _, c in steps[1:])
