#!/usr/bin/env python3
"""A transformers model with its experts in moed, against transformers alone.

A Mixtral-shaped model (hidden 4096, ffn 14336, 8 experts, top-2, 2 layers,
bfloat16; attention with 32 heads and 8 KV heads), randomly initialised by
transformers' own MixtralForCausalLM and saved with save_pretrained, is run:

  1. by transformers alone (its own MixtralSparseMoeBlock);
  2. by the same model object with its sparse MoE blocks attached to moed
     (moed.hf.attach_experts) over shared memory, moed serving the saved
     checkpoint with every expert resident.

Each measures decode (one token at a time with the KV cache, after a
16-token prompt: tokens/s) and the time of a prefill of --prefill tokens,
in the same run on the same machine, and prints each moed figure next to
transformers' as a ratio (the issue's target: faster at both, at least 2x at
decode).  The outputs are compared too (the last logits of the prefill).

Decode is split into the time inside the sparse MoE blocks and the rest of
the model (attention, norms, the head: torch's in both runs), and held
against its limit: the memory read bandwidth measured in the same run
(`bench-cpu-ffn --bandwidth`, with moed's threads) bounds how fast any code
can stream the routed experts' weights, so the fastest decode with moed is
the rest of the model plus those bytes at that bandwidth.  The benchmark
prints that ceiling and the speed-up it would give, and how close moed's
MoE blocks come to the bandwidth.

usage: bench-hf.py --build build [--quick] [--threads N] [--workdir DIR]
Runs with the Hugging Face environment's interpreter (scripts/hf-env.sh);
exit 0 after printing the figures, 1 on a failure, 77 when torch or
transformers is missing.  --quick: a small model (hidden 512, ffn 1792),
a check that the benchmark runs, for the test suite.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

# torch's OpenMP threads spin while they wait for work; with moed on the same
# cores, that spinning takes the CPU from moed's kernels while torch waits for
# moed's answer (0.82x at decode here with spinning, 1.2x without). A user who
# runs moed beside torch sets this too (docs/clients.md); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM
except ImportError as e:
    print(f"SKIP: {e} (run with the interpreter scripts/hf-env.sh prints)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import moed  # noqa: E402
from moed.hf import attach_experts  # noqa: E402

FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8)
QUICK = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8,
             num_key_value_heads=2)


def make_model(workdir, shape):
    """The model, saved once under workdir (reused while its config matches)."""
    cfg = MixtralConfig(vocab_size=1024, num_hidden_layers=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=4096,
                        tie_word_embeddings=False, **shape)
    tag = f"mixtral-{shape['hidden_size']}x{shape['intermediate_size']}-tf{transformers.__version__}"
    d = os.path.join(workdir, tag)
    torch.manual_seed(0)
    if os.path.exists(os.path.join(d, ".complete")):
        return MixtralForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval(), d
    print(f"bench-hf: making {d} (once)", flush=True)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MixtralForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for layer in model.model.layers:
            # Decisive routing, as in a trained model.
            layer.mlp.gate.weight.mul_(8)
    model.save_pretrained(d, max_shard_size="2GB")
    open(os.path.join(d, ".complete"), "w").close()
    return model, d


class Moed:
    def __init__(self, moed_bin, model_dir, sock, threads, log):
        self.p = subprocess.Popen(
            [moed_bin, "--model", f"bench={model_dir}", "--listen", "127.0.0.1:0",
             "--shm-socket", sock, "--threads", str(threads)],
            stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            if re.search(r"shared memory on", line):
                return
        self.p.kill()
        raise RuntimeError("moed did not start (see its log)")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


class BlockClock:
    """Seconds spent inside the model's sparse MoE blocks (whatever computes
    them: torch, or moed through the attachment), by forward hooks."""

    def __init__(self, model):
        self.total = 0.0
        self.t0 = 0.0
        self.handles = []
        for layer in model.model.layers:
            self.handles.append(layer.mlp.register_forward_pre_hook(self.pre))
            self.handles.append(layer.mlp.register_forward_hook(self.post))

    def pre(self, *_):
        self.t0 = time.perf_counter()

    def post(self, *_):
        self.total += time.perf_counter() - self.t0

    def remove(self):
        for h in self.handles:
            h.remove()


def decode_rate(model, steps, prompt):
    """Tokens/s of greedy decode with the KV cache, after the prompt, and
    the seconds per token inside the MoE blocks."""
    clock = BlockClock(model)
    try:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            clock.total = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(tok, cache=out.cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            dt = time.perf_counter() - t0
    finally:
        clock.remove()
    return steps / dt, clock.total / steps


def read_bandwidth(build, threads):
    """GB/s of `threads` threads streaming memory (bench-cpu-ffn
    --bandwidth), or None where that benchmark is not built."""
    exe = os.path.join(build, "tests", "bench-cpu-ffn")
    if not os.access(exe, os.X_OK):
        return None
    out = subprocess.run([exe, "--bandwidth", "--threads", str(threads)], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"^bandwidth \d+ ([0-9.]+)$", out, re.M)
    return float(m.group(1)) if m else None


def prefill_time(model, ids, repeats):
    """Best of `repeats` forwards of the whole prompt, and its last logits."""
    best = float("inf")
    logits = None
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(ids, use_cache=False)
            best = min(best, time.perf_counter() - t0)
            logits = out.logits[0, -1].float()
    return best, logits


def decode_limits(shape, cfg, threads, bw, tf_decode, tf_moe, md_decode, md_moe):
    """Prints where a decode token's time goes and the ceiling the memory
    bandwidth puts on it."""
    tf_tok, md_tok = 1 / tf_decode, 1 / md_decode
    print(f"decode ms/token: transformers {tf_tok * 1e3:.1f} ({tf_moe * 1e3:.1f} in the MoE blocks, "
          f"{(tf_tok - tf_moe) * 1e3:.1f} the rest); with moed {md_tok * 1e3:.1f} "
          f"({md_moe * 1e3:.1f} in the MoE blocks, {(md_tok - md_moe) * 1e3:.1f} the rest)")
    bws = [b for b in bw if b]
    if not bws:
        print("decode ceiling: not computed (bench-cpu-ffn not built)")
        return
    gbs = max(bws)
    # One token reads top-k experts' gate, up and down in bf16 per MoE layer.
    weights = (cfg.num_hidden_layers * cfg.num_experts_per_tok * 3 * shape["hidden_size"] *
               shape["intermediate_size"] * 2)
    floor = weights / (gbs * 1e9)
    ceiling = 1 / ((md_tok - md_moe) + floor)
    print(f"decode limit: {weights / 1e6:.0f} MB of expert weights per token at the read bandwidth "
          f"of {threads} threads measured in this run, {gbs:.1f} GB/s (best of "
          f"{', '.join(f'{b:.1f}' for b in bws)}): {floor * 1e3:.1f} ms")
    print(f"decode ceiling with the rest of the model as measured: {ceiling:.2f} tokens/s, "
          f"{ceiling / tf_decode:.2f}x transformers; moed's MoE blocks read at "
          f"{weights / md_moe / 1e9:.1f} GB/s, {floor / md_moe:.2f} of the bandwidth; "
          f"decode reached {md_decode / ceiling:.2f} of the ceiling")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--workdir", default=None, help="where the model is saved (default BUILD/bench-hf)")
    ap.add_argument("--threads", type=int, default=2, help="torch's and moed's CPU threads")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    shape = QUICK if a.quick else FULL
    workdir = a.workdir or os.path.join(a.build, "bench-hf")
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("MOED_CLIENT_LIB", os.path.join(a.build, "client", "libmoe-client.so.1"))
    model, d = make_model(workdir, shape)
    prefill = 64 if a.quick else a.prefill
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=g)

    print(f"bench-hf: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{a.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"hidden {shape['hidden_size']}, ffn {shape['intermediate_size']}, "
          "8 experts, top-2, 2 layers, bfloat16", flush=True)
    # transformers alone (warm: one short forward first).
    prefill_time(model, prompt, 1)
    bw = [read_bandwidth(a.build, a.threads)]
    tf_decode, tf_moe = decode_rate(model, a.decode, prompt)
    tf_prefill, tf_logits = prefill_time(model, ids, a.repeats)

    tmp = tempfile.mkdtemp(prefix="bench-hf-")
    sock = os.path.join(tmp, "shm.sock")
    with open(os.path.join(tmp, "moed.log"), "w+") as log:
        server = Moed(os.path.join(a.build, "daemon", "moed"), d, sock, a.threads, log)
        try:
            with moed.connect(sock) as s:
                att = attach_experts(model, s, "bench")
                prefill_time(model, prompt, 1)  # pages every needed expert in
                prefill_time(model, ids, 1)
                md_decode, md_moe = decode_rate(model, a.decode, prompt)
                bw.append(read_bandwidth(a.build, a.threads))
                md_prefill, md_logits = prefill_time(model, ids, a.repeats)
                att.detach()
        finally:
            server.stop()
    diff = float((md_logits - tf_logits).abs().max() / tf_logits.abs().max())

    rows = [("decode", "tokens/s", md_decode, tf_decode, md_decode / tf_decode),
            (f"prefill {prefill}", "s", md_prefill, tf_prefill, tf_prefill / md_prefill)]
    print(f"{'':<12} {'unit':<9} {'with moed':>10} {'transformers':>13} {'speed-up':>9}")
    for name, unit, m, t, r in rows:
        print(f"{name:<12} {unit:<9} {m:>10.3f} {t:>13.3f} {r:>8.2f}x")
    print(f"last-token logits, moed vs transformers: max difference {diff:.3g} of max |logit| "
          "(bf16: moed keeps activations in fp32)")
    decode_limits(shape, model.config, a.threads, bw, tf_decode, tf_moe, md_decode, md_moe)
    print(f"targets: decode >= 2x: {'met' if rows[0][4] >= 2 else 'NOT met'}; "
          f"prefill faster: {'met' if rows[1][4] > 1 else 'NOT met'}")
    return 0 if diff < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
