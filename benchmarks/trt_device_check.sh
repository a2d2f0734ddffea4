#!/usr/bin/env bash
# Issue 11's device check, for a machine with an NVIDIA GPU (not run where none is lent):
# FP16 engines for every vision model (build time and size per engine), the GPU parity tests
# (engine vs ONNX Runtime on the CPU), and the vision models per provider tier on the synthetic
# demo's crops (CPU, CUDA EP, TensorRT EP, engines: perceive and per-model p50/p90, speed-up).
# Needs: pip install -e '.[dev,trt]', onnxruntime-gpu in place of onnxruntime, the models
# fetched (gazecam models fetch). Writes OUT/ (default /tmp/gazecam-trt).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gazecam-trt}
mkdir -p "$out"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import tensorrt, onnxruntime as o; print(tensorrt.__version__, o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"
gazecam engines build --precision fp16 2>&1 | tee "$out/build.txt"
python -m pytest -q -rs -s tests/trt/test_gpu_parity.py 2>&1 | tee "$out/parity.txt"
python - "$out/providers.json" <<'PY' 2>&1 | tee "$out/providers.txt"
import json, sys
from gazecam.bench.providers import bench_providers, format_providers
report = bench_providers("synthetic:demo", "auto", crops=48)
print(format_providers(report))
for tier, entry in report["tiers"].items():
    print(tier, {m: v["p50"] for m, v in (entry.get("models_ms") or {}).items()})
json.dump(report, open(sys.argv[1], "w"), indent=1)
PY
