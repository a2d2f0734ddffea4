#!/usr/bin/env bash
# Issue 11's device check, for a machine with an NVIDIA GPU (not run where none is lent):
# 1. the platform as gazecam probes it, and each vision model's provider choice;
# 2. FP16 engines for every vision model (build time and size per engine, or the one-line
#    reason none was built);
# 3. the GPU parity tests (each GPU tier against ONNX Runtime on the CPU);
# 4. the vision models per provider tier on the synthetic demo's crops (CPU, CUDA EP, TensorRT
#    EP, engines: perceive and per-model p50/p90, speed-up);
# 5. the vision-language encoder per tier on a RANDOM-weight SmolVLM-256M tower (latency only).
# Each step runs under its own time limit and a failing step does not stop the next: the
# report says what ran. Arguments name the steps to run (default: all). Needs: gazecam importable (pip install -e '.[dev,trt]'), onnxruntime-gpu
# in place of onnxruntime, the models fetched (gazecam models fetch), torch and transformers for
# step 5. Writes OUT/ (default /tmp/gazecam-trt).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gazecam-trt}
py=${PYTHON:-python3}
mkdir -p "$out"
only=" $* "
step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.txt, say how it ended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
step platform 60 bash -c "nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
$py -c 'from gazecam.trt import probe_platform; print(probe_platform())'
$py -m gazecam models list"
step build 300 "$py" -m gazecam engines build --precision fp16
step parity 300 "$py" -m pytest -p no:cacheprovider -q -rs -s tests/trt/test_gpu_parity.py
step providers 300 "$py" - "$out/providers.json" <<'PY'
import json, sys
from gazecam.bench.providers import bench_providers, format_providers
report = bench_providers("synthetic:demo", "auto", crops=48)
print(format_providers(report))
for tier, entry in report["tiers"].items():
    print(tier, {m: v["p50"] for m, v in (entry.get("models_ms") or {}).items()})
    print("  runs on", {m: c["tier"] for m, c in entry["runs_on"].items()})
json.dump(report, open(sys.argv[1], "w"), indent=1)
PY
step vlm 300 "$py" benchmarks/vlm_encoder_tiers.py --sizes 448 256 --runs 50 --out "$out/vlm.json"
