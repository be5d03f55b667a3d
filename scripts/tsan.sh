#!/usr/bin/env bash
# ThreadSanitizer over moed's threaded tests: builds build-tsan/
# (CMAKE_BUILD_TYPE=Tsan, warnings as errors, clang where installed) and
# runs the tests whose code has threads of its own: the scheduler, the
# thread pool, the cache and its pager, the gRPC server, the shared-memory
# rings, server and client, and moed end to end over gRPC and shared memory.
# Races inside gRPC's libraries are suppressed (tests/tsan.supp); any other
# report fails the test (halt_on_error).
#
# Not a stage of scripts/test.sh: on 2 cores the build alone takes longer
# than that script's budget allows.  Run it on its own:
#
#   scripts/tsan.sh            build and run
#   MOED_JOBS=N                parallel build and test jobs (default: CPUs)
#   MOED_TSAN_TESTS=REGEX      which ctest tests (default below)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${MOED_JOBS:-$(nproc)}
tests=${MOED_TSAN_TESTS:-'^(test-(scheduler|threadpool|cache|pager|rpc|ring|shm-server|client)|daemon-(grpc|shm))$'}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cc=()
command -v clang >/dev/null && cc=(-DCMAKE_C_COMPILER=clang)

cmake -S . -B build-tsan "${generator[@]}" -DCMAKE_BUILD_TYPE=Tsan -DMOED_WERROR=ON -DMOED_FUZZ=OFF \
    "${cc[@]}"
# Only what the tests run: moed and moectl for the end-to-end ones.
cmake --build build-tsan -j "$jobs" --target moed moectl test-scheduler test-threadpool test-cache \
    test-pager test-rpc test-ring test-shm-server test-client
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1 suppressions=$PWD/tests/tsan.supp"
ctest --test-dir build-tsan -j "$jobs" -R "$tests" --output-on-failure
