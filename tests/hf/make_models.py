#!/usr/bin/env python3
"""Writes the checkpoints of the Hugging Face tier with transformers itself.

For each family of families.py: the model class that transformers maps the
config to (AutoModelForCausalLM.from_config: nothing from a hub), randomly
initialised with a fixed seed, router weights scaled up (ROUTER_SCALE) and,
for DeepSeek-V3, a random non-zero e_score_correction_bias (for gpt-oss a
random router bias); then
save_pretrained in float32 and bfloat16, as one model.safetensors and
sharded (max_shard_size small enough for at least two shards and an index).

The bfloat16 checkpoints are made the way a user gets one: the float32
checkpoint loaded with from_pretrained(dtype=torch.bfloat16), which keeps
what the model class keeps in float32 (DeepSeek-V3's router and bias), and
saved again.  save_pretrained is called with save_original_format=True (the
default in transformers 5: the per-expert tensor names) for the single and
sharded layouts, and with save_original_format=False for the fused one
(transformers' in-memory layout: gate_up_proj [E, 2F, H], down_proj [E, H, F]).

usage: make_models.py --workdir DIR [--force]
The checkpoints are reused when DIR/stamp.json says they were made by the
same transformers and torch versions and the same version of this script
and families.py; otherwise they are made again (seconds).
Exit 0 done, 1 failed.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families as fam  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def stamp():
    h = hashlib.sha256()
    for name in ("make_models.py", "families.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "scripts": h.hexdigest()[:16]}


def build(family, seed):
    """The family's model, float32, randomly initialised (seeded)."""
    torch.manual_seed(seed)
    cfg = fam.config_class(family)(**fam.config_kwargs(family))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            block = fam.moe_block(model, i)
            if block is None:
                continue
            w = fam.router(block).weight
            # Some routers start at zero until _init_weights; draw our own.
            w.copy_(torch.randn(w.shape, generator=g) * 0.02 * fam.ROUTER_SCALE)
            b = getattr(fam.router(block), "bias", None)
            if isinstance(b, torch.nn.Parameter):
                # gpt-oss's router bias starts at zero.
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.4)
            if hasattr(fam.router(block), "e_score_correction_bias"):
                b = block.gate.e_score_correction_bias
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.4)
            # Experts at a scale where the output is of order 1, not 1e-4.
            for name, p in block.experts.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def count_shards(d):
    return sum(1 for n in os.listdir(d) if n.endswith(".safetensors"))


def save(model, d, layout):
    shutil.rmtree(d, ignore_errors=True)
    kw = {"max_shard_size": fam.MAX_SHARD_SIZE} if layout in ("sharded", "fused") else {}
    # fused: transformers 5's own layout (mlp.experts.gate_up_proj, down_proj)
    model.save_pretrained(d, save_original_format=layout != "fused", **kw)
    n = count_shards(d)
    want_index = os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    if layout == "fused" and want_index:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            names = json.load(f)["weight_map"]
        if not any(k.endswith(".experts.gate_up_proj") for k in names):
            raise RuntimeError(f"{d}: save_original_format=False wrote no gate_up_proj")
    if layout in ("sharded", "fused") and (n < 2 or not want_index):
        raise RuntimeError(f"{d}: {n} shard(s) with max_shard_size {fam.MAX_SHARD_SIZE}: "
                           "expected at least 2 and an index")
    if layout == "single" and (n != 1 or want_index):
        raise RuntimeError(f"{d}: {n} files: expected one model.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(a.workdir, exist_ok=True)
    stamp_path = os.path.join(a.workdir, "stamp.json")
    want = stamp()
    ckpts = fam.checkpoints(a.workdir)
    if not a.force and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            have = json.load(f)
        if have == want and all(os.path.isdir(c[3]) for c in ckpts):
            print(f"hf-models: {len(ckpts)} checkpoints in {a.workdir} are current "
                  f"(transformers {want['transformers']}, torch {want['torch']})")
            return 0
    if os.path.exists(stamp_path):
        os.unlink(stamp_path)
    t0 = time.time()
    print(f"hf-models: transformers {transformers.__version__}, torch {torch.__version__}")
    for k, family in enumerate(fam.FAMILIES):
        model = build(family, seed=10 + k)
        f32 = {l: os.path.join(a.workdir, f"{family}-float32-{l}") for l in fam.LAYOUTS}
        for layout, d in f32.items():
            save(model, d, layout)
        del model
        bf16 = AutoModelForCausalLM.from_pretrained(f32["single"], dtype=torch.bfloat16)
        for layout in fam.LAYOUTS:
            save(bf16, os.path.join(a.workdir, f"{family}-bfloat16-{layout}"), layout)
        del bf16
        for dt in fam.DTYPES:
            for layout in fam.LAYOUTS:
                d = os.path.join(a.workdir, f"{family}-{dt}-{layout}")
                print(f"  {os.path.basename(d)}: {count_shards(d)} file(s)")
    with open(stamp_path, "w") as f:
        json.dump(want, f)
    print(f"hf-models: {len(ckpts)} checkpoints made in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
