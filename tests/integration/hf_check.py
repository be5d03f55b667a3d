#!/usr/bin/env python3
"""Checks moed against Hugging Face transformers itself, where torch and
transformers are installed (not on CI: Debian ships neither; run it by hand
on a machine that has them, e.g. the GPU machine).

For each architecture: `moectl gen-model`, load the checkpoint with
transformers' AutoModelForCausalLM.from_pretrained (which checks every
tensor name and shape of the layout against the real model classes), run
each MoE block of transformers on random hidden states, and compare with
`moectl forward --local` on the same input.

usage: hf_check.py --moectl build/client/moectl --workdir DIR [--arch A ...]
Exit 0 pass, 1 fail, 77 skip (torch or transformers missing).
"""
import argparse
import os
import shutil
import subprocess
import sys

try:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def moe_block(model, layer):
    dec = model.model.layers[layer]
    for name in ("block_sparse_moe", "mlp"):
        m = getattr(dec, name, None)
        if m is not None and (hasattr(m, "experts") or hasattr(m, "gate")):
            return m
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--arch", action="append")
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    worst = 0.0
    failed = False
    for arch in a.arch or ARCHS:
        d = os.path.join(a.workdir, arch)
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run([a.moectl, "gen-model", "--arch", arch, "--out", d, "--dtype", a.dtype,
                        "--shards", "2", "-q"], check=True)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        model.eval()
        cfg = model.config
        rng = np.random.default_rng(1)
        for layer in range(cfg.num_hidden_layers):
            block = moe_block(model, layer)
            x = rng.standard_normal((24, cfg.hidden_size), dtype=np.float32)
            xin, yout = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
            np.save(xin, x)
            p = subprocess.run([a.moectl, "forward", "--local", "--model", d, "--layer",
                                str(layer), "--in", xin, "--out", yout, "-q"],
                               capture_output=True, text=True)
            is_moe = block is not None and hasattr(block, "experts")
            if not is_moe:
                ok = p.returncode == 1 and "dense" in p.stderr
                print(f"{arch} layer {layer}: dense in transformers, moectl says "
                      f"{'dense' if ok else p.stderr.strip()}")
                failed |= not ok
                continue
            if p.returncode != 0:
                print(f"FAIL {arch} layer {layer}: moectl: {p.stderr.strip()}")
                failed = True
                continue
            with torch.no_grad():
                out = block(torch.from_numpy(x)[None])
            if isinstance(out, tuple):
                out = out[0]
            ref = out.reshape(x.shape).double().numpy()
            y = np.load(yout).astype(np.float64)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            worst = max(worst, err)
            status = "ok  " if err < 1e-4 else "FAIL"
            failed |= err >= 1e-4
            print(f"{status} {arch} layer {layer}: rel L2 vs transformers {err:.2e}")
    print(f"worst relative L2 error {worst:.2e} (limit 1e-4)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
