#!/usr/bin/env python3
"""Greedy generation by a transformers model whose experts moed serves.

    moed --model mix=/models/mixtral --shm-socket /run/moed/shm.sock &
    python3 generate.py --model /models/mixtral --name mix --prompt "The capital of France is"

The model is loaded by transformers (attention, norms, the KV cache and the
embeddings stay in this process, in torch); its sparse MoE blocks are
attached to moed, which computes the router, the routed experts and the
shared experts.  With --compare, the same generation runs once more with
transformers' own blocks and the two are compared.

A checkpoint without a tokenizer (a randomly initialised test model) takes
token ids: --ids 1,2,3 (default: 8 fixed ids).
"""
import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import moed
from moed.hf import attach_experts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the checkpoint directory moed serves too")
    ap.add_argument("--name", help="the model's name in moed (default: the one that matches)")
    ap.add_argument("--socket", default="/run/moed/shm.sock", help="moed's shm_socket")
    ap.add_argument("--prompt", help="text (needs a tokenizer in the checkpoint)")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compare", action="store_true", help="also generate without moed and compare")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    tokenizer = None
    if a.prompt is not None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        prompt = tokenizer(a.prompt, return_tensors="pt").input_ids
    else:
        ids = [int(t) for t in a.ids.split(",")] if a.ids else [1, 5, 9, 13, 17, 21, 25, 29]
        prompt = torch.tensor([ids])

    def run() -> tuple[list[int], float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=0)
        return out[0, prompt.shape[1]:].tolist(), time.perf_counter() - t0

    def show(label: str, ids: list[int], seconds: float) -> None:
        text = tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids))
        print(f"{label} ({len(ids)} tokens, {len(ids) / seconds:.1f} tokens/s): {text}")

    try:
        with moed.connect(a.socket) as s:
            with attach_experts(model, s, a.name) as att:
                print(f"attached to moed's '{att.info.name}': {len(att.layers)} MoE layers "
                      f"({att.info.n_experts} experts, top-{att.info.top_k})")
                ids, seconds = run()
                show("with moed", ids, seconds)
    except (moed.MoedError, ValueError) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 1
    if a.compare:
        ref, seconds = run()
        show("transformers alone", ref, seconds)
        same = sum(1 for x, y in zip(ids, ref) if x == y)
        print(f"identical tokens: {same} of {len(ref)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
