#!/usr/bin/env python3
"""torch's own MoE block on the GPU, on bench-gpu-moe's shapes: the peer
figure for moed's CUDA backend, measured on the same device.

The block is the loop transformers runs (MixtralSparseMoeBlock's experts:
for each expert hit, gather its tokens, gate/up, SiLU, down, weight and
index_add), written out here in plain torch so that only torch is needed.
Shapes: Mixtral (8 experts, top-2, hidden 4096, ffn 14336) and DeepSeek-V3
(256 experts, top-8, hidden 7168, ffn 2048, one shared expert), bf16,
uniform random routing; tokens 1, 8, 64 (decode: GB/s of the activated
experts' weights, next to a device-to-device copy) and 512, 4096 (prefill:
TFLOP/s).  Skips (77) without CUDA.  --quick: small shapes.
"""
import argparse
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)


def moe_block(x, w_gate_up, w_down, ids, weights, shared=None):
    """transformers' expert loop; w_gate_up [E, 2F, H], w_down [E, H, F]."""
    out = torch.zeros_like(x)
    E = w_gate_up.shape[0]
    mask = F.one_hot(ids, E).permute(2, 1, 0)  # [E, K, T]
    for e in torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist():
        pos, tok = torch.where(mask[e])
        h = x[tok]
        gate, up = F.linear(h, w_gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e]) * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    if shared is not None:
        g, u = F.linear(x, shared[0]).chunk(2, dim=-1)
        out += F.linear(F.silu(g) * u, shared[1])
    return out


def timeit(fn, reps):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return 77
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    shapes = [("mixtral", 8, 2, 4096, 14336, 0), ("deepseek-v3", 256, 8, 7168, 2048, 1)]
    if a.quick:
        shapes = [("mixtral-like", 8, 2, 1024, 3584, 0), ("deepseek-like", 32, 8, 1024, 512, 1)]
    reps = 2 if a.quick else 5
    buf = torch.empty(1 << 28 if not a.quick else 1 << 24, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    t = timeit(lambda: dst.copy_(buf), reps)
    d2d = 2 * buf.numel() / t
    print(f"device-to-device copy: {d2d * 1e-12:.3f} TB/s (read + write)")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, E, K, H, Fd, S in shapes:
        wgu = torch.randn(E, 2 * Fd, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        wd = torch.randn(E, H, Fd, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        shared = None
        if S:
            shared = (torch.randn(2 * Fd * S, H, device=dev, dtype=torch.bfloat16, generator=g),
                      torch.randn(H, Fd * S, device=dev, dtype=torch.bfloat16, generator=g))
        print(f"{name}: {E} experts, top-{K}, hidden {H}, ffn {Fd}, shared {S}")
        for T in (1, 8, 64, 512, 4096):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
            ids = torch.stack([torch.randperm(E, device=dev, generator=g)[:K] for _ in range(T)])
            w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1).to(torch.bfloat16)
            s = timeit(lambda: moe_block(x, wgu, wd, ids, w, shared), reps)
            hit = len(torch.unique(ids))
            wbytes = (hit + S) * 3 * H * Fd * 2
            flops = 2 * 3 * H * Fd * (T * K + T * S)
            if T <= 64:
                print(f"  {T:5d} tokens: {s * 1e3:8.3f} ms, {hit} experts, "
                      f"{wbytes / s * 1e-9:7.1f} GB/s of weights = {wbytes / s / d2d:.2f} of the copy")
            else:
                print(f"  {T:5d} tokens: {s * 1e3:8.3f} ms, {flops / s * 1e-12:7.1f} TFLOP/s")
        del wgu, wd, shared
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
