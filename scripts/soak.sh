#!/usr/bin/env bash
# A soak of moed (issue 22): for N minutes, load through gRPC and shared
# memory on a model three times larger than its cache, clients SIGKILLed at
# random, page-in faults injected (MOED_PAGER_FAULTS), moed sent SIGHUP
# every 10 s; RSS, descriptors and threads sampled every second.  Fails on
# any wrong answer (checked against `moectl forward --local`), on any
# failure but an injected fault's, and on a drift above 1% after the
# warm-up.  The work (tests/integration/soak.py) runs at nice 19.
#
#   scripts/soak.sh [--minutes N] [--build DIR] [--clients C] [--workdir DIR]
#
#   --minutes N   how long (default 60; fractions allowed)
#   --build DIR   the build tree with daemon/moed and client/moectl (default build)
#   --clients C   load clients per transport (default 2)
#   --workdir DIR where the model, the logs and samples.csv go (default BUILD/soak)
#
# Exit 0 pass, 1 fail, 2 bad usage, 77 skip (python3-grpcio or numpy missing).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=60
build=build
clients=2
workdir=
usage() {
    sed -n 's/^#   //p;s/^#  *--/  --/p' "$0" | head -n 5 >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
    --minutes | --build | --clients | --workdir)
        [ $# -ge 2 ] || usage
        case "$1" in
        --minutes) minutes=$2 ;;
        --build) build=$2 ;;
        --clients) clients=$2 ;;
        --workdir) workdir=$2 ;;
        esac
        shift 2
        ;;
    -h | --help) usage ;;
    *)
        echo "soak.sh: unknown argument '$1'" >&2
        usage
        ;;
    esac
done
if ! awk -v m="$minutes" 'BEGIN { exit !(m ~ /^[0-9]*\.?[0-9]+$/ && m > 0) }'; then
    echo "soak.sh: --minutes '$minutes': expected a positive number" >&2
    exit 2
fi
if ! [[ "$clients" =~ ^[1-9][0-9]?$ ]]; then
    echo "soak.sh: --clients '$clients': expected 1 to 99" >&2
    exit 2
fi
for f in "$build/daemon/moed" "$build/client/moectl" "$build/client/libmoe-client.so.1"; do
    if [ ! -e "$f" ]; then
        echo "soak.sh: $f is missing: build first (cmake --build $build)" >&2
        exit 1
    fi
done
exec nice -n 19 /usr/bin/python3 tests/integration/soak.py --moed "$build/daemon/moed" \
    --moectl "$build/client/moectl" --source "$PWD" --workdir "${workdir:-$build/soak}" \
    --minutes "$minutes" --clients "$clients"
