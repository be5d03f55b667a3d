#!/usr/bin/env python3
"""Llama 4 as released: the multimodal checkpoint (model_type "llama4",
Llama4ForConditionalGeneration), not the text-only one the family tier builds.

A small Llama4ForConditionalGeneration (text: 4 layers, MoE every second one,
4 experts, top-1, a shared expert; a one-layer vision tower), randomly
initialised by transformers' own class, router weights scaled up so routing
is decisive, saved with save_pretrained in float32 (one file) and bfloat16
(sharded). moed must read each unchanged: `moectl inspect --json` finds the
text config in text_config and the layers under language_model.model.layers
(the vision tower's tensors are not its business), and every MoE layer's
`moectl forward --local` equals transformers' own Llama4TextMoe of the loaded
model on random hidden states: float32 within 1e-5 of each token's max |y|,
bfloat16 against the same weights computed in float32 (hf-f32, as
check_layers.py argues) within the same 1e-5; routed experts (top-1 of the
router logits) identical but for near-ties.  `moectl pack` stores the
experts plain (Llama 4 keeps them transposed: gate_up_proj [E, hidden,
2 x ffn]); `moectl verify` finds the store equal to the checkpoint, and a
store of another checkpoint of the same config different, naming the tensor;
the store gives the checkpoint's output bit for bit.

usage: llama4_multimodal.py --moectl MOECTL --workdir DIR
Exit 0 pass, 1 fail, 77 when torch or transformers (or the class) is missing.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

try:
    import numpy as np
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration
except ImportError as e:
    print(f"SKIP: {e} (run with the interpreter scripts/hf-env.sh prints)")
    sys.exit(77)

TOL = 1e-5
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not ok:
        failures.append(f"{name}: {detail}")
    return ok


def make(d, dtype, shard, seed=1):
    tc = dict(vocab_size=512, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
              max_position_embeddings=256, attention_chunk_size=128)
    vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
              projector_output_dim=32)
    torch.manual_seed(seed)
    m = Llama4ForConditionalGeneration(Llama4Config(text_config=tc, vision_config=vc)).eval()
    with torch.no_grad():
        for layer in m.language_model.model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.router.weight.mul_(8)
    m = m.to(dtype)
    m.save_pretrained(d, max_shard_size="200KB" if shard else "10GB")


def text_moe_blocks(model):
    return {i: layer.feed_forward for i, layer in enumerate(model.language_model.model.layers)
            if hasattr(layer.feed_forward, "router")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    torch.set_num_threads(1)
    rng = np.random.default_rng(4)
    for dtype, shard in ((torch.float32, False), (torch.bfloat16, True)):
        tag = f"{str(dtype).split('.')[-1]}-{'sharded' if shard else 'single'}"
        d = os.path.join(a.workdir, f"llama4-mm-{tag}")
        make(d, dtype, shard)
        cfg = json.load(open(os.path.join(d, "config.json")))
        check(f"{tag}: saved as the multimodal model_type llama4", cfg.get("model_type") == "llama4"
              and "text_config" in cfg, cfg.get("model_type"))
        if shard:
            check(f"{tag}: sharded", os.path.exists(os.path.join(d, "model.safetensors.index.json")))
        p = subprocess.run([a.moectl, "inspect", "--model", d, "--json"], capture_output=True,
                           text=True)
        if not check(f"{tag}: moectl inspect reads it", p.returncode == 0, p.stderr):
            continue
        info = json.loads(p.stdout)
        ref = Llama4ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
        blocks = text_moe_blocks(ref)
        moe = [i for i, l in enumerate(info.get("layer_table", [])) if l.get("kind") == "moe"]
        check(f"{tag}: the MoE layers transformers built", moe == sorted(blocks),
              f"moed {moe}, transformers {sorted(blocks)}")
        for layer, block in blocks.items():
            x = rng.standard_normal((24, 64)).astype(np.float32)
            xin, yout = os.path.join(d, f"x{layer}.npy"), os.path.join(d, f"y{layer}.npy")
            np.save(xin, x)
            p = subprocess.run([a.moectl, "forward", "--local", "--model", d, "--layer",
                                str(layer), "--in", xin, "--out", yout, "--threads", "1", "-q",
                                "--routing-out", os.path.join(d, f"r{layer}.npz")],
                               capture_output=True, text=True)
            if not check(f"{tag}: layer {layer} forward --local", p.returncode == 0, p.stderr):
                continue
            with torch.no_grad():
                yr, logits = block(torch.from_numpy(x))
            yr = yr.numpy()
            y = np.load(yout)
            ids = np.load(os.path.join(d, f"r{layer}.npz"))["ids"][:, 0]
            lg = logits.numpy()
            top2 = np.sort(lg, axis=1)[:, -2:]
            tie = np.abs(top2[:, 1] - top2[:, 0]) <= 1e-5 * np.abs(top2).max(axis=1)
            same = ids == lg.argmax(axis=1)
            check(f"{tag}: layer {layer}: routed experts equal transformers' (top-1), "
                  f"{int(tie.sum())} near-ties", bool(np.all(same | tie)),
                  f"{int((~same & ~tie).sum())} tokens differ")
            err = (np.abs(y - yr).max(axis=1) / np.abs(yr).max(axis=1))[same]
            check(f"{tag}: layer {layer}: output within {TOL} of each token's max |y| "
                  f"(worst {err.max():.2e})", err.max() <= TOL, err.max())
    # The packed store of the bfloat16 checkpoint.
    d = os.path.join(a.workdir, "llama4-mm-bfloat16-sharded")
    store = os.path.join(a.workdir, "store")
    p = subprocess.run([a.moectl, "pack", "--model", d, "--out", store, "-q"], capture_output=True,
                       text=True)
    check("pack stores Llama 4's transposed experts", p.returncode == 0, p.stderr)
    p = subprocess.run([a.moectl, "verify", "--pack", store, "--model", d], capture_output=True,
                       text=True)
    check("verify: the store equals its checkpoint", p.returncode == 0 and "all match" in p.stdout,
          p.stdout + p.stderr)
    other = os.path.join(a.workdir, "other")
    make(other, torch.bfloat16, True, seed=2)
    p = subprocess.run([a.moectl, "verify", "--pack", store, "--model", other],
                       capture_output=True, text=True)
    check("verify: a store of another checkpoint differs, naming the tensor",
          p.returncode != 0 and "differs from the checkpoint's" in p.stdout + p.stderr
          and "feed_forward.experts" in p.stdout + p.stderr, p.stdout + p.stderr)
    for layer in (1, 3):
        outs = []
        for src in (d, store):
            y = os.path.join(a.workdir, f"p{layer}-{len(outs)}.npy")
            p = subprocess.run([a.moectl, "forward", "--local", "--model", src, "--layer",
                                str(layer), "--in", os.path.join(d, f"x{layer}.npy"), "--out", y,
                                "--threads", "1", "-q"], capture_output=True, text=True)
            outs.append(np.load(y) if p.returncode == 0 else None)
        check(f"layer {layer}: the store's output equals the checkpoint's bit for bit",
              outs[0] is not None and outs[1] is not None and np.array_equal(outs[0], outs[1]))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
