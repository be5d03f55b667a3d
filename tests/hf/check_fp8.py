#!/usr/bin/env python3
"""moed on FP8 checkpoints as DeepSeek-V3 and Qwen3 FP8 publish them, against
transformers' own dequantized model.

For qwen3_moe and deepseek_v3 (make_models.py's models, float32): every
routed and shared expert weight is quantized here with torch, the way the
FP8 releases are made: per 128 x 128 block, scale = max |w| / 448, the
weight divided by it and cast to torch.float8_e4m3fn, the scale stored as
float32 "<name>_scale_inv"; config.json gets quantization_config
{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}.

transformers loads such a checkpoint on a CPU by dequantizing it
(FineGrainedFP8, dequantize on load: value times weight_scale_inv); loaded
with dtype=float32, its MoE blocks then compute in float32 on exactly the
weights moed computes with.  Checks:
  - `moectl inspect --json` reports the fp8 quantization, 128 x 128;
  - transformers' dequantized expert weights equal, bit for bit, the fp8
    values times their scales computed here in float32;
  - every MoE layer, 24 random tokens: `moectl forward --local` on the FP8
    checkpoint against transformers' block, max |diff| <= 1e-5 x max |y|
    per token (routing ids equal);
  - the error of the FP8 layer against the float32 original is reported.

usage: check_fp8.py --moectl PATH --workdir DIR
Exit 0 pass, 1 fail, 77 skip (transformers cannot load FP8 here).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families as fam  # noqa: E402
import make_models  # noqa: E402

BLOCK = 128
F32_TOL = 1e-5
failures = []


def fail(msg):
    print(f"FAIL {msg}")
    failures.append(msg)


def is_expert_weight(name):
    return (".mlp.experts." in name or ".mlp.shared_experts." in name) and \
        name.endswith("_proj.weight")


def quantize(w):
    """float32 [R, C] -> (float8_e4m3fn [R, C], float32 scales [ceil(R/128), ceil(C/128)])."""
    R, C = w.shape
    sr, sc = -(-R // BLOCK), -(-C // BLOCK)
    pad = torch.zeros(sr * BLOCK, sc * BLOCK, dtype=torch.float32)
    pad[:R, :C] = w
    blocks = pad.view(sr, BLOCK, sc, BLOCK).abs().amax(dim=(1, 3))
    scale = torch.clamp(blocks / 448.0, min=1e-12)
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:R, :C]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def dequant(q, scale):
    R, C = q.shape
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:R, :C]
    return q.to(torch.float32) * full


def make_fp8(family, d32, d8):
    """Writes d8: d32's checkpoint with its expert weights in FP8."""
    os.makedirs(d8, exist_ok=True)
    sd = load_file(os.path.join(d32, "model.safetensors"))
    out, ref = {}, {}
    for k, v in sd.items():
        if is_expert_weight(k) and v.dim() == 2:
            q, s = quantize(v.float())
            out[k], out[k + "_scale_inv"] = q, s
            ref[k] = dequant(q, s)
        else:
            out[k] = v
    save_file(out, os.path.join(d8, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d32, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    with open(os.path.join(d8, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return ref


def expert_weight(block, e, part):
    """transformers' weight of expert e's part (gate, up, down) as [out, in]."""
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):
        gu = ex.gate_up_proj[e]  # [2F, H]: gate rows, then up rows
        if part == "down":
            return ex.down_proj[e].float()
        half = gu.shape[0] // 2
        return (gu[:half] if part == "gate" else gu[half:]).float()
    return getattr(ex[e], f"{part}_proj").weight.float()


def check_family(family, moectl, work):
    d32, d8 = os.path.join(work, f"{family}-f32"), os.path.join(work, f"{family}-fp8")
    shutil.rmtree(d32, ignore_errors=True)
    shutil.rmtree(d8, ignore_errors=True)
    model32 = make_models.build(family, 21)
    model32.save_pretrained(d32, safe_serialization=True, max_shard_size="1GB")
    ref = make_fp8(family, d32, d8)

    r = subprocess.run([moectl, "inspect", "--model", d8, "--json"], capture_output=True,
                       text=True)
    if r.returncode:
        fail(f"{family}: moectl inspect: {r.stderr.strip()}")
        return
    q = json.loads(r.stdout).get("quantization")
    if not q or q.get("format") != "fp8" or q.get("block") != [BLOCK, BLOCK]:
        fail(f"{family}: inspect says quantization {q}")

    try:
        import accelerate  # noqa: F401
    except ImportError:
        # FineGrainedFP8's environment check asks for accelerate, which
        # dequantizing on load does not use; the HF venv has none.
        import transformers.quantizers.quantizer_finegrained_fp8 as qf8
        qf8.is_accelerate_available = lambda: True
        print("note: accelerate missing; transformers' FP8 quantizer told it is there "
              "(its CPU dequantizing path does not use it)")
    try:
        model8 = AutoModelForCausalLM.from_pretrained(d8, dtype=torch.float32)
    except Exception as e:  # transformers without CPU FP8 support
        print(f"SKIP: transformers {transformers.__version__} cannot load the FP8 "
              f"checkpoint on this machine: {e}")
        sys.exit(77)
    model8.eval()
    cfg = model8.config
    worst, worst_q = 0.0, 0.0
    rng = np.random.default_rng(5)
    for i in range(cfg.num_hidden_layers):
        block = fam.moe_block(model8, i)
        if block is None:
            continue
        # transformers' dequantized weights are the fp8 values times their scales
        E = fam.router(block).weight.shape[0]
        bad = 0
        if not any(k.startswith(f"model.layers.{i}.mlp.experts.") for k in ref):
            fail(f"{family} layer {i}: no expert was quantized")
        for e in range(E):
            for part in ("gate", "up", "down"):
                name = f"model.layers.{i}.mlp.experts.{e}.{part}_proj.weight"
                if not torch.equal(expert_weight(block, e, part), ref[name]):
                    bad += 1
        if bad:
            fail(f"{family} layer {i}: {bad} expert weights differ from value x weight_scale_inv")

        x = rng.standard_normal((24, cfg.hidden_size)).astype("f4")
        xin = os.path.join(work, "x.npy")
        yout = os.path.join(work, "y.npy")
        np.save(xin, x)
        r = subprocess.run([moectl, "forward", "--local", "--model", d8, "--layer", str(i),
                            "--in", xin, "--out", yout, "--routing-out",
                            os.path.join(work, "r.npz"), "-q"], capture_output=True, text=True)
        if r.returncode:
            fail(f"{family} layer {i}: moectl forward: {r.stderr.strip()}")
            continue
        y = np.load(yout)
        ids = np.load(os.path.join(work, "r.npz"))["ids"]
        with torch.no_grad():
            t = torch.from_numpy(x)
            yh = block(t.unsqueeze(0))[0].float().numpy()
            hid = fam.route_ids(block, t).numpy()
            y32 = fam.moe_block(model32, i)(t.unsqueeze(0))[0].float().numpy()
        same = [set(a) == set(b) for a, b in zip(ids.tolist(), hid.tolist())]
        if not all(same):
            fail(f"{family} layer {i}: {same.count(False)} tokens routed otherwise")
        scale = np.maximum(np.abs(yh).max(axis=1), 1e-30)
        err = (np.abs(y - yh).max(axis=1) / scale)[same].max()
        worst = max(worst, err)
        if err > F32_TOL:
            fail(f"{family} layer {i}: max |moed - transformers| = {err:.3g} x max |y| "
                 f"(tolerance {F32_TOL})")
        qerr = np.linalg.norm(yh - y32) / np.linalg.norm(y32)
        worst_q = max(worst_q, qerr)
        print(f"{family} layer {i}: moed vs transformers' dequantized block {err:.2g}; "
              f"fp8 vs the float32 layer {qerr:.4f} (reported)")
    print(f"{family}: worst {worst:.2g} (tolerance {F32_TOL}); fp8 quantization error up to "
          f"{worst_q:.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.workdir, exist_ok=True)
    for family in ("qwen3_moe", "deepseek_v3"):
        check_family(family, a.moectl, a.workdir)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("fp8 against transformers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
