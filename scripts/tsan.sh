#!/usr/bin/env bash
# ThreadSanitizer over moed's threaded tests: builds build-tsan/
# (CMAKE_BUILD_TYPE=Tsan, warnings as errors, clang where installed) and
# runs the tests whose code has threads of its own: the scheduler, the
# thread pool, the cache and its pager, the gRPC server, the shared-memory
# rings, server and client, and moed end to end over gRPC and shared memory
# and as a cluster (its work queues, peers and failover).
# Races inside gRPC's libraries are suppressed (tests/tsan.supp); any other
# report fails the test (halt_on_error).
#
# A stage of scripts/test.sh (last; MOED_NO_TSAN=1 leaves it out, and it
# is skipped, saying so, where the compiler cannot build with
# -fsanitize=thread): about 6 to 7 minutes on 2 busy cores (the build of
# only the targets these tests run, 3.5; the tests, 3).  On its own:
#
#   scripts/tsan.sh            build and run
#   scripts/tsan.sh --probe    exit 0 when a TSan build can work here, else
#                              say why on stdout and exit 1
#   MOED_JOBS=N                parallel build and test jobs (default: CPUs)
#   MOED_TSAN_TESTS=REGEX      which ctest tests (default below)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${MOED_JOBS:-$(nproc)}
tests=${MOED_TSAN_TESTS:-'^(test-(scheduler|threadpool|cache|pager|rpc|ring|shm-server|client)|daemon-(grpc|shm|cluster))$'}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cc=()
command -v clang >/dev/null && cc=(-DCMAKE_C_COMPILER=clang)

# Can this compiler build and run a ThreadSanitizer program at all?
if [ "${1:-}" = --probe ]; then
    probe_cc=cc
    command -v clang >/dev/null && probe_cc=clang
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    printf 'int main(void) { return 0; }\n' >"$dir/p.c"
    if ! out=$("$probe_cc" -fsanitize=thread "$dir/p.c" -o "$dir/p" 2>&1); then
        echo "$probe_cc cannot build with -fsanitize=thread: $(echo "$out" | head -n 1)"
        exit 1
    fi
    if ! out=$("$dir/p" 2>&1); then
        echo "a -fsanitize=thread program does not run here: $(echo "$out" | head -n 1)"
        exit 1
    fi
    exit 0
fi

cmake -S . -B build-tsan "${generator[@]}" -DCMAKE_BUILD_TYPE=Tsan -DMOED_WERROR=ON -DMOED_FUZZ=OFF \
    "${cc[@]}"
# Only what the tests run: moed, moectl and the layers example for the
# end-to-end ones.
cmake --build build-tsan -j "$jobs" --target moed moectl moe-layers-example test-scheduler \
    test-threadpool test-cache test-pager test-rpc test-ring test-shm-server test-client
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1 suppressions=$PWD/tests/tsan.supp"
ctest --test-dir build-tsan -j "$jobs" -R "$tests" --output-on-failure
