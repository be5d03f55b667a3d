#!/usr/bin/env bash
# The README's demo: installs the dependencies, builds moed, makes the
# embedded synthetic demo model (Mixtral layout), describes it with
# `moectl inspect`, runs every MoE layer in process with
# `moectl forward --local`, printing a timing line per layer, lists the model
# families moed serves (a small checkpoint of each, its routing rule and one
# layer through `forward --local`), then packs the
# model and runs it token by token from the packed store through an expert
# cache that holds half of it, showing the cache's hit statistics, and
# replays the recorded routing through every cache policy next to Belady's
# optimum (moectl cache-sim); last, starts moed on the packed model with a
# host cache of half its experts, drives it over gRPC with `moectl bench`
# (progress bar), then through shared memory (libmoe-client), prints
# `moectl stats`, and stops the daemon cleanly.
#
#   MOED_DEMO_DIR=DIR   where the model and the arrays go (default build/demo)
#   MOED_SKIP_DEPS=1    do not run scripts/deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${MOED_SKIP_DEPS:-0}" = 1 ] || scripts/deps.sh

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
echo "== building"
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target moectl moed

moectl=build/client/moectl
demo=${MOED_DEMO_DIR:-build/demo}
model=$demo/mixtral-demo
mkdir -p "$demo"

echo
echo "== making the demo model: Mixtral layout, 4 layers x 8 experts, hidden 1024, ffn 2816, bf16"
# --force: a second run writes the same model over the first one's.
$moectl gen-model --arch mixtral --out "$model" --layers 4 --experts 8 --top-k 2 \
    --hidden 1024 --ffn 2816 --dtype bf16 --shards 2 --seed 1 --force

echo
echo "== moectl inspect --model $model"
$moectl inspect --model "$model"

echo
echo "== hidden states: 32 tokens of width 1024"
/usr/bin/python3 - "$demo/x.npy" <<'PY'
import sys
import numpy as np
np.save(sys.argv[1], np.random.default_rng(0).standard_normal((32, 1024), dtype=np.float32))
PY

echo
echo "== moectl forward --local, every MoE layer"
for layer in 0 1 2 3; do
    $moectl forward --local --model "$model" --layer "$layer" --in "$demo/x.npy" \
        --out "$demo/y$layer.npy" --routing-out "$demo/r$layer.npz"
done

echo
/usr/bin/python3 - "$demo" <<'PY'
import sys
import numpy as np
d = sys.argv[1]
counts = np.zeros(8, dtype=int)
for layer in range(4):
    ids = np.load(f"{d}/r{layer}.npz")["ids"]
    counts += np.bincount(ids.ravel(), minlength=8)
    y = np.load(f"{d}/y{layer}.npy")
print("expert load over all layers (tokens routed to each expert):")
for e, c in enumerate(counts):
    print(f"  expert {e}: {c:4d} {'#' * int(c // 2)}")
PY

echo
echo "== the model families moed serves: a small checkpoint of each, its routing rule, one MoE layer"
families="mixtral qwen2_moe qwen3_moe qwen3_next qwen3_5_moe olmoe deepseek_v2 deepseek_v3
    kimi_k2 glm4_moe llama4_text gpt_oss"
for arch in $families; do
    $moectl gen-model --arch "$arch" --out "$demo/families/$arch" --force -q >/dev/null
    $moectl inspect --model "$demo/families/$arch" --json >"$demo/families/$arch.json"
done
# gpt-oss as released: its experts in MXFP4 (e2m1 blocks, an e8m0 scale per 32)
$moectl gen-model --arch gpt_oss --dtype mxfp4 --out "$demo/families/gpt_oss-mxfp4" --force \
    -q >/dev/null
$moectl inspect --model "$demo/families/gpt_oss-mxfp4" --json >"$demo/families/gpt_oss-mxfp4.json"
/usr/bin/python3 - "$moectl" "$demo/families" $families gpt_oss-mxfp4 <<'PY'
import json
import subprocess
import sys
import time

import numpy as np

moectl, root, archs = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"{'family':<13} {'layers':>6} {'MoE':>4} {'experts':>7} {'top-k':>5} {'shared':>6} "
      f"{'layout':<23} {'scores':<13} {'layer':>5} {'run ms':>7}")
for arch in archs:
    d = f"{root}/{arch}"
    info = json.load(open(f"{d}.json"))
    layer = next(t["layer"] for t in info["layer_table"] if t["kind"] == "moe")
    np.save(f"{d}.x.npy", np.random.default_rng(0).standard_normal((4, info["hidden"]),
                                                                   dtype=np.float32))
    t0 = time.perf_counter()
    subprocess.run([moectl, "forward", "--local", "--model", d, "--layer", str(layer), "--in",
                    f"{d}.x.npy", "--out", f"{d}.y.npy", "-q"], check=True)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"{arch:<13} {info['layers']:>6} {info['moe_layers']:>4} {info['experts']:>7} "
          f"{info['top_k']:>5} {info['shared_experts']:>6} {info['expert_layout']:<23} "
          f"{info['score_func']:<13} {layer:>5} {ms:>7.1f}")
PY

echo
echo "== moectl pack: one 4 KiB-aligned, checksummed blob per expert"
$moectl pack --model "$model" --out "$demo/mixtral-demo-packed" --force
$moectl verify --pack "$demo/mixtral-demo-packed" --model "$model"

echo
echo "== every layer, token by token, from the packed store, with a cache of half the experts"
$moectl forward --local --model "$demo/mixtral-demo-packed" --layer all --step 1 \
    --in "$demo/x.npy" --out "$demo/y-all.npy" --cache-bytes 256M --policy routing \
    --trace "$demo/demo.trace"

echo
echo "== the same routing, replayed through each cache policy (moectl cache-sim)"
$moectl cache-sim --trace "$demo/demo.trace" --capacity 50% --policy all --prefetch

echo
echo "== moed: the packed model, a host cache of half its experts, gRPC on 127.0.0.1,"
echo "   shared memory for local clients on $demo/shm.sock"
rm -f "$demo/shm.sock"
build/daemon/moed --model "mixtral-demo=$demo/mixtral-demo-packed" --listen 127.0.0.1:0 \
    --shm-socket "$demo/shm.sock" --host-cache-bytes 256M --log-level warn \
    >"$demo/moed.out" 2>"$demo/moed.log" &
moed_pid=$!
trap 'kill -TERM $moed_pid 2>/dev/null || true' EXIT
port=""
for _ in $(seq 100); do
    port=$(sed -n 's/^moed: listening on port \([0-9]*\)$/\1/p' "$demo/moed.out")
    [ -n "$port" ] && break
    sleep 0.1
done
[ -n "$port" ] || { cat "$demo/moed.log"; echo "moed did not start"; exit 1; }
echo "moed pid $moed_pid listening on 127.0.0.1:$port"
$moectl status --remote "127.0.0.1:$port"

echo
echo "== moectl bench: 4 callers, token by token through every layer, for 5 s"
$moectl bench --remote "127.0.0.1:$port" --model mixtral-demo --callers 4 --tokens 1 \
    --duration 5

echo
echo "== the same through shared memory (libmoe-client), 2 callers for 3 s"
$moectl bench --socket "$demo/shm.sock" --model mixtral-demo --callers 2 --tokens 1 --duration 3

echo
echo "== moectl stats"
$moectl stats --remote "127.0.0.1:$port"

echo
echo "== stopping moed (SIGTERM)"
kill -TERM "$moed_pid"
wait "$moed_pid" && echo "moed stopped cleanly (exit 0)"
trap - EXIT

echo
echo "demo done: model and arrays are in $demo"
