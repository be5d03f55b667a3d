#!/usr/bin/env bash
# Builds here the GPU tests and benchmarks and copies them, with the shared
# libraries they need that a bare CUDA machine lacks, into one folder with a
# run.sh that runs the whole GPU check on a lent device machine:
#
#   scripts/gpu-bundle.sh [--build DIR] [--out DIR]
#       DIR of the build (default build/, configured and built if needed;
#       nvcc must be found so that the CUDA targets exist) and of the bundle
#       (default gpu-bundle/, ignored by git; replaced each time)
#
# then, with the device tool (the bundle travels as a carried path):
#   run  command: "bash gpu-bundle/run.sh"   carry: ["gpu-bundle"]   timeout_s: 540
#
# run.sh runs each step with its own timeout, all within 8 minutes, writes a
# log per step and summary.txt to $OUT (the folder the device tool brings
# back; default gpu-bundle/logs), and exits 0 when no step failed.  Without a
# GPU (here, and in CI) it runs its CPU-only steps and skips each GPU step
# with the reason.
#
# What is copied: the test binaries, and every library they load except the
# C runtime (libc, libm, libstdc++, ...) and the CUDA Toolkit's own (cudart,
# cuBLAS, NCCL, the driver), which the device machine has.
set -euo pipefail
cd "$(dirname "$0")/.."

build=build
out=gpu-bundle
while [ $# -gt 0 ]; do
    case $1 in
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-bundle: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

bins=(test-cuda-probe test-cuda-backend test-cuda-quant test-cuda-lost test-nccl bench-gpu-moe)
if [ ! -f "$build/CMakeCache.txt" ]; then
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
targets=()
for b in "${bins[@]}"; do
    # test-nccl exists only where NCCL was found.
    if cmake --build "$build" --target help 2>/dev/null | grep -q "^$b[: ]"; then
        targets+=("$b")
    fi
done
if [ ${#targets[@]} -eq 0 ]; then
    echo "gpu-bundle: no GPU targets in $build: it was configured without CUDA (nvcc not found," \
        "or -DMOED_CUDA=OFF)" >&2
    exit 1
fi
cmake --build "$build" -j "${MOED_JOBS:-2}" --target "${targets[@]}" >/dev/null

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for b in "${targets[@]}"; do
    cp "$build/tests/$b" "$out/bin/"
done
cp tests/gpu/torch-moe.py "$out/"
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"

# The libraries: what ldd resolves, less the C runtime and the CUDA Toolkit.
skip='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvrtc|libnvJitLink)\.so'
ldd "$out"/bin/* | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
    while read -r name path; do
        if ! [[ $name =~ $skip ]]; then
            cp -L "$path" "$out/lib/$name"
        fi
    done

# Debug info stays here with the build: the device runs the code, and the
# device tool carries 64 MiB at most.
strip --strip-debug "$out"/bin/* "$out"/lib/* 2>/dev/null || true
size=$(du -sm "$out" | cut -f1)
if [ "$size" -ge 64 ]; then
    echo "gpu-bundle: $out is $size MiB, over the device tool's 64 MiB" >&2
    exit 1
fi
{
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git diff --quiet 2>/dev/null || echo '(with uncommitted changes)')"
    echo "binaries: ${targets[*]}"
    echo "libraries: $(ls "$out/lib" | tr '\n' ' ')"
} >"$out/BUNDLE"
echo "gpu-bundle: $out ($size MiB): ${targets[*]}; libraries: $(ls "$out/lib" | tr '\n' ' ')"
echo "on the device: bash $out/run.sh (carry $out; logs in \$OUT)"
