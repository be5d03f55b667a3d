#!/usr/bin/env bash
# Installs every Debian package that building, testing and running moed needs.
# Idempotent and non-interactive: packages already installed are skipped, and
# nothing is fetched from anywhere but the Debian archive.
set -euo pipefail

packages=(
    # toolchain and build
    build-essential cmake ninja-build pkg-config git
    clang libclang-rt-14-dev          # clang builds: sanitizers and libFuzzer
    clang-format                      # the format test (scripts/check-format.sh)
    # libraries of the engine and daemon
    libjansson-dev                    # JSON: config.json, safetensors headers, index
    libinih-dev                       # INI: moed.conf
    liburing-dev                      # io_uring pager
    libxxhash-dev                     # packed-store checksums
    libsystemd-dev                    # sd_notify, socket activation
    libgrpc-dev protobuf-c-compiler libprotobuf-c-dev protobuf-compiler
    libmicrohttpd-dev                 # metrics endpoint
    libdnnl-dev                       # oneDNN: the CPU backend's bf16 prefill GEMMs (optional)
    # test tools (Debian's Python, run as /usr/bin/python3)
    python3 python3-numpy python3-grpcio python3-grpc-tools python3-prometheus-client
    python3-pytest                    # client/python's test suite
    fio                               # disk limit for the page-in benchmarks
    openssl                           # certificates for the TLS tests
    systemd                           # systemd-analyze, -socket-activate, -sysusers, -tmpfiles: unit tests
    groff-base                        # man pages rendered without warnings: checked by tests
    librsvg2-bin python3-pil          # rsvg-convert and PIL: moectl stats --plot looked at as PNG
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all ${#packages[@]} packages already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
