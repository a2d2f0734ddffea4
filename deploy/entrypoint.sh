#!/bin/sh
# The GPU containers' entrypoint (deploy/jetson, deploy/gpu). POSIX sh: the L4T and CUDA base
# images have no bash guarantee, and tests/test_deploy.py runs it with fake `gazecam` and
# `nvidia-smi` on PATH.
#
#   entrypoint.sh [serve [FLAGS]]     fetch missing models, build or check the TensorRT engines
#                                     where a GPU is visible, then serve (always: a failed build
#                                     leaves the fallback providers, which /v1/status names)
#   entrypoint.sh build-engines [FLAGS]   fetch missing models, then `gazecam engines build FLAGS`
#                                     (exit 2 with one line where no GPU is visible)
#   entrypoint.sh COMMAND...          run COMMAND (e.g. gazecam models list)
set -u

say() {
    echo "gazecam-entrypoint: $*" >&2
}

# An NVIDIA GPU this container may use: nvidia-smi lists one (x86, with the NVIDIA Container
# Toolkit), or the Jetson's integrated GPU's device nodes are mapped in (runtime: nvidia).
gpu_visible() {
    if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        return 0
    fi
    [ -e /dev/nvhost-ctrl-gpu ] || [ -e /dev/nvgpu/igpu0 ]
}

# `gazecam models fetch` finds the models already in the cache volume and fetches the others.
fetch_models() {
    gazecam models fetch || {
        status=$?
        say "models not fetched (exit $status, its reason above): not serving"
        exit "$status"
    }
}

case "${1:-serve}" in
serve)
    [ $# -gt 0 ] && shift
    fetch_models
    if ! gpu_visible; then
        say "no NVIDIA GPU visible (nvidia-smi -L, /dev/nvgpu): engines not built, serving on the CPU"
    else
        # Every start: up-to-date engines are kept (a quick check), stale ones (another
        # TensorRT after a JetPack upgrade, another GPU) are rebuilt. gazecam's own error is
        # one line (exit 2), folded into this one; anything else (a crash) is shown whole.
        errors=$(mktemp)
        if gazecam engines build 2>"$errors"; then
            cat "$errors" >&2
            say "engines ready"
        else
            status=$?
            [ "$status" -eq 2 ] || cat "$errors" >&2
            say "engines not built (exit $status: $(tail -n 1 "$errors")): serving on the fallback providers"
        fi
        rm -f "$errors"
    fi
    exec gazecam serve "$@"
    ;;
build-engines)
    shift
    fetch_models
    if ! gpu_visible; then
        say "no NVIDIA GPU visible (nvidia-smi -L, /dev/nvgpu): cannot build engines"
        exit 2
    fi
    exec gazecam engines build "$@"
    ;;
*)
    exec "$@"
    ;;
esac
