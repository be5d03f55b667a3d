#!/usr/bin/env bash
# Makes (once) and prints the Python virtual environment of the Hugging Face
# test tier: pinned torch, transformers and safetensors from PyPI, on Debian's
# /usr/bin/python3, cached outside the source tree. moed itself never uses it.
#
#   scripts/hf-env.sh            make it if missing, then print how to use it
#   scripts/hf-env.sh --print    print the interpreter's path only (exit 1 if not made)
#   scripts/hf-env.sh --quiet    make it if missing, print the interpreter's path only
#
# The environment lives in ${MOED_HF_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moed/hf-env-TAG},
# where TAG is a hash of the pins below: changing a pin makes a new one. Exit 0 with the
# environment ready; 1 if it could not be made (no network, pip refused): the reason is
# printed, and a half-made environment is removed so the next run starts clean.
set -euo pipefail

pins=(
    torch==2.15.0
    transformers==5.25.0
    safetensors==0.8.0
    numpy==2.3.5
    pytest==9.2.0
    grpcio==1.85.1
    protobuf==7.36.2
)

py=/usr/bin/python3
tag=$(printf '%s\n' "$($py -c 'import sys; print(sys.version_info[:2])')" "${pins[@]}" |
    sha256sum | cut -c1-12)
dir=${MOED_HF_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moed/hf-env-$tag}
mode=${1:-}

if [ "$mode" = --print ]; then
    [ -f "$dir/.complete" ] || exit 1
    echo "$dir/bin/python"
    exit 0
fi

if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    echo "hf-env: making $dir (torch, transformers, safetensors from PyPI; once)" >&2
    if ! "$py" -m venv "$dir" >"$log" 2>&1 ||
        ! "$dir/bin/python" -m pip install -q --disable-pip-version-check \
            --timeout 60 "${pins[@]}" >>"$log" 2>&1; then
        echo "hf-env: could not make the environment: $(grep -v '^\s*$' "$log" | tail -n 3 | tr '\n' ' ')" >&2
        rm -rf "$dir"
        exit 1
    fi
    touch "$dir/.complete"
fi

if [ "$mode" = --quiet ]; then
    echo "$dir/bin/python"
    exit 0
fi
cat <<MSG
Hugging Face test environment: $dir
  interpreter:  $dir/bin/python
  pins:         ${pins[*]}
  use:          $dir/bin/python tests/hf/run.py --build build
                (or: source $dir/bin/activate)
MSG
