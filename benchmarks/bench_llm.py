"""Benchmark of the language model: prefill, time to first token, decoding, sparse attention.

    .venv/bin/python benchmarks/bench_llm.py [--out report.json] [--repeats N]

The real SmolLM2-135M-Instruct (converted into the models cache on first use), ONNX Runtime on
the CPU with its default threads:

1. Context prefill: ``set_context`` of contexts of about 32 to 512 tokens (each timed call gets
   a new text, so nothing is cached).
2. Time to first token of a 15-token question (25 with the chat template) with 40 regions of
   about 20 tokens in memory, attending to the top 4 regions and to all of them.
3. Decoding: time per output token of answers of up to 48 tokens to a question that asks for a
   list (greedy), with those 40 regions, top-4 and dense, and with no regions.
4. Visual KV entries attended per decoding step, dense / top-4 (target: at least 10×).

As nanoGPT's bench.py: warm up, then time; percentiles, not means. The targets: decoding at
least 40 tokens/s, attended visual KV at least 10× fewer with top-4 (40 regions of similar size,
so about 10× by construction). Settings come from ``GAZECAM_LLM_*`` as for the assistant
(e.g. ``GAZECAM_LLM_THREAD_SPINNING=1`` for an otherwise idle CPU). The machine may be shared:
compare runs by their p50, and rerun before trusting a change of a few percent.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from common import fmt, machine_info, pct, write_report  # benchmarks/common.py

from gazecam.llm import GenerationStats, LanguageModel, LLMSettings

TARGET_TOKENS_S = 40.0
TARGET_KV_RATIO = 10.0
QUESTION = "Which of the labels I looked at says how tight the bolt has to be?"  # 15 tokens
LIST_QUESTION = "List every label you see, one per line."  # a long answer, for decoding
CONTEXT = (
    "You are the assistant in a technician's smart glasses. Answer in one short sentence. "
    "Task: service the pump. The wearer is on step 3 of 6: tighten the flange bolts."
)
WORDS = [
    *("CHECK", "FUSE", "TORQUE", "BOLT", "VALVE", "PUMP", "OUTLET", "INLET", "PRESSURE"),
    *("WARNING", "CAUTION", "HOT", "MAX", "MIN", "FLANGE", "SEAL", "FILTER", "DRAIN", "VENT"),
    *("RESET", "POWER", "MOTOR", "COVER", "PANEL"),
]


def region_lines(count: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(id, text, gaze prior) of regions as the memory writes them, about 20 tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        label = " ".join(rng.choice(WORDS, 2)) + f" {rng.integers(1, 99)}"
        distance_px = int(rng.integers(0, 500))
        out.append((f"r{i}", f"- text '{label}', {distance_px} px from the gaze point", 0.0))
    return out


def answer(lm: LanguageModel, question: str, **kwargs: Any) -> GenerationStats:
    """Run a question to its end; its stats."""
    items = list(lm.generate(question, **kwargs))
    stats = items[-1]
    assert isinstance(stats, GenerationStats)
    return stats


def bench_prefill(lm: LanguageModel, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for words in (20, 50, 110, 230, 470):
        texts = [
            f"Note {i}: " + " ".join(["check the flange bolts"] * (words // 4))
            for i in range(repeats + 1)
        ]
        tokens = len(lm.tokenizer.encode(texts[0]))
        lm.set_context(texts[0])  # warm-up
        times_ms = []
        for text in texts[1:]:
            t0 = time.perf_counter()
            lm.set_context(text)
            times_ms.append((time.perf_counter() - t0) * 1e3)
        p = pct(times_ms, 50, 90)
        rows.append({"tokens": tokens, "ms": p, "tokens_s": tokens / p["p50"] * 1e3})
        print(f"  context {tokens:4d} tokens: {fmt(p)} ms   {rows[-1]['tokens_s']:6.0f} tok/s")
    return rows


def bench_question(lm: LanguageModel, repeats: int) -> dict[str, Any]:
    lm.set_context(CONTEXT)
    for region_id, text, prior in region_lines(40):
        lm.add_region(region_id, text, prior)
    sizes = [g.size for g in lm.cache.of_kind("region")]
    report: dict[str, Any] = {
        "regions": len(sizes),
        "region_tokens_mean": float(np.mean(sizes)),
        "question_tokens": len(lm.tokenizer.encode(QUESTION)),
    }
    print(
        f"  {len(sizes)} regions, {np.mean(sizes):.1f} tokens each on average "
        f"({sum(sizes)} visual KV entries); question {report['question_tokens']} tokens"
    )
    for name, k in (("top4", 4), ("dense", None)):
        answer(lm, QUESTION, top_k_regions=k, max_tokens=4)  # warm-up
        ttft = [answer(lm, QUESTION, top_k_regions=k, max_tokens=1).ttft_ms for _ in range(repeats)]
        runs = [answer(lm, LIST_QUESTION, top_k_regions=k, max_tokens=48) for _ in range(repeats)]
        tpot = [s.tpot_ms for s in runs]
        attended = [n for s in runs for n in s.attended_visual_kv[1:]]
        report[name] = {
            "ttft_ms": pct(ttft, 50, 90),
            "tpot_ms": pct(tpot, 50, 90),
            "tokens_s": 1e3 / float(np.median(tpot)),
            "generated_tokens": runs[0].generated_tokens,
            "attended_visual_kv_per_step": pct(attended, 50, 90)
            | {"mean": float(np.mean(attended))},
            "visual_kv_total": runs[0].visual_kv_total,
            "selected_regions": runs[0].selected_regions,
            # How often a decoding step's top-k differs from the step before's (then its
            # entries are laid out anew in the session's buffers; otherwise nothing is copied).
            "selection_changes_per_step": sum(s.selection_changes for s in runs)
            / max(1, sum(s.generated_tokens - 1 for s in runs)),
        }
    for region_id in lm.region_ids:
        lm.drop_region(region_id)
    answer(lm, QUESTION, max_tokens=4)
    runs = [answer(lm, LIST_QUESTION, max_tokens=48) for _ in range(repeats)]
    report["no_regions"] = {
        "ttft_ms": pct([s.ttft_ms for s in runs], 50, 90),
        "tpot_ms": pct([s.tpot_ms for s in runs], 50, 90),
        "tokens_s": 1e3 / float(np.median([s.tpot_ms for s in runs])),
    }
    dense = report["dense"]["attended_visual_kv_per_step"]["mean"]
    report["kv_ratio"] = dense / report["top4"]["attended_visual_kv_per_step"]["mean"]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/llm.json"))
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = LanguageModel(LLMSettings())
    load_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "machine": machine_info(onnxruntime=ort.__version__, providers=lm.session.get_providers()),
        "load_s": load_s,
    }
    print(
        f"onnxruntime {ort.__version__} on {lm.session.get_providers()}, {os.cpu_count()} cores; "
        f"model loaded in {load_s:.1f} s"
    )
    print("1. context prefill")
    report["prefill"] = bench_prefill(lm, args.repeats)
    print("2-4. question with 40 regions in memory")
    q = report["question"] = bench_question(lm, args.repeats)
    print(f"\n  {'':12s} {'TTFT ms':>9s} {'TPOT ms':>9s} {'tok/s':>7s} {'visual KV/step':>15s}")
    for name in ("top4", "dense", "no_regions"):
        r = q[name]
        kv = r.get("attended_visual_kv_per_step", {}).get("mean", 0.0)
        ttft, tpot = r["ttft_ms"]["p50"], r["tpot_ms"]["p50"]
        print(f"  {name:12s} {ttft:9.1f} {tpot:9.2f} {r['tokens_s']:7.1f} {kv:15.1f}")
    changes = q["top4"]["selection_changes_per_step"]
    print(f"  top-4 selection changed at {changes:.0%} of the decoding steps")
    tokens_s = q["top4"]["tokens_s"]
    report["targets"] = {
        "decode_tokens_s": {
            "value": tokens_s,
            "target": TARGET_TOKENS_S,
            "met": tokens_s >= TARGET_TOKENS_S,
        },
        "kv_ratio": {
            "value": q["kv_ratio"],
            "target": TARGET_KV_RATIO,
            "met": q["kv_ratio"] >= TARGET_KV_RATIO,
        },
    }
    for name, t in report["targets"].items():
        verdict = "met" if t["met"] else "missed"
        print(f"  target {name}: {t['value']:.2f} (≥ {t['target']:.0f}) {verdict}")
    write_report(report, args.out, t0)


if __name__ == "__main__":
    main()
