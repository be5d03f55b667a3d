#!/usr/bin/python3
"""End-to-end test of one architecture: `moectl gen-model`, then
`moectl forward --local` on every layer, checked against the independent
float64 reference in moeref.py (its own safetensors reader, routing rules and
experts).  Also checks caller-supplied routing, sharded checkpoints and
`moectl inspect --json`.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: python3-numpy is not installed (scripts/deps.sh installs it)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moeref  # noqa: E402

TOL = 1e-4  # relative L2 error; fp32 accumulation gives ~1e-6, a real bug ~1


def run(cmd, expect=0):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != expect:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {p.returncode}, expected {expect}\n"
                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def check_routing(fam, sel, ref_ids, ids, what):
    """The engine's choice must be the reference's, except on genuine near-ties."""
    ties = 0
    for t in range(ids.shape[0]):
        if set(ids[t]) == set(ref_ids[t]):
            continue
        s = np.sort(sel[t])[::-1]
        gap = s[fam.k - 1] - s[fam.k]
        chosen = sel[t, ids[t]]
        if gap > 1e-5 or not np.all(np.isfinite(chosen)) or chosen.min() < s[fam.k - 1] - 1e-5:
            sys.exit(f"FAIL: {what}: token {t} routed to {sorted(ids[t])}, reference "
                     f"{sorted(ref_ids[t])} (selection gap {gap:.3g})")
        ties += 1
    return ties


def forward(moectl, model, layer, x, work, tag, routing_in=None, expect=0):
    xin = os.path.join(work, f"x-{tag}.npy")
    yout = os.path.join(work, f"y-{tag}.npy")
    rout = os.path.join(work, f"r-{tag}.npz")
    np.save(xin, x)
    cmd = [moectl, "forward", "--local", "--model", model, "--layer", str(layer),
           "--in", xin, "--out", yout, "--routing-out", rout]
    if routing_in:
        cmd += ["--routing-in", routing_in]
    p = run(cmd, expect)
    if expect != 0:
        return p, None, None, None
    y = np.load(yout)
    r = np.load(rout)
    return p, y, r["ids"], r["weights"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()

    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    model = os.path.join(a.workdir, "model")
    run([a.moectl, "gen-model", "--arch", a.arch, "--dtype", a.dtype, "--out", model,
         "--seed", "7", "-q"])

    ck = moeref.Checkpoint(model)
    fam = moeref.Family(ck.cfg)
    H = fam.cfg["hidden_size"]
    L = fam.cfg["num_hidden_layers"]

    info = json.loads(run([a.moectl, "inspect", "--model", model, "--json"]).stdout)
    assert info["architecture"] == a.arch, info
    assert info["layers"] == L and info["experts"] == fam.E and info["top_k"] == fam.k, info
    if a.dtype == "mxfp4":
        # gpt-oss's release: U8 blocks with e8m0 scales per 32
        assert info["dtype"] == "u8" and info["quantization"] == {
            "format": "mxfp4", "block": [1, 32], "scale_dtype": "e8m0"}, info
        assert info["expert_layout"] == "fused-interleaved-mxfp4", info
    else:
        assert info["dtype"] == a.dtype, info
    moe_layers = [i for i in range(L) if fam.is_moe(i)]
    assert info["moe_layers"] == len(moe_layers), (info["moe_layers"], moe_layers)
    for row in info["layer_table"]:
        assert (row["kind"] == "moe") == fam.is_moe(row["layer"]), row

    rng = np.random.default_rng(11)
    worst = 0.0
    ties = 0
    for layer in range(L):
        if not fam.is_moe(layer):
            p, *_ = forward(a.moectl, model, layer, rng.standard_normal((3, H), dtype=np.float32),
                            a.workdir, f"dense{layer}", expect=1)
            assert "dense" in p.stderr, p.stderr
            continue
        for T in (1, 5, 64):
            x = rng.standard_normal((T, H), dtype=np.float32)
            _, y, ids, w = forward(a.moectl, model, layer, x, a.workdir, f"{layer}-{T}")
            assert y.dtype == np.float32 and y.shape == (T, H), (y.dtype, y.shape)
            assert ids.dtype == np.int32 and ids.shape == (T, fam.k), (ids.dtype, ids.shape)
            ref_ids, ref_w, _, sel = moeref.layer_reference(ck, fam, layer, x)
            ties += check_routing(fam, sel, ref_ids, ids, f"layer {layer}, {T} tokens")
            # Reference output for the engine's (validated) choice of experts.
            _, ref_w, ref_y, _ = moeref.layer_reference(ck, fam, layer, x, ids=ids.astype(np.int64))
            if not np.allclose(w, ref_w, rtol=1e-4, atol=3e-5):  # fp32 logits vs fp64
                sys.exit(f"FAIL: layer {layer}: routing weights differ from the reference by "
                         f"{np.abs(w - ref_w).max():.3g}")
            err = moeref.rel_l2(y, ref_y)
            scale = float(np.sqrt(np.mean(ref_y ** 2)))
            print(f"layer {layer}, {T:3d} tokens: rel L2 error {err:.2e}, output rms {scale:.3f}")
            if not err < TOL:
                sys.exit(f"FAIL: layer {layer}, {T} tokens: relative L2 error {err:.3g} >= {TOL}")
            if not 1e-3 < scale < 1e3:
                sys.exit(f"FAIL: layer {layer}: output rms {scale} is degenerate")
            worst = max(worst, err)

    # Caller-supplied routing: random distinct experts and weights.
    layer = moe_layers[-1]
    T = 9
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids = np.stack([rng.permutation(fam.E)[: fam.k] for _ in range(T)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (T, fam.k)).astype(np.float32)
    rin = os.path.join(a.workdir, "routing-in.npz")
    np.savez(rin, ids=ids, weights=w)
    _, y, ids_used, w_used = forward(a.moectl, model, layer, x, a.workdir, "given", routing_in=rin)
    assert np.array_equal(ids_used, ids) and np.array_equal(w_used, w)
    ref_y = moeref.routed_output(ck, fam, layer, x, ids.astype(np.int64), w.astype(np.float64))
    err = moeref.rel_l2(y, ref_y)
    print(f"layer {layer}, caller routing: rel L2 error {err:.2e}")
    if not err < TOL:
        sys.exit(f"FAIL: caller routing: relative L2 error {err:.3g}")

    # The same model in 3 shards, and with its experts in the other layout
    # (fused or per expert: the same values), gives bit-identical answers;
    # gpt_oss has one layout only.
    fused = any(n.endswith(".experts.gate_up_proj") for n in ck.tensors)
    one_layout = fam.gpt_oss
    sharded = os.path.join(a.workdir, "model-sharded")
    run([a.moectl, "gen-model", "--arch", a.arch, "--dtype", a.dtype, "--out", sharded,
         "--seed", "7", "--shards", "3", "--layout",
         "fused" if one_layout or not fused else "per-expert", "-q"])
    other = moeref.Checkpoint(sharded)
    assert (fused != any(n.endswith(".experts.gate_up_proj") for n in other.tensors)) != one_layout
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    x = rng.standard_normal((16, H), dtype=np.float32)
    _, y1, i1, _ = forward(a.moectl, model, layer, x, a.workdir, "one")
    _, y3, i3, _ = forward(a.moectl, sharded, layer, x, a.workdir, "three")
    if not (np.array_equal(y1, y3) and np.array_equal(i1, i3)):
        sys.exit("FAIL: sharded checkpoint in the other layout gives a different answer")

    print(f"PASS {a.arch} {a.dtype}: worst rel L2 error {worst:.2e} (limit {TOL}), "
          f"{ties} near-tie token(s)")


if __name__ == "__main__":
    main()
