#!/usr/bin/python3
"""moectl's command line: usage errors, help, and bad input from files, each
answered with a clear message and the right exit status (0 ok, 1 failed,
2 usage), never a crash.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import os
import shutil
import struct
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: python3-numpy is not installed (scripts/deps.sh installs it)")
    sys.exit(77)

failures = []


def check(name, cmd, status, needle=None, stream="stderr"):
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stderr if stream == "stderr" else p.stdout
    ok = p.returncode == status and (needle is None or needle in out)
    if p.returncode < 0 or p.returncode >= 128:
        ok = False
    print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[:160]}")
    if not ok:
        failures.append(f"{name}: expected exit {status} with '{needle}' in {stream}, got "
                        f"{p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    m = a.moectl
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)

    # usage and help
    check("no arguments", [m], 2, "usage")
    check("--help", [m, "--help"], 0, "gen-model", stream="stdout")
    check("--version", [m, "--version"], 0, "moectl", stream="stdout")
    check("unknown command", [m, "frobnicate"], 2, "unknown command 'frobnicate'")
    for sub in ("gen-model", "inspect", "forward"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "usage", stream="stdout")
    check("gen-model without --arch", [m, "gen-model", "--out", f"{w}/x"], 2, "--arch")
    check("gen-model bad arch", [m, "gen-model", "--arch", "llama", "--out", f"{w}/x"], 2,
          "expected mixtral, qwen2_moe")
    check("gen-model bad number", [m, "gen-model", "--arch", "mixtral", "--layers", "four",
                                   "--out", f"{w}/x"], 2, "--layers 'four'")
    check("gen-model negative", [m, "gen-model", "--arch", "mixtral", "--hidden", "-5",
                                 "--out", f"{w}/x"], 2, "--hidden '-5'")
    check("gen-model bad dtype", [m, "gen-model", "--arch", "mixtral", "--dtype", "f8",
                                  "--out", f"{w}/x"], 2, "--dtype 'f8'")
    check("gen-model top-k > experts", [m, "gen-model", "--arch", "mixtral", "--experts", "4",
                                        "--top-k", "6", "--out", f"{w}/x", "-q"], 1, "top")
    check("gen-model shared on mixtral", [m, "gen-model", "--arch", "mixtral",
                                          "--shared-experts", "1", "--out", f"{w}/x", "-q"], 1,
          "shared")
    check("gen-model extra argument", [m, "gen-model", "--arch", "mixtral", "--out", f"{w}/x",
                                       "stray"], 2, "unexpected argument 'stray'")

    # a good model to break
    model = f"{w}/model"
    check("gen-model", [m, "gen-model", "--arch", "deepseek_v3", "--out", model, "-q"], 0,
          "wrote deepseek_v3", stream="stdout")
    check("inspect", [m, "inspect", "--model", model], 0, "deepseek_v3", stream="stdout")
    check("inspect missing dir", [m, "inspect", "--model", f"{w}/nope"], 1, "config.json")
    check("inspect without --model", [m, "inspect"], 2, "--model")

    broken = f"{w}/broken"
    shutil.copytree(model, broken)
    st = f"{broken}/model.safetensors"
    with open(st, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    check("inspect header length past the end", [m, "inspect", "--model", broken], 1,
          "model.safetensors")
    shutil.rmtree(broken)
    shutil.copytree(model, broken)
    size = os.path.getsize(st)
    os.truncate(st, size - 1000)
    check("inspect truncated shard", [m, "inspect", "--model", broken], 1, "model.safetensors")
    with open(f"{broken}/config.json", "w") as f:
        f.write('{"model_type": "llama", "num_hidden_layers": 2}')
    check("inspect unsupported model_type", [m, "inspect", "--model", broken], 1, "llama")
    with open(f"{broken}/config.json", "w") as f:
        f.write('{"model_type": ')
    check("inspect bad config JSON", [m, "inspect", "--model", broken], 1, "config.json")

    # forward: bad hidden states and routing
    H = 256
    rng = np.random.default_rng(3)
    good = f"{w}/x.npy"
    np.save(good, rng.standard_normal((4, H), dtype=np.float32))
    fwd = [m, "forward", "--local", "--model", model, "--out", f"{w}/y.npy"]
    check("forward without --local", [m, "forward", "--model", model, "--layer", "1", "--in",
                                      good, "--out", f"{w}/y.npy"], 2, "--local")
    check("forward missing --in", fwd + ["--layer", "1"], 2, "--in")
    check("forward ok", fwd + ["--layer", "1", "--in", good], 0, "tokens", stream="stdout")
    check("forward dense layer", fwd + ["--layer", "0", "--in", good], 1, "dense")
    check("forward layer out of range", fwd + ["--layer", "99", "--in", good], 1, "out of range")
    check("forward missing input", fwd + ["--layer", "1", "--in", f"{w}/none.npy"], 1, "none.npy")
    bad = f"{w}/f64.npy"
    np.save(bad, rng.standard_normal((4, H)))
    check("forward float64 input", fwd + ["--layer", "1", "--in", bad], 1, "<f8")
    np.save(bad, rng.standard_normal((4, H + 1), dtype=np.float32))
    check("forward wrong width", fwd + ["--layer", "1", "--in", bad], 1, f"[tokens, {H}]")
    np.save(bad, rng.standard_normal((H,), dtype=np.float32))
    check("forward 1-D input", fwd + ["--layer", "1", "--in", bad], 1, f"[tokens, {H}]")
    x = rng.standard_normal((4, H), dtype=np.float32)
    x[2, 7] = np.nan
    np.save(bad, x)
    check("forward NaN input", fwd + ["--layer", "1", "--in", bad], 1, "token 2, element 7 is NaN")
    np.save(bad, np.asfortranarray(rng.standard_normal((4, H), dtype=np.float32)))
    check("forward fortran-order input", fwd + ["--layer", "1", "--in", bad], 1, "Fortran")
    with open(bad, "wb") as f:
        f.write(b"not an npy file at all")
    check("forward garbage input", fwd + ["--layer", "1", "--in", bad], 1, "f64.npy")

    k = 4  # deepseek_v3 default top-k
    rin = f"{w}/r.npz"
    ids = np.tile(np.arange(k, dtype=np.int32), (4, 1))
    wts = np.full((4, k), 0.25, dtype=np.float32)
    np.savez(rin, ids=ids, weights=wts)
    check("forward caller routing", fwd + ["--layer", "1", "--in", good, "--routing-in", rin], 0,
          "tokens", stream="stdout")
    bad_ids = ids.copy()
    bad_ids[1, 2] = 999
    np.savez(rin, ids=bad_ids, weights=wts)
    check("forward routing id out of range", fwd + ["--layer", "1", "--in", good, "--routing-in",
                                                    rin], 1, "999")
    bad_ids = ids.copy()
    bad_ids[3, 1] = bad_ids[3, 0]
    np.savez(rin, ids=bad_ids, weights=wts)
    check("forward routing duplicate id", fwd + ["--layer", "1", "--in", good, "--routing-in",
                                                 rin], 1, "token 3")
    np.savez(rin, ids=ids[:, :2], weights=wts[:, :2])
    check("forward routing wrong shape", fwd + ["--layer", "1", "--in", good, "--routing-in", rin],
          1, "ids")
    np.savez(rin, ids=ids)
    check("forward routing without weights", fwd + ["--layer", "1", "--in", good,
                                                    "--routing-in", rin], 1, "weights")
    np.savez_compressed(rin, ids=ids, weights=wts)
    check("forward compressed routing", fwd + ["--layer", "1", "--in", good, "--routing-in", rin],
          1, "compressed")

    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
