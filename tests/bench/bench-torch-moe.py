#!/usr/bin/env python3
"""torch's bf16 MoE block on bench-cpu-ffn's shapes, for its torch column.

The block is Hugging Face's MixtralSparseMoeBlock loop written out (so that
transformers is not needed): router in bf16, softmax in fp32, top-k,
renormalised, then per expert that has tokens
    current = x[top_x]
    h = w2(silu(w1(current)) * w3(current)) * routing_weight
    out.index_add_(0, top_x, h)
all in bf16 on the CPU, torch's own threads (set to --threads).

Prints one line of JSON per token count:
    {"tokens": T, "best_ms": ..., "median_ms": ..., "reps": N}
after a first line {"torch": version, "threads": N, "mkldnn_bf16": bool}.
Exit 77 when torch cannot be imported (the caller skips the column).

Usage: bench-torch-moe.py [--hidden H] [--ffn F] [--experts E] [--top-k K]
                          [--threads N] [--tokens N[,N...]] [--reps N]
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--reps", type=int, default=0)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as fn
    except ImportError as e:
        print(f"bench-torch-moe: torch not available ({e})", file=sys.stderr)
        return 77

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bf = torch.bfloat16
    H, F, E, K = a.hidden, a.ffn, a.experts, a.top_k

    def weight(rows, cols):
        bound = (3.0 / cols) ** 0.5
        return (torch.rand(rows, cols, dtype=torch.float32) * 2 - 1).mul_(bound).to(bf)

    gate = weight(E, H)
    w1 = [weight(F, H) for _ in range(E)]
    w3 = [weight(F, H) for _ in range(E)]
    w2 = [weight(H, F) for _ in range(E)]
    bf16_ok = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "mkldnn": bf16_ok}), flush=True)

    def block(x):
        logits = fn.linear(x, gate)
        rw = fn.softmax(logits, dim=1, dtype=torch.float)
        rw, sel = torch.topk(rw, K, dim=-1)
        rw /= rw.sum(dim=-1, keepdim=True)
        rw = rw.to(x.dtype)
        out = torch.zeros_like(x)
        mask = fn.one_hot(sel, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            idx, top_x = torch.where(mask[e])
            if top_x.numel() == 0:
                continue
            cur = x[top_x]
            h = fn.silu(fn.linear(cur, w1[e])) * fn.linear(cur, w3[e])
            h = fn.linear(h, w2[e]) * rw[top_x, idx, None]
            out.index_add_(0, top_x, h.to(x.dtype))
        return out

    with torch.inference_mode():
        for T in [int(t) for t in a.tokens.split(",") if t]:
            x = torch.randn(T, H, dtype=torch.float32).to(bf)
            reps = a.reps or (3 if T >= 256 else 5 if T >= 64 else 10)
            block(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                block(x)
                times.append(time.perf_counter() - t0)
            times.sort()
            print(json.dumps({"tokens": T, "best_ms": times[0] * 1e3,
                              "median_ms": times[len(times) // 2] * 1e3, "reps": reps}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
