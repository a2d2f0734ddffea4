"""The vision-language engine's vision encoder on each provider tier this machine has, on a
RANDOM-weight SmolVLM-256M architecture: latency only, for the device check (issue 11).

    python benchmarks/vlm_encoder_tiers.py [--sizes 448 256] [--runs 50] [--out report.json]

1. Builds the SmolVLM-256M architecture with transformers' seeded initialisation
   (``engines.random_smolvlm.hf_config('256m')``: SigLIP base patch 16, pixel shuffle 4; NOT a
   trained model) and exports its vision tower at each tile size as ``gazecam models install``
   does (``engines.smolvlm_onnx.export_vision``, fp32), and that graph in FP16
   (``gazecam.trt.graphs.to_fp16``, the graph a strongly typed TensorRT build takes).
   Unlike bench_vlm_encoder.py it needs no tokenizer: no checkpoint folder is written.
2. Opens each graph through the runtime's provider chain (``open_session``) once per tier
   (cpu, cuda, tensorrt, engine where this machine has them; the FP16 graph on the GPU tiers
   only) and reports the tier the session REALLY runs on, or why it did not run.
3. Times one tile per run (the gaze crop at 448, the thumbnail at 256): two warm-up runs, then
   p50/p90/max over ``--runs``; the tiers take turns run by run.

The targets on an H100/H200 (issue 11): the gaze-crop vision encode <= 5 ms in FP16, and >= 20x
this project's 2-core CPU (take that CPU's p50 from a run there: the device's CPU has 16 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import pct  # benchmarks/common.py

from gazecam.models import ModelSettings
from gazecam.perception import PerceptionSettings
from gazecam.trt.cache import VLM_ENCODER
from gazecam.trt.graphs import to_fp16
from gazecam.trt.providers import TIERS, choices, open_session


def export_towers(sizes: list[int], folder: Path, seed: int) -> dict[str, Path]:
    """The random 256m vision tower's fp32 and FP16 graphs per tile size, by variant name."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from engines.random_smolvlm import hf_config
    from engines.smolvlm_onnx import export_vision

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config(**hf_config("256m"))).eval()
    graphs: dict[str, Path] = {}
    for size in sizes:
        start = time.perf_counter()
        fp32 = folder / f"vision_{size}.onnx"
        export_vision(model, size, fp32)
        graphs[f"{size} fp32"] = fp32
        graphs[f"{size} fp16"] = to_fp16(fp32, folder / f"vision_{size}.fp16.onnx")
        print(f"exported the {size} px tower in {time.perf_counter() - start:.1f} s", flush=True)
    return graphs


def open_tiers(
    graphs: dict[str, Path], models: ModelSettings
) -> tuple[dict[str, Any], dict[str, str]]:
    """A session per (variant, tier) that really runs on the tier; the others' reasons."""
    sessions: dict[str, Any] = {}
    not_run: dict[str, str] = {}
    for variant, path in graphs.items():
        size = int(variant.split()[0])
        for tier in TIERS:
            if tier == "cpu" and variant.endswith("fp16"):
                continue  # the CPU tier runs the fp32 graph (fp16 on a CPU is emulated)
            settings = PerceptionSettings(onnx_providers=tier, trt_precision="fp16")
            session = open_session(path, f"{VLM_ENCODER}{size}", settings, models)
            choice = choices()[f"{VLM_ENCODER}{size}"]
            name = f"{variant} {tier}"
            if choice.tier == tier:
                sessions[name] = session
            else:
                not_run[name] = dict(choice.skipped).get(tier, f"it runs on {choice.tier}")
    return sessions, not_run


def time_sessions(sessions: dict[str, Any], runs: int, seed: int) -> dict[str, list[float]]:
    """Milliseconds per run of each session on one random tile of its size, in turns."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, session in sessions.items():
        size = int(name.split()[0])
        feeds[name] = {"pixel_values": rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)}
        for _ in range(2):  # warm-up: allocations, cuDNN's algorithm search
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for i in range(runs):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 256])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/vlm_tiers.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_towers(args.sizes, Path(tmp), args.seed)
        sessions, not_run = open_tiers(graphs, ModelSettings(models_dir=Path(tmp) / "cache"))
        times = time_sessions(sessions, args.runs, args.seed)
    report: dict[str, Any] = {
        "model": "random-smolvlm-256m vision tower (RANDOM weights: latency only)",
        "ms": {name: pct(values, 50, 90) for name, values in times.items()},
        "not_run": not_run,
    }
    cpu = {s: report["ms"].get(f"{s} fp32 cpu") for s in args.sizes}
    for name, stats in report["ms"].items():
        base = cpu[int(name.split()[0])]
        ratio = f"  {base['p50'] / stats['p50']:.1f}x the CPU" if base and "cpu" not in name else ""
        print(f"{name:18} p50 {stats['p50']:8.2f} ms  p90 {stats['p90']:8.2f} ms{ratio}")
    for name, why in not_run.items():
        print(f"{name:18} not run: {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
