#!/usr/bin/env python3
"""moed on gpt-oss's MXFP4 experts as released, against transformers' own
dequantized model.

make_models.py's gpt_oss model (float32, random) is saved by transformers;
its experts are then quantized here to MXFP4 in the exact layout of the
gpt-oss release (transformers has no CPU quantizer: its Mxfp4Quantize needs
triton kernels, so the blocks are written with numpy following the format
that transformers' dequantize reads, integrations/mxfp4.py):
  - per row of the [out, in] matrix (gate_up_proj [E, H, 2F] transposed to
    [E, 2F, H], so that row 2f is gate f and row 2f + 1 up f; down_proj
    [E, F, H] to [E, H, F]), blocks of 32 values, one e8m0 scale each (the
    least power of two with max |w| / 2^s <= 6, stored as s + 127), each
    value the nearest of transformers' FP4_VALUES times 2^s, packed two per
    byte, the low nibble first;
  - <proj>_blocks uint8 [E, rows, in / 32, 16], <proj>_scales uint8
    [E, rows, in / 32]; the biases kept (float32 here); config.json gets
    quantization_config {"quant_method": "mxfp4", "modules_to_not_convert":
    [...]} as released.
transformers loads it with Mxfp4Config(dequantize=True) on the CPU
(dtype=float32), so its MoE blocks compute in float32 on the weights moed
computes with.  Checks:
  - `moectl inspect --json` reports mxfp4, block [1, 32], e8m0 scales, the
    layout fused-interleaved-mxfp4 and the stored bytes per expert;
  - transformers' dequantized gate_up_proj and down_proj equal, bit for bit,
    the dequantization of the blocks computed here;
  - every layer, 24 random tokens: `moectl forward --local` on the MXFP4
    checkpoint against transformers' block, max |diff| <= 1e-5 x max |y|
    per token (routing ids equal);
  - the same through a running moed when --moed is given (`moed --model
    DIR`, `moectl forward --socket` on its shared memory socket);
  - the error of the MXFP4 layer against the float32 original is reported.

usage: check_mxfp4.py --moectl PATH --workdir DIR [--moed PATH]
Exit 0 pass, 1 fail, 77 skip (transformers cannot dequantize MXFP4 here).
"""
import argparse
import json
import os
import re
import shutil
import signal
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

F32_TOL = 1e-5
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64)
failures = []


def fail(msg):
    print(f"FAIL {msg}")
    failures.append(msg)


