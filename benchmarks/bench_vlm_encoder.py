"""Benchmark of the SmolVLM vision encoder (ONNX Runtime, CPU) on a RANDOM-weight 256m checkpoint.

    .venv/bin/python benchmarks/bench_vlm_encoder.py [--out report.json] [--repeats N]

1. Writes ``random-smolvlm-256m`` (engines/random_smolvlm.py: the real SmolVLM-256M-Instruct
   architecture, seeded random weights) and converts it (engines/smolvlm_onnx.py) into the
   encoders at 512 and 448, fp32 and int8, in a temporary folder; both steps are timed and run
   in child processes, so this process never imports torch and its peak RSS is the runtime's.
2. Parity on that checkpoint (a child process with transformers): the ONNX encoders' visual
   tokens against ``Idefics3Model.get_image_features`` for one tile of a scene crop.
3. Latency, single tile (the gaze crop, 448×448 px): preprocessing (``crop_pixels``: resized
   to 512, or kept at 448) and ``session.run``, p50/p90/max over ``--repeats`` runs after two
   warm-up runs, for each tile size and precision; and the whole 1600×1200 frame in the stock
   tiling (13 tiles of 512: ``frame_pixels`` then one run), the ``full`` mode's encode.
4. Achieved GFLOP/s: the encoder's FLOPs counted from its config (2 per multiply-add: patch
   embedding, 12 layers of attention projections, attention scores and sums, MLP, and the
   connector's projection) over the p50 of ``session.run``.

The target (issue 9): the gaze crop encoded in ≤ 800 ms p50 with int8 weights on this 2-core
CPU. ONNX Runtime uses its default threads (all usable cores). The machine may be shared:
compare runs by their p50.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from common import fmt, machine_info, pct, write_report  # benchmarks/common.py

from gazecam.sources.synthetic import DemoScene
from gazecam.vlm.preprocess import PreprocessConfig, crop_pixels, frame_pixels

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 800.0
CROP_PX = 448  # gazecam's gaze crop
PARITY = """
import json, sys
import numpy as np, onnxruntime as ort, torch
from transformers import Idefics3ForConditionalGeneration
from gazecam.sources.synthetic import DemoScene
from gazecam.vlm.preprocess import PreprocessConfig, crop_pixels
ckpt, enc = sys.argv[1], sys.argv[2]
model = Idefics3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
crop = np.ascontiguousarray(DemoScene(duration_s=5).render(30, 1.0)[300:748, 600:1048])
out = {}
for s in (512, 448):
    px = crop_pixels(crop, PreprocessConfig.load(__import__("pathlib").Path(ckpt)), s)
    with torch.no_grad():
        ref = model.model.get_image_features(torch.from_numpy(px)[None]).pooler_output[0].numpy()
    for v in ("", ".int8"):
        o = ort.InferenceSession(f"{enc}/vision_{s}{v}.onnx").run(None, {"pixel_values": px})[0]
        o = o.reshape(ref.shape)
        cos = (o * ref).sum(-1) / np.linalg.norm(o, axis=-1) / np.linalg.norm(ref, axis=-1)
        out[f"{s}{v or '.fp32'}"] = {"max_abs": float(np.abs(o - ref).max()),
            "ref_max_abs": float(np.abs(ref).max()), "cos_min": float(cos.min())}
