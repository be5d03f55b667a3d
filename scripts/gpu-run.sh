#!/usr/bin/env bash
# The GPU check, run from a bundle that scripts/gpu-bundle.sh made (it is
# copied there as run.sh).  Each step has its own timeout and all of them
# finish within 8 minutes; each writes OUT/STEP.log, and OUT/summary.txt
# gets one line a step: PASS, FAIL (exit code), SKIP (the reason) or
# TIMEOUT, with its seconds.  OUT is $OUT (the device tool's folder), else
# logs/ beside this script.  Exit 0 when no step failed or timed out.
#
# Steps: the bundle's own check (every library resolves: CPU only); the
# device probe; test-cuda-backend (the CUDA backend and the layer forward
# through a GPU cache tier against fp64); test-cuda-quant (the quantized
# expert kernels, FP8, INT8, INT4, MXFP4, against fp64 and the CPU);
# test-cuda-lost (a sticky CUDA error loses the device: -ENOTRECOVERABLE);
# test-nccl; bench-gpu-moe (decode against a device-to-device copy,
# prefill against one cuBLAS GEMM, page-in against a pinned copy, quantized
# decode in GB/s); torch's MoE block on the same shapes.  Without a device,
# every GPU step is skipped with the probe's reason.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/logs}
mkdir -p "$out"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
budget=${MOED_GPU_CHECK_SECONDS:-470}
start=$SECONDS
summary=$out/summary.txt
: >"$summary"
failed=0
gpu_reason=

note() { echo "$*" | tee -a "$summary"; }

# step NAME TIMEOUT CMD...: runs CMD within min(TIMEOUT, what is left).
step() {
    local name=$1 limit=$2 rc t0 left reason
    shift 2
    left=$((budget - (SECONDS - start)))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -le 5 ]; then
        note "SKIP    $name: the check's $budget s are spent"
        return 0
    fi
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    case $rc in
    0) note "PASS    $name ($((SECONDS - t0)) s)" ;;
    77)
        reason=$(grep -m1 -i '^skip' "$out/$name.log" || tail -n 1 "$out/$name.log")
        note "SKIP    $name: ${reason#SKIP: }"
        ;;
    124 | 137)
        note "TIMEOUT $name (after $limit s)"
        failed=1
        ;;
    *)
        note "FAIL    $name (exit $rc, $((SECONDS - t0)) s; see $name.log)"
        failed=1
        ;;
    esac
    return 0
}

gpu_step() {
    if [ -n "$gpu_reason" ]; then
        note "SKIP    $1: $gpu_reason"
        return 0
    fi
    step "$@"
}

note "GPU check from $(head -n 1 "$here/BUNDLE" 2>/dev/null || echo 'an unknown bundle') on $(hostname)"

# CPU only: every library of every binary resolves here.
check_libs='bad=0
for b in "$0"/bin/*; do
    if ldd "$b" | grep -q "not found"; then
        echo "$(basename "$b") lacks: $(ldd "$b" | grep "not found" | awk "{print \$1}" | tr "\n" " ")"
        bad=1
    fi
done
[ $bad = 0 ] && echo "every library of $(ls "$0/bin" | tr "\n" " ")resolves"
exit $bad'
step bundle-libraries 20 bash -c "$check_libs" "$here"

step probe 30 "$here/bin/test-cuda-probe"
if ! grep -q '^PASS    probe' "$summary"; then
    gpu_reason="the probe found no usable device ($(head -n 1 "$out/probe.log" 2>/dev/null))"
fi

gpu_step test-cuda-backend 200 "$here/bin/test-cuda-backend"
gpu_step test-cuda-quant 60 "$here/bin/test-cuda-quant"
gpu_step test-cuda-lost 20 "$here/bin/test-cuda-lost"
if [ -x "$here/bin/test-nccl" ]; then
    gpu_step test-nccl 45 "$here/bin/test-nccl"
else
    note "SKIP    test-nccl: not in the bundle (moed was built without NCCL)"
fi
gpu_step bench-gpu-moe 120 "$here/bin/bench-gpu-moe"

py=$(command -v python3 || true)
if [ -z "$py" ] || ! "$py" -c 'import torch' 2>/dev/null; then
    note "SKIP    torch-moe: no python3 with torch on this machine"
else
    gpu_step torch-moe 60 "$py" "$here/torch-moe.py"
fi

note "done in $((SECONDS - start)) s: $([ $failed = 0 ] && echo 'no step failed' || echo 'some steps FAILED')"
exit $failed
