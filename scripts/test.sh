#!/usr/bin/env bash
# The README's test command: installs the dependencies, builds moed three
# times with warnings as errors (the normal build; a Release build, compiled
# only; an AddressSanitizer + UndefinedBehaviorSanitizer build with clang,
# where the fuzz targets also run under libFuzzer for a few seconds each),
# and runs the whole test suite of the normal and sanitizer builds; then the
# Hugging Face tier (tests/hf) on the normal build, where its Python
# environment (scripts/hf-env.sh) can be made; last, ThreadSanitizer over the
# threaded tests (scripts/tsan.sh, its own build-tsan/).
#
#   MOED_JOBS=N       parallel build and test jobs (default: number of CPUs)
#   MOED_SKIP_DEPS=1  do not run scripts/deps.sh (already installed)
#   MOED_NO_SANITIZE=1  no sanitizer build
#   MOED_NO_RELEASE=1   no Release build
#   MOED_NO_TSAN=1      no ThreadSanitizer stage
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${MOED_JOBS:-$(nproc)}
[ "${MOED_SKIP_DEPS:-0}" = 1 ] || scripts/deps.sh

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

# The Hugging Face tier (tests/hf, ctest label hf) needs torch and
# transformers from PyPI in an environment of their own, made once and cached
# by scripts/hf-env.sh; without network the tier is skipped, saying why.
hf_python=
hf_log=$(mktemp)
if hf_python=$(scripts/hf-env.sh --quiet 2>"$hf_log"); then
    echo "== Hugging Face tier: $hf_python"
else
    hf_python=
    reason=$(sed -n 's/^hf-env: could not make the environment: //p' "$hf_log" | tail -n 1)
    [ -n "$reason" ] || reason=$(grep -v '^\s*$' "$hf_log" | tail -n 1 || true)
    echo "== Hugging Face tier: skipped (could not make the Python environment:" \
        "$(echo "$reason" | cut -c1-300 | sed 's/ *$//'))"
fi
rm -f "$hf_log"

echo "== normal build (build/)"
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOED_WERROR=ON \
    -DMOED_HF_PYTHON="$hf_python"
cmake --build build -j "$jobs"

# Formatting (ctest's format test checks whole files): the lines changed
# since the merge base with main, in the files formatted before the check.
if base=$(git merge-base HEAD main 2>/dev/null) && [ "$base" != "$(git rev-parse HEAD)" ]; then
    echo "== format of the lines changed since $(git rev-parse --short "$base")"
    scripts/check-format.sh "$base"
fi

# A user's plain Release build must compile; built here with warnings as
# errors, since -O3 finds what -O2 does not (maybe-uninitialized).
if [ "${MOED_NO_RELEASE:-0}" != 1 ]; then
    echo "== Release build (build-release/: compiled, not tested)"
    cmake -S . -B build-release "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOED_WERROR=ON
    cmake --build build-release -j "$jobs"
fi

if [ "${MOED_NO_SANITIZE:-0}" != 1 ]; then
    san_cc=(-DMOED_FUZZ=OFF)
    if command -v clang >/dev/null; then
        san_cc=(-DCMAKE_C_COMPILER=clang -DMOED_FUZZ=ON)
    fi
    echo "== sanitizer build (build-sanitize/: ASan + UBSan${san_cc[1]:+, libFuzzer})"
    cmake -S . -B build-sanitize "${generator[@]}" -DCMAKE_BUILD_TYPE=Sanitize -DMOED_WERROR=ON \
        "${san_cc[@]}"
    cmake --build build-sanitize -j "$jobs"
fi

echo "== tests (build/)"
(cd build && ctest --output-on-failure -j "$jobs" -LE '^hf$')

if [ "${MOED_NO_SANITIZE:-0}" != 1 ]; then
    echo "== tests under ASan + UBSan (build-sanitize/)"
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    (cd build-sanitize && ctest --output-on-failure -j "$jobs")
fi

if [ -n "$hf_python" ]; then
    echo "== Hugging Face tier (build/: checkpoints written by transformers, checked against it)"
    (cd build && ctest --output-on-failure -j "$jobs" -L '^hf$')
fi

if [ "${MOED_NO_TSAN:-0}" != 1 ]; then
    if why=$(scripts/tsan.sh --probe); then
        echo "== ThreadSanitizer over the threaded tests (build-tsan/, scripts/tsan.sh)"
        MOED_JOBS="$jobs" scripts/tsan.sh
    else
        echo "== ThreadSanitizer: skipped ($why)"
    fi
fi
