#!/usr/bin/python3
"""The expert cache end to end through `moectl forward --local`: on a model
larger than the cache, every policy, with and without prefetch, token by
token or in batches, from the checkpoint and from its packed store, gives
the same output, bit for bit, as with every expert resident, and prints hit
statistics that show the cache at work.  A byte flipped in the packed store
fails the forward with a checksum error naming the expert.  A trace
recorded by the forward replays in cache-sim.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: python3-numpy is not installed (scripts/deps.sh installs it)")
    sys.exit(77)

failures = []


def run(name, cmd, status=0, needle=None):
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    ok = p.returncode == status and (needle is None or needle in out)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {p.returncode}")
    if not ok:
        failures.append(f"{name}: expected exit {status} with '{needle}', got {p.returncode}\n"
                        f"cmd: {' '.join(cmd)}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def stats(text):
    """hits, misses, evictions, prefetch hits from the 'cache host:' line."""
    m = re.search(r"cache host: .*?: (\d+) hits, (\d+) misses .*?(\d+) prefetch hits of (\d+) "
                  r"prefetches \((\d+) wasted\), (\d+) evictions", text)
    if not m:
        return None
    h, mi, ph, pf, wa, ev = (int(g) for g in m.groups())
    return {"hits": h, "misses": mi, "prefetch_hits": ph, "prefetches": pf, "wasted": wa,
            "evictions": ev}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    m, w = a.moectl, a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)

    model = f"{w}/model"
    run("gen-model", [m, "gen-model", "--arch", "mixtral", "--layers", "6", "--experts", "8",
                      "--hidden", "256", "--ffn", "384", "--shards", "2", "--out", model, "-q"])
    # expert: 3 x 256 x 384 bf16 = 576 KiB; the model has 48 of them (27 MiB)
    rng = np.random.default_rng(7)
    T, H = 48, 256
    topic = rng.standard_normal(H)
    xs = []
    for t in range(T):  # consecutive tokens alike, as in text
        if t % 16 == 0:
            topic = rng.standard_normal(H)
        xs.append(topic + 0.5 * rng.standard_normal(H))
    x = np.asarray(xs, dtype=np.float32)
    np.save(f"{w}/x.npy", x)

    ref = f"{w}/ref.npy"
    p = run("all resident", [m, "forward", "--local", "--model", model, "--layer", "all",
                             "--in", f"{w}/x.npy", "--out", ref])
    s = stats(p.stdout)
    if not s or s["evictions"] != 0 or s["hits"] == 0:
        failures.append(f"all resident: expected hits and no evictions: {p.stdout}")
    y_ref = np.load(ref)
    if not np.all(np.isfinite(y_ref)) or np.array_equal(y_ref, x):
        failures.append("all resident: output is not a transformed residual stream")

    pack = f"{w}/pack"
    run("pack", [m, "pack", "--model", model, "--out", pack, "-q"])

    cases = []
    for policy in ("lru", "freq", "routing"):
        for prefetch in (True, False):
            cases.append((policy, prefetch, "1", model))
    cases.append(("routing", True, "8", model))
    cases.append(("routing", True, "1", pack))
    cases.append(("lru", False, "48", pack))
    for policy, prefetch, step, src in cases:
        out = f"{w}/y-{policy}-{prefetch}-{step}-{os.path.basename(src)}.npy"
        cmd = [m, "forward", "--local", "--model", src, "--layer", "all", "--in", f"{w}/x.npy",
               "--out", out, "--cache-bytes", "10M", "--policy", policy, "--step", step]
        if not prefetch:
            cmd.append("--no-prefetch")
        name = f"{policy}{'+prefetch' if prefetch else ''} step {step} from {os.path.basename(src)}"
        p = run(name, cmd)
        if p.returncode != 0:
            continue
        y = np.load(out)
        if not np.array_equal(y, y_ref):
            failures.append(f"{name}: output differs from the all-resident one "
                            f"(max |diff| {np.max(np.abs(y - y_ref))})")
        s = stats(p.stdout)
        if not s:
            failures.append(f"{name}: no cache statistics line in: {p.stdout}")
            continue
        print(f"     {s}")
        if s["misses"] == 0 or s["evictions"] == 0:
            failures.append(f"{name}: a 10 MiB cache on a 27 MiB model must miss and evict: {s}")
        if prefetch and step == "1" and s["prefetches"] == 0:
            failures.append(f"{name}: prefetch on, but nothing prefetched: {s}")
        if not prefetch and s["prefetches"] != 0:
            failures.append(f"{name}: --no-prefetch, but {s['prefetches']} prefetches")

    # A cache smaller than one expert is refused with the sizes.
    run("cache below one expert", [m, "forward", "--local", "--model", model, "--layer", "0",
                                   "--in", f"{w}/x.npy", "--out", f"{w}/small.npy",
                                   "--cache-bytes", "100K"], 1, "bytes but the host tier holds")
    run("bad --cache-bytes", [m, "forward", "--local", "--model", model, "--layer", "0",
                              "--in", f"{w}/x.npy", "--out", f"{w}/small.npy",
                              "--cache-bytes", "12Q"], 2, "unknown suffix")
    run("bad --policy", [m, "forward", "--local", "--model", model, "--layer", "0",
                         "--in", f"{w}/x.npy", "--out", f"{w}/small.npy", "--policy", "mru"], 2,
        "expected lru, freq or routing")

    # A flipped byte in the packed store: the page-in's checksum catches it.
    bad = f"{w}/pack-bad"
    shutil.copytree(pack, bad)
    import json
    with open(f"{bad}/moe-pack.json") as f:
        index = json.load(f)
    with open(f"{bad}/experts.bin", "r+b") as f:
        for ent in index["experts"]:
            if ent["layer"] == 0:  # every expert of layer 0
                f.seek(ent["offset"] + ent["nbytes"] // 2)
                b = f.read(1)
                f.seek(ent["offset"] + ent["nbytes"] // 2)
                f.write(bytes([b[0] ^ 0x5A]))
    run("corrupt packed store", [m, "forward", "--local", "--model", bad, "--layer", "all",
                                 "--in", f"{w}/x.npy", "--out", f"{w}/bad.npy"], 1,
        "checksum mismatch")
    run("corrupt packed store names the expert", [m, "forward", "--local", "--model", bad,
                                                  "--layer", "0", "--in", f"{w}/x.npy",
                                                  "--out", f"{w}/bad.npy"], 1, "layer 0 expert")

    # The routing recorded by forward replays in cache-sim.
    trace = f"{w}/fwd.trace"
    run("forward --trace", [m, "forward", "--local", "--model", model, "--layer", "all",
                            "--in", f"{w}/x.npy", "--out", f"{w}/t.npy", "--step", "1",
                            "--trace", trace, "-q"])
    run("cache-sim on a recorded trace", [m, "cache-sim", "--trace", trace, "--capacity", "50%",
                                          "--policy", "lru"], 0, "elady")

    if failures:
        print("\n".join(failures))
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
