#!/usr/bin/env bash
# ggml's quantized MUL_MAT_ID (Q8_0, Q4_0) on a Mixtral 8x7B expert matrix
# (8 experts, top-2, m 14336, k 4096; 1 and 8 tokens) next to moed's int8
# and int4 decode, in the same minutes, each against the memory read
# bandwidth that bench-cpu-ffn measures.
#
# Usage: tests/bench/bench-ggml.sh GGML_SRC GGML_BUILD [THREADS...]
#   GGML_SRC    a ggml source tree (github.com/ggml-org/ggml; checked with
#               commit d99724f2); nothing is downloaded.  The patch
#               tests/bench/ggml-mul-mat-id.patch is applied to its
#               tests/test-backend-ops.cpp unless already there: it adds the
#               Mixtral cases to the perf mode, lets GGML_BENCH_THREADS set
#               the CPU backend's thread count and GGML_BENCH_CPU_CLOCK=1
#               time by CPU time.
#   GGML_BUILD  its build directory (configured CPU-only, Release, with the
#               tests, when it has no CMakeCache.txt yet)
#   THREADS     thread counts to run (default: 1 and the CPU count)
# Environment: MOED_BUILD (default build/, for bench-cpu-ffn), JOBS (build
# parallelism, default 2), REPS (bench-cpu-ffn --reps, default 5), CLOCK
# (cpu, the default: both sides timed by the process's CPU time per thread,
# bench-cpu-ffn --clock cpu, which holds on a machine shared with other
# loads; wall: the wall clock, for a quiet machine).  With CPU time, 2 or
# more threads count as if they ran side by side all along.
#
# ggml's own GB/s counts every expert of the op's tensors; the figure here
# counts the bytes read: the selected experts' matrices as stored (Q8_0: 34
# bytes per 32 values, Q4_0: 18), 2 experts for 1 token and the expected
# number of distinct experts, 8 (1 - (6/8)^8) = 7.2, for 8 tokens (ggml's
# test draws each token's 2 of 8 at random).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ $# -lt 2 ]; then
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
src=$1
bld=$2
shift 2
threads=("$@")
if [ ${#threads[@]} -eq 0 ]; then
    threads=(1)
    n=$(nproc)
    [ "$n" -gt 1 ] && threads+=("$n")
fi
moed_build=${MOED_BUILD:-$root/build}
jobs=${JOBS:-2}
reps=${REPS:-5}
clock=${CLOCK:-cpu}
case $clock in
cpu) cpu_clock=1 ;;
wall) cpu_clock=0 ;;
*)
    echo "bench-ggml: CLOCK=$clock: expected cpu or wall" >&2
    exit 2
    ;;
esac
patch_file=$here/ggml-mul-mat-id.patch

[ -f "$src/tests/test-backend-ops.cpp" ] || {
    echo "bench-ggml: $src: not a ggml source tree (no tests/test-backend-ops.cpp)" >&2
    exit 2
}
[ -x "$moed_build/tests/bench-cpu-ffn" ] || {
    echo "bench-ggml: $moed_build/tests/bench-cpu-ffn: not built (set MOED_BUILD)" >&2
    exit 2
}
if patch -d "$src" -p1 -R --dry-run -s -f <"$patch_file" >/dev/null 2>&1; then
    echo "== $src: patch already applied"
else
    patch -d "$src" -p1 --forward -s <"$patch_file" || {
        echo "bench-ggml: $patch_file does not apply to $src (another ggml commit?)" >&2
        exit 1
    }
    echo "== $src: applied $(basename "$patch_file")"
fi
if [ ! -f "$bld/CMakeCache.txt" ]; then
    cmake -S "$src" -B "$bld" -DGGML_CUDA=OFF -DGGML_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$bld" -j "$jobs" --target test-backend-ops
tbo=$bld/bin/test-backend-ops
[ -x "$tbo" ] || tbo=$(find "$bld" -name test-backend-ops -type f -perm -u+x | head -1)

for t in "${threads[@]}"; do
    echo
    echo "== ggml MUL_MAT_ID, $t thread(s), $clock clock"
    GGML_BENCH_THREADS=$t GGML_BENCH_CPU_CLOCK=$cpu_clock "$tbo" perf -b CPU -o MUL_MAT_ID -p 'n_mats=8,n_used=2,b=0,m=14336' |
        sed 's/\x1b\[[0-9;]*m//g' |
        awk '/MUL_MAT_ID\(/ && /us\/run/ {
            type = $0; sub(/.*type_a=/, "", type); sub(/,.*/, "", type)
            n = $0; sub(/.*,n=/, "", n); sub(/,.*/, "", n)
            us = $0; sub(/ us\/run.*/, "", us); sub(/.* /, "", us)
            bpv = type == "q8_0" ? 34 / 32 : type == "q4_0" ? 18 / 32 : 0
            if (bpv == 0) next
            experts = n == 1 ? 2 : 8 * (1 - (6 / 8) ^ 8)
            bytes = experts * 14336 * 4096 * bpv
            printf "  %-5s tokens %s: %9.1f us/run, %4.1f experts read, %6.1f MB, %6.2f GB/s\n",
                type, n, us, experts, bytes / 1e6, bytes / us / 1e3
        }'
    echo "== moed int8 / int4 (whole FFN: gate, up, down), $t thread(s); eff/mem against the read bandwidth"
    "$moed_build/tests/bench-cpu-ffn" --tokens 1,8 --threads "$t" --precision exact --torch off \
        --dtype int8,int4 --act exact,int8 --clock "$clock" --reps "$reps" |
        grep -E 'bandwidth|^ +[0-9]'
done