print(json.dumps(out))
"""


def encoder_flops(config: dict[str, Any], tile_px: int) -> float:
    """FLOPs (2 per multiply-add) of one tile through the SigLIP encoder and the connector."""
    v = config["vision_config"]
    d, ffn, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, scale = v["patch_size"], config["scale_factor"]
    n = (tile_px // patch) ** 2
    macs = n * 3 * patch * patch * d  # patch embedding
    macs += layers * (n * 4 * d * d + 2 * n * n * d + 2 * n * d * ffn)  # qkvo, QKᵀ and AV, MLP
    macs += (n // scale**2) * d * scale**2 * config["text_config"]["hidden_size"]  # connector
    return 2.0 * macs


def run_step(desc: str, *args: str) -> float:
    """Run a child Python process from the repo root (output shown); its wall time in s."""
    print(f"{desc} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_runs(fn: Any, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of fn after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def bench_variant(path: Path, tile_px: int, ckpt: Path, repeats: int) -> dict[str, Any]:
    """Preprocessing and run times of one encoder on the gaze crop, and what they achieve.

    Run in a child process of its own (``--variant``), so that its peak RSS is this encoder's.
    """
    config = json.loads((ckpt / "config.json").read_text())
    pre = PreprocessConfig.load(ckpt)
    frame = DemoScene(duration_s=5).render(30, 1.0)
    crop = np.ascontiguousarray(frame[300 : 300 + CROP_PX, 600 : 600 + CROP_PX])
    before = rss_mb()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = crop_pixels(crop, pre, tile_px)
    pre_ms = time_runs(lambda: crop_pixels(crop, pre, tile_px), repeats)
    run_ms = time_runs(lambda: session.run(None, {"pixel_values": pixels}), repeats)
    total = [a + b for a, b in zip(pre_ms, run_ms, strict=True)]
    flops = encoder_flops(config, tile_px)
    out: dict[str, Any] = {
        "preprocess_ms": pct(pre_ms, 50, 90),
        "run_ms": pct(run_ms, 50, 90),
        "encode_ms": pct(total, 50, 90),
        "gflop": flops / 1e9,
        "gflop_s": flops / 1e9 / (float(np.percentile(run_ms, 50)) / 1e3),
        "session_rss_mb": rss_mb() - before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": path.stat().st_size / 1e6,
    }
    if tile_px == 512 and ".int8" in path.name:  # the stock-tiled whole frame: `full` mode
        tiles = frame_pixels(frame, pre)
        few = max(3, repeats // 3)
        tiling_ms = time_runs(lambda: frame_pixels(frame, pre), few)
        frame_ms = time_runs(lambda: session.run(None, {"pixel_values": tiles.pixel_values}), few)
        out["full_frame"] = {
            "tiles": len(tiles.pixel_values),
            "tiling_ms": pct(tiling_ms, 50, 90),
            "run_ms": pct(frame_ms, 50, 90),
        }
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    """Write, convert, check and time; print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/vlm_encoder.json"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variant", nargs=3, help=argparse.SUPPRESS)  # ONNX TILE_PX CHECKPOINT
    args = parser.parse_args()
    if args.variant:  # a child process: time one encoder, JSON on stdout
        onnx_path, tile_px, ckpt = args.variant
        print(json.dumps(bench_variant(Path(onnx_path), int(tile_px), Path(ckpt), args.repeats)))
        return
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(onnxruntime=ort.__version__)}
    with tempfile.TemporaryDirectory(prefix="gazecam-vlm-") as tmp:
        ckpt, enc = Path(tmp) / "random-smolvlm-256m", Path(tmp) / "vision"
        report["write_checkpoint_s"] = run_step(
            "writing random-smolvlm-256m (RANDOM weights)",
            *("-m", "engines.random_smolvlm", "--size", "256m", "--out", str(ckpt)),
        )
        report["convert_s"] = run_step(
            "converting it to ONNX", "-m", "engines.smolvlm_onnx", str(ckpt), str(enc)
        )
        print("parity with transformers ...", flush=True)
        parity = subprocess.run(
            [sys.executable, "-c", PARITY, str(ckpt), str(enc)],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        report["parity"] = json.loads(parity.stdout.strip().splitlines()[-1])

        variants: dict[str, Any] = {}
        for tile_px in (512, 448):
            for precision in ("fp32", "int8"):
                name = f"vision_{tile_px}{'.int8' if precision == 'int8' else ''}.onnx"
                print(f"timing {name} (its own process) ...", flush=True)
                child = subprocess.run(
                    [sys.executable, __file__, "--variant", str(enc / name), str(tile_px),
                     str(ckpt), "--repeats", str(args.repeats)],
                    cwd=REPO, check=True, capture_output=True, text=True,
                )  # fmt: skip
                variants[f"{tile_px} {precision}"] = json.loads(child.stdout)
        report["gaze_crop"] = variants
        report["load_average"] = os.getloadavg()

    written_s, convert_s = report["write_checkpoint_s"], report["convert_s"]
    print(f"\nrandom-smolvlm-256m (RANDOM weights): written in {written_s:.1f} s, "
          f"converted in {convert_s:.1f} s")  # fmt: skip
    print("parity with transformers (one tile of a scene crop):")
    for name, p in report["parity"].items():
        print(f"  {name:10s} max abs {p['max_abs']:.2e} (of {p['ref_max_abs']:.1f})"
              f"  cosine min {p['cos_min']:.5f}")  # fmt: skip
    print(f"gaze crop {CROP_PX}×{CROP_PX}, one tile (ms):")
    for name, v in variants.items():
        print(f"  {name:9s} encode {fmt(v['encode_ms'], '.0f')}  (run p50 "
              f"{v['run_ms']['p50']:.0f}, preprocess p50 {v['preprocess_ms']['p50']:.1f})  "
              f"{v['gflop']:.0f} GFLOP at {v['gflop_s']:.0f} GFLOP/s  "
              f"peak RSS {v['peak_rss_mb']:.0f} MB")  # fmt: skip
    full = variants["512 int8"]["full_frame"]
    print(f"whole frame, stock tiling ({full['tiles']} tiles, int8): tiling "
          f"{fmt(full['tiling_ms'], '.0f')} ms, run {fmt(full['run_ms'], '.0f')} ms")  # fmt: skip
    best = min(v["encode_ms"]["p50"] for k, v in variants.items() if k.endswith("int8"))
    report["target_met"] = {"gaze_crop_int8_p50_le_800_ms": best <= TARGET_MS}
    print(f"target: gaze crop int8 p50 ≤ {TARGET_MS:.0f} ms: best {best:.0f} ms "
          f"({'met' if best <= TARGET_MS else 'NOT met'}); load average "
          f"{' '.join(f'{x:.1f}' for x in report['load_average'])}")  # fmt: skip
    write_report(report, args.out, started)


if __name__ == "__main__":
    main()