def quantize(w):
    """float32 [..., R, C] -> (uint8 blocks [..., R, C/32, 16], uint8 scales [..., R, C/32])."""
    w = np.asarray(w, dtype=np.float64)
    *pre, R, C = w.shape
    b = w.reshape(*pre, R, C // 32, 32)
    amax = np.abs(b).max(axis=-1)
    with np.errstate(divide="ignore"):
        s = np.where(amax > 0, np.ceil(np.log2(amax / 6.0)), 0.0)
    # log2 can land a hair off an exact power of two: the least s with
    # amax / 2^s <= 6
    s = np.where(amax / np.exp2(s) > 6.0, s + 1, s)
    s = np.where((amax > 0) & (amax / np.exp2(s - 1) <= 6.0), s - 1, s)
    s = np.clip(s, -127, 127)
    x = b / np.exp2(s)[..., None]
    # nearest FP4 value (the positive codes 0-7; the first of equals, then the sign)
    mag = np.abs(x)[..., None]
    code = np.argmin(np.abs(mag - FP4[:8]), axis=-1).astype(np.uint8)
    code = np.where((x < 0) & (code > 0), code | 8, code).astype(np.uint8)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return packed, (s + 127).astype(np.uint8)


def dequantize(blocks, scales):
    """The inverse, as transformers' _convert_moe_packed_tensors: [..., R, C] float32."""
    lo = FP4[blocks & 15]
    hi = FP4[blocks >> 4]
    v = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = v * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return v.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def make_mxfp4(d32, d4, n_layers):
    """Writes d4: d32's checkpoint with its experts in MXFP4; returns the
    dequantized [E, 2F, H] and [E, H, F] of each layer."""
    os.makedirs(d4, exist_ok=True)
    sd = load_file(os.path.join(d32, "model.safetensors"))
    out, ref = {}, {}
    for k, v in sd.items():
        if k.endswith(".mlp.experts.gate_up_proj") or k.endswith(".mlp.experts.down_proj"):
            w = v.float().numpy().transpose(0, 2, 1)  # [E, out, in]
            blocks, scales = quantize(w)
            out[k + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            out[k + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
            ref[k] = dequantize(blocks, scales)
        else:
            out[k] = v
    for i in range(n_layers):
        if f"model.layers.{i}.mlp.experts.gate_up_proj" not in ref:
            fail(f"layer {i}: no experts quantized")
    save_file(out, os.path.join(d4, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d32, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4"}
    with open(os.path.join(d4, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return ref


def start_moed(moed, model_dir, work):
    """A moed serving model_dir (named after it) on a shared memory socket
    in work, as check_layers.py starts it; (proc, socket)."""
    sock = os.path.join(work, "shm.sock")
    log = open(os.path.join(work, "moed.log"), "w+")
    p = subprocess.Popen([moed, "--listen", "127.0.0.1:0", "--shm-socket", sock, "--model",
                          model_dir], stdout=subprocess.PIPE, stderr=log, text=True)
    for pattern in (r"listening on port (\d+)", r"shared memory on (\S+)"):
        line = p.stdout.readline()
        if not re.search(pattern, line):
            p.kill()
            p.wait()
            log.seek(0)
            fail(f"moed: expected /{pattern}/, got {line!r}: {log.read()[-2000:]}")
            return None, None
    return p, sock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--moed")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = a.workdir
    os.makedirs(work, exist_ok=True)
    d32, d4 = os.path.join(work, "gpt_oss-f32"), os.path.join(work, "gpt_oss-mxfp4")
    shutil.rmtree(d32, ignore_errors=True)
    shutil.rmtree(d4, ignore_errors=True)
    model32 = make_models.build("gpt_oss", 23)
    model32.save_pretrained(d32, safe_serialization=True, max_shard_size="1GB")
    cfg = model32.config
    ref = make_mxfp4(d32, d4, cfg.num_hidden_layers)
    E, F, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size

    r = subprocess.run([a.moectl, "inspect", "--model", d4, "--json"], capture_output=True,
                       text=True)
    if r.returncode:
        fail(f"moectl inspect: {r.stderr.strip()}")
    else:
        j = json.loads(r.stdout)
        q = j.get("quantization")
        if not q or q.get("format") != "mxfp4" or q.get("block") != [1, 32] or \
                q.get("scale_dtype") != "e8m0":
            fail(f"inspect says quantization {q}")
        if j.get("expert_layout") != "fused-interleaved-mxfp4":
            fail(f"inspect says layout {j.get('expert_layout')}")
        want = 3 * F * H // 2 + 3 * F * H // 32
        if j.get("bytes_per_expert") != want:
            fail(f"inspect says {j.get('bytes_per_expert')} bytes per expert, stored {want}")

    try:
        model4 = AutoModelForCausalLM.from_pretrained(
            d4, dtype=torch.float32,
            quantization_config=transformers.Mxfp4Config(dequantize=True))
    except Exception as e:  # transformers without CPU MXFP4 dequantizing
        print(f"SKIP: transformers {transformers.__version__} cannot dequantize the MXFP4 "
              f"checkpoint on this machine: {e}")
        return 77
    model4.eval()

    daemon, sock = (None, None)
    if a.moed:
        daemon, sock = start_moed(a.moed, d4, work)
    worst, worst_q = 0.0, 0.0
    rng = np.random.default_rng(5)
    try:
        for i in range(cfg.num_hidden_layers):
            block = fam.moe_block(model4, i)
            ex = block.experts
            gu = ex.gate_up_proj.detach().float().numpy()  # [E, H, 2F]
            dn = ex.down_proj.detach().float().numpy()  # [E, F, H]
            if gu.shape != (E, H, 2 * F) or dn.shape != (E, F, H):
                fail(f"layer {i}: transformers' experts {gu.shape} {dn.shape}")
                continue
            if not np.array_equal(gu, ref[f"model.layers.{i}.mlp.experts.gate_up_proj"]
                                  .transpose(0, 2, 1)) or \
                    not np.array_equal(dn, ref[f"model.layers.{i}.mlp.experts.down_proj"]
                                       .transpose(0, 2, 1)):
                fail(f"layer {i}: transformers' dequantized experts differ from the blocks "
                     "decoded here")

            x = rng.standard_normal((24, H)).astype("f4")
            xin, yout = os.path.join(work, "x.npy"), os.path.join(work, "y.npy")
            np.save(xin, x)
            with torch.no_grad():
                t = torch.from_numpy(x)
                out = block(t.unsqueeze(0))
                yh = (out[0] if isinstance(out, tuple) else out)[0].float().numpy()
                hid = fam.route_ids(block, t).numpy()
                o32 = fam.moe_block(model32, i)(t.unsqueeze(0))
                y32 = (o32[0] if isinstance(o32, tuple) else o32)[0].float().numpy()
            runs = [("forward --local", [a.moectl, "forward", "--local", "--model", d4])]
            if sock:
                # shared memory: no routing comes back; judged by the routing
                # forward --local gave (moed routes deterministically)
                runs.append(("moed, shared memory", [a.moectl, "forward", "--socket", sock,
                                                      "--model", os.path.basename(d4)]))
            ids = None
            for what, cmd in runs:
                if os.path.exists(yout):
                    os.remove(yout)
                local = "--local" in cmd
                r = subprocess.run(cmd + ["--layer", str(i), "--in", xin, "--out", yout, "-q"] +
                                   (["--routing-out", os.path.join(work, "r.npz")] if local
                                    else []), capture_output=True, text=True)
                if r.returncode:
                    fail(f"layer {i}: moectl {what}: {r.stderr.strip()}")
                    continue
                y = np.load(yout)
                if local:
                    ids = np.load(os.path.join(work, "r.npz"))["ids"]
                if ids is None:
                    ids = hid
                same = [set(p) == set(q) for p, q in zip(ids.tolist(), hid.tolist())]
                if not all(same):
                    fail(f"layer {i} ({what}): {same.count(False)} tokens routed otherwise")
                scale = np.maximum(np.abs(yh).max(axis=1), 1e-30)
                err = (np.abs(y - yh).max(axis=1) / scale)[same].max()
                worst = max(worst, err)
                if err > F32_TOL:
                    fail(f"layer {i} ({what}): max |moed - transformers| = {err:.3g} x max |y| "
                         f"(tolerance {F32_TOL})")
                print(f"layer {i} ({what}): moed vs transformers' dequantized block {err:.2g}")
            qerr = np.linalg.norm(yh - y32) / np.linalg.norm(y32)
            worst_q = max(worst_q, qerr)
            print(f"layer {i}: mxfp4 vs the float32 layer {qerr:.4f} (reported)")
    finally:
        if daemon:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
    print(f"worst {worst:.2g} (tolerance {F32_TOL}); mxfp4 quantization error up to "
          f"{worst_q:.4f}")
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("mxfp4 against transformers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
