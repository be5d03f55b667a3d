#!/usr/bin/env python3
"""moed against transformers itself, on checkpoints transformers wrote.

For every checkpoint that make_models.py wrote (five families, float32 and
bfloat16, one file and sharded) and every decoder layer:
  - `moectl inspect --json` reads the checkpoint unchanged and describes it
    as transformers built it (experts, top-k, routing options, shared
    experts, dtype, which layers are MoE);
  - a MoE layer: random hidden states (40 tokens, and a batch of 1) through
    transformers' own sparse MoE block (the module of the model loaded with
    AutoModelForCausalLM.from_pretrained) and through moed by three ways:
    `moectl forward --local`, gRPC Forward on a running `moed --model DIR`
    (a client made here from proto/moe.proto, not moed's), and shared memory
    (`moectl forward --socket` on moed's --shm-socket);
  - a dense layer (DeepSeek-V3's first, Qwen3-MoE's mlp_only_layers): moed
    refuses it by all three ways.

References.  "hf" is transformers' block in the checkpoint's dtype, as
transformers runs it.  For a bfloat16 checkpoint there is a second, "hf-f32":
the same model loaded with dtype=float32, i.e. the very same bfloat16
weights, exactly upcast, computed in float32.  moed computes with bfloat16
weights and float32 activations, so hf-f32 is what it should equal to
float32 rounding, and it is held to the float32 tolerance: that is the sharp
check of moed on bfloat16 checkpoints; "hf" checks that moed stays within
bfloat16 rounding of what transformers itself gives.

Checks, per token:
  - routed expert ids (as sets) equal the top-k of the block's router
    module, except near-ties (below), which are counted apart;
  - output: max |y_moed - y_ref| <= TOL * max |y_ref| of that token: 1e-5
    against a float32 reference, BF16_TOL against bfloat16 "hf".

bfloat16 tolerance.  transformers' bfloat16 block rounds every intermediate
to bfloat16 (unit roundoff u = 2^-8): the router logits, the gate and up
projections, silu, their product, the down projection, the routing weight
product and each step of the weighted sum (index_add_ in bfloat16).  moed
keeps activations in float32, so the difference to "hf" is transformers'
rounding alone (hf-f32 shows moed's own error is ~1e-6).  Per expert: the
four roundings of the expert's hidden state (gate, up, silu, product; u
relative each, independent) reach the output through the down projection as
a random walk, ~2u of the expert output's scale; the down projection's own
rounding and the weighting add u each; summing top_k <= 4 expert outputs
(plus a shared expert) in bfloat16 rounds the partial sums, up to u each.
Relative to the token's max |y| (and the routing weights summing to ~1, or
2.5 for DeepSeek-V3 whose max |y| grows alike) the worst case is ~(2 + 2 + 4)u
= 8u, the typical one 2-4u: BF16_TOL = 8u = 2^-5 = 3.1e-2.  The measured
worst is 1.5e-2 (~4u, OLMoE).  A looser bound would hide real defects: a
dropped shared-expert gate, a wrong routed_scaling_factor or renormalisation
change outputs by tens of percent.

Near-ties.  A token whose k-th and (k+1)-th selection scores (for DeepSeek-V3
also its topk_group-th and next group scores) are closer than the two
computations can be trusted to order them may be routed differently without
a defect: closer than 1e-5 of their magnitude in float32 and, for the
bfloat16 softmax families, whose router logits transformers rounds to
bfloat16 (<= u relative each, so two can swap only within 2u), closer than
4u of their magnitude.  DeepSeek-V3's router runs in float32 in both, on
float32 router weights (the model class keeps them in float32).  Such
tokens are counted as ties, and their output is not compared when moed
routed them otherwise.

usage: check_layers.py --models DIR --moectl PATH --moed PATH --source DIR
                       --workdir DIR [--family F ...] [--transport local|grpc|shm ...]
                       [--protoc PATH] [--threads N]
Exit 0 pass, 1 fail.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families as fam  # noqa: E402

F32_TOL = 1e-5
BF16_U = 2.0 ** -8
BF16_TOL = 8 * BF16_U
TIE_F32 = 1e-5
TIE_BF16 = 4 * BF16_U
TOKENS = (40, 1)
TRANSPORTS = ("local", "grpc", "shm")

failures = []


def fail(msg):
    print(f"FAIL {msg}")
    failures.append(msg)


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---- a gRPC client from proto/moe.proto -------------------------------------

class Grpc:
    """moe.v1.Experts/Forward through grpcio with messages made at run time
    from a descriptor set that protoc writes: no generated code, so no
    version coupling between protoc and the protobuf runtime."""

    def __init__(self, protoc, source, workdir, port):
        import grpc
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        desc = os.path.join(workdir, "moe.desc")
        r = run([protoc, f"-I{source}/proto", f"--descriptor_set_out={desc}", "moe.proto"])
        if r.returncode:
            raise RuntimeError(f"protoc: {r.stderr}")
        with open(desc, "rb") as f:
            fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
        pool = descriptor_pool.DescriptorPool()
        for fd in fds.file:
            pool.Add(fd)

        def cls(name):
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"moe.v1.{name}"))

        self.Request, self.Response = cls("ForwardRequest"), cls("ForwardResponse")
        self.dtypes = pool.FindEnumTypeByName("moe.v1.DType").values_by_name
        self.grpc = grpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.forward_rpc = self.channel.unary_unary(
            "/moe.v1.Experts/Forward", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self.Response.FromString)

    def forward(self, model, layer, x):
        """(output [T, H] float32, ids [T, k]) or raises grpc.RpcError."""
        req = self.Request(model=model, layer=layer, return_routing=True)
        req.hidden.shape.extend(x.shape)
        req.hidden.dtype = self.dtypes["DTYPE_F32"].number
        req.hidden.data = np.ascontiguousarray(x, dtype="<f4").tobytes()
        resp = self.forward_rpc(req, timeout=60)
        if resp.output.dtype != self.dtypes["DTYPE_F32"].number:
            raise RuntimeError(f"output dtype {resp.output.dtype}, asked for f32")
        y = np.frombuffer(resp.output.data, dtype="<f4").reshape(tuple(resp.output.shape))
        k = resp.routing.top_k
        if not k or len(resp.routing.expert_ids) != k * len(x):
            raise RuntimeError(f"routing asked for, got top_k {k} and "
                               f"{len(resp.routing.expert_ids)} ids for {len(x)} tokens")
        return y, np.array(resp.routing.expert_ids, dtype=np.int32).reshape(-1, k)


class Moed:
    """A moed serving the checkpoint directories given (`--model DIR`, so
    each is named after its directory), on loopback gRPC and a shm socket."""

    def __init__(self, moed, dirs, workdir):
        self.sock = os.path.join(workdir, "shm.sock")
        self.log = open(os.path.join(workdir, "moed.log"), "w+")
        args = [moed, "--listen", "127.0.0.1:0", "--shm-socket", self.sock]
        for d in dirs:
            args += ["--model", d]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = int(self._read(r"listening on port (\d+)"))
        self._read(r"shared memory on (\S+)")

    def _read(self, pattern):
        line = self.p.stdout.readline()
        m = re.search(pattern, line)
        if not m:
            self.p.kill()
            self.p.wait()
            self.log.seek(0)
            raise RuntimeError(f"moed: expected /{pattern}/, got {line!r}: {self.log.read()}")
        return m.group(1)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -1


# ---- the reference ----------------------------------------------------------

def bf16_round(x):
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def reference(block, x, dtype):
    """transformers' block on x [T, H] (float32 values, representable in the
    block's dtype): (y [T, H] float32, ids [T, k], tie [T] bool)."""
    t = torch.from_numpy(x).to(dtype).unsqueeze(0)
    with torch.no_grad():
        y = block(t)
        # gpt-oss's block returns (hidden states, router scores), the others
        # the hidden states alone.
        y = (y[0] if isinstance(y, tuple) else y).reshape(x.shape).float().numpy()
        idx = fam.route_ids(block, t.view(-1, t.shape[-1]))
    ids = idx.numpy().astype(np.int32)
    return y, ids, near_ties(block, x, dtype)


def near_ties(block, x, dtype):
    """Tokens whose selection at the top-k boundary (and, for group-limited
    routing, at the topk_group boundary) is too close to call."""
    g = fam.router(block)
    w = g.weight.detach().double().numpy()
    logits = x.astype(np.float64) @ w.T
    b = getattr(g, "bias", None)
    if isinstance(b, torch.Tensor):
        logits = logits + b.detach().double().numpy()  # gpt-oss's router bias
    k = g.top_k
    if hasattr(g, "e_score_correction_bias"):
        # DeepSeek-V3: float32 router in both; selection by sigmoid + bias,
        # in groups scored by their two best.
        s = 1.0 / (1.0 + np.exp(-logits)) + g.e_score_correction_bias.double().numpy()
        T, E = s.shape
        ng, kg = g.num_group, g.topk_group
        gs = np.sort(s.reshape(T, ng, E // ng), axis=-1)[..., -2:].sum(-1)
        gsort = -np.sort(-gs, axis=-1)
        tie = gsort[:, kg - 1] - gsort[:, kg] <= TIE_F32 * np.maximum(1, np.abs(gsort[:, kg - 1]))
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :kg]
        mask = np.zeros((T, ng), bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        masked = np.where(np.repeat(mask, E // ng, axis=-1), s, -np.inf)
        ssort = -np.sort(-masked, axis=-1)
        gap = ssort[:, k - 1] - ssort[:, k]
        return tie | (gap <= TIE_F32 * np.maximum(1, np.abs(ssort[:, k - 1])))
    # softmax families and Llama 4 select on the logits (softmax is monotonic).
    ls = -np.sort(-logits, axis=-1)
    mag = np.maximum(np.abs(ls[:, k - 1]), np.abs(ls[:, k]))
    eps = TIE_BF16 * mag if dtype == torch.bfloat16 else TIE_F32 * np.maximum(1, mag)
    return ls[:, k - 1] - ls[:, k] <= eps


# ---- the checks -------------------------------------------------------------

class Ref:
    """One reference answer for one input: transformers' block in the
    checkpoint's dtype ("hf"), or, for a bfloat16 checkpoint, the same
    weights upcast and run in float32 ("hf-f32")."""

    def __init__(self, label, block, x, dtype, tol):
        self.label, self.tol = label, tol
        self.y, self.ids, self.tie = reference(block, x, dtype)


class Stats:
    def __init__(self):
        self.worst = {}   # (family, dtype, ref label) -> worst per-token relative error
        self.ties = {}    # (family, dtype) -> near-tie tokens (of the "hf" reference)
        self.flipped = {}  # (family, dtype) -> of those, routed otherwise by moed
        self.rows = []    # [family, dtype, layout, layer, transports, {label: worst}, ties, tokens]


def compare(st, what, key, row, ref, y, ids, check_ids=True):
    """Checks one transport's answer (output y, routing ids when not None,
    checked when check_ids) against ref; returns its worst relative error."""
    if y.shape != ref.y.shape:
        fail(f"{what}: output shape {y.shape}, expected {ref.y.shape}")
        return float("inf")
    same = np.ones(len(y), bool)
    if ids is not None:
        if ids.shape != ref.ids.shape:
            fail(f"{what}: routing shape {ids.shape}, expected {ref.ids.shape}")
            return float("inf")
        same = np.array([set(a) == set(b) for a, b in zip(ids, ref.ids)])
        bad = np.nonzero(~same & ~ref.tie)[0]
        if check_ids and len(bad):
            t = bad[0]
            fail(f"{what}: {len(bad)} token(s) routed differently from {ref.label}, e.g. "
                 f"token {t}: moed {sorted(ids[t].tolist())}, transformers "
                 f"{sorted(ref.ids[t].tolist())}")
    scale = np.abs(ref.y).max(axis=1)
    err = np.abs(y - ref.y).max(axis=1) / np.maximum(scale, 1e-30)
    # A near-tie routed the other way legitimately gives another output.
    checked = same | ~ref.tie
    worst = float(err[checked].max()) if checked.any() else 0.0
    over = np.nonzero(checked & (err > ref.tol))[0]
    if len(over):
        t = over[np.argmax(err[over])]
        fail(f"{what}: {len(over)} token(s) beyond {ref.tol:.1e} x max|y| of {ref.label}, "
             f"worst token {t}: {err[t]:.3e} (max|y| {scale[t]:.3e})")
    k = key + (ref.label,)
    st.worst[k] = max(st.worst.get(k, 0.0), worst)
    row[5][ref.label] = max(row[5].get(ref.label, 0.0), worst)
    return worst


def check_dense(a, grpc, name, d, layer, xin, yout):
    """A layer transformers makes dense: moed refuses it by every way."""
    where = f"{name} layer {layer}"
    r = run([a.moectl, "forward", "--local", "--model", d, "--layer", str(layer),
             "--in", xin, "--out", yout, "-q"])
    if r.returncode == 0 or "dense" not in r.stderr:
        fail(f"{where}: dense in transformers, but forward --local says rc "
             f"{r.returncode}: {r.stderr.strip()!r}")
    # moed's own refusal names no "dense" but says there is no such MoE
    # layer; either is clear.
    refusal = re.compile(rf"dense|no MoE layer {layer}\b")
    if grpc:
        try:
            grpc.forward(name, layer, np.load(xin))
            fail(f"{where}: dense in transformers, but gRPC Forward answered")
        except grpc.grpc.RpcError as e:
            if (e.code() != grpc.grpc.StatusCode.INVALID_ARGUMENT or
                    not refusal.search(e.details() or "")):
                fail(f"{where}: gRPC refusal of a dense layer: {e.code()}: {e.details()!r}")
    if "shm" in a.transport:
        r = run([a.moectl, "forward", "--socket", a.sock, "--model", name, "--layer",
                 str(layer), "--in", xin, "--out", yout, "-q"])
        if r.returncode == 0 or not refusal.search(r.stderr):
            fail(f"{where}: dense in transformers, but forward --socket says rc "
                 f"{r.returncode}: {r.stderr.strip()!r}")


def check_inspect(name, info, model, dtype, layout):
    """moectl inspect --json against what transformers built from the same
    checkpoint: every field that decides the layer's output."""
    cfg = model.config
    blocks = [fam.moe_block(model, i) for i in range(cfg.num_hidden_layers)]
    b = next(x for x in blocks if x is not None)
    g = fam.router(b)
    llama4 = cfg.model_type == "llama4_text"
    gpt_oss = cfg.model_type == "gpt_oss"
    shared = (1 if hasattr(b, "shared_expert") else
              getattr(cfg, "n_shared_experts", 0) if hasattr(b, "shared_experts") else 0)
    want = {
        "architecture": fam.MODEL_TYPE_FAMILY.get(cfg.model_type, cfg.model_type),
        "layers": cfg.num_hidden_layers,
        "moe_layers": sum(x is not None for x in blocks),
        "hidden": cfg.hidden_size,
        "experts": b.experts.num_experts,
        "expert_ffn": getattr(b.experts, "intermediate_dim", None) or b.experts.intermediate_size,
        "top_k": g.top_k,
        # Mixtral's router always renormalises, DeepSeek-V2's and Llama 4's never.
        "norm_topk_prob": bool(getattr(g, "norm_topk_prob",
                                       cfg.model_type not in ("deepseek_v2", "llama4_text"))),
        "n_group": getattr(g, "num_group", 1),
        "topk_group": getattr(g, "topk_group", 1),
        "routed_scaling_factor": float(getattr(g, "routed_scaling_factor", 1.0)),
        "score_func": ("topk_sigmoid" if llama4 else
                       "sigmoid" if hasattr(g, "e_score_correction_bias") else "softmax"),
        "shared_experts": shared,
        "shared_expert_gate": hasattr(b, "shared_expert_gate"),
        "dtype": {"float32": "f32", "bfloat16": "bf16"}[dtype],
        # transformers keeps Llama 4's experts fused and transposed whatever
        # save_original_format says.
        # gpt-oss's: fused, transposed and interleaved, in every layout.
        "expert_layout": ("fused-transposed" if llama4 else "fused-interleaved" if gpt_oss else
                          "fused" if layout == "fused" else "per-expert"),
        "router_bias": gpt_oss,
        "expert_bias": gpt_oss,
        "activation": "swiglu_clamp" if gpt_oss else "silu",
    }
    if gpt_oss:
        want["swiglu_alpha"] = float(b.experts.alpha)
        want["swiglu_limit"] = float(b.experts.limit)
    for k, v in want.items():
        got = info.get(k)
        if isinstance(v, float) and isinstance(got, (int, float)):
            ok = abs(got - v) <= 1e-6 * abs(v)
        else:
            ok = got == v
        if not ok:
            fail(f"{name}: moectl inspect says {k} {got!r}, transformers {v!r}")
    kinds = ["dense" if x is None else "moe" for x in blocks]
    got = [e.get("kind") for e in info.get("layer_table", [])]
    if got != kinds:
        fail(f"{name}: moectl inspect's layers are {got}, transformers' {kinds}")


def check_checkpoint(a, st, grpc, family, dtype, layout, d):
    name = os.path.basename(d)
    r = run([a.moectl, "inspect", "--model", d, "--json"])
    if r.returncode:
        fail(f"{name}: moectl inspect: {r.stderr.strip()}")
        return
    info = json.loads(r.stdout)
    bf16 = dtype == "bfloat16"
    models = {"hf": (AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)),
                     getattr(torch, dtype), BF16_TOL if bf16 else F32_TOL)}
    if bf16:
        # The same bfloat16 weights, exactly, computed in float32: what moed
        # computes, so held to the float32 tolerance.
        models["hf-f32"] = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                            torch.float32, F32_TOL)
    for m, _, _ in models.values():
        m.eval()
    check_inspect(name, info, models["hf"][0], dtype, layout)
    packed = None
    if layout == "fused":
        # A packed store of the fused checkpoint: per-expert blobs (Llama 4's
        # and gpt-oss's transposed experts made plain), checked byte for byte
        # against the checkpoint, then served like it (local).
        packed = os.path.join(a.workdir, name + "-packed")
        r = run([a.moectl, "pack", "--model", d, "--out", packed, "-q"])
        if r.returncode == 0:
            r = run([a.moectl, "verify", "--pack", packed, "--model", d, "-q"])
        if r.returncode:
            fail(f"{name}: moectl pack/verify: {r.stderr.strip()}")
            packed = None
    cfg = models["hf"][0].config
    key = (family, dtype)
    st.ties.setdefault(key, 0)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    tmp = os.path.join(a.workdir, "io")
    os.makedirs(tmp, exist_ok=True)
    xin, yout, rout = (os.path.join(tmp, n) for n in ("x.npy", "y.npy", "r.npz"))
    for layer in range(cfg.num_hidden_layers):
        if fam.moe_block(models["hf"][0], layer) is None:
            np.save(xin, rng.standard_normal((3, cfg.hidden_size), dtype=np.float32))
            check_dense(a, grpc, name, d, layer, xin, yout)
            st.rows.append([family, dtype, layout, layer, "dense", {}, 0, 0])
            continue
        row = [family, dtype, layout, layer, ",".join(a.transport), {}, 0, 0]
        st.rows.append(row)
        for T in TOKENS:
            x = rng.standard_normal((T, cfg.hidden_size), dtype=np.float32)
            if bf16:
                x = bf16_round(x)
            refs = [Ref(label, fam.moe_block(m, layer), x, dt, tol)
                    for label, (m, dt, tol) in models.items()]
            ties = int(refs[0].tie.sum())
            row[6] += ties
            row[7] += T
            st.ties[key] += ties
            np.save(xin, x)
            w = f"{name} layer {layer} ({T} tokens)"
            answers = []  # (transport, y, ids, check_ids)
            if "local" in a.transport:
                r = run([a.moectl, "forward", "--local", "--model", d, "--layer", str(layer),
                         "--in", xin, "--out", yout, "--routing-out", rout, "-q"])
                if r.returncode:
                    fail(f"{w}: forward --local: {r.stderr.strip()}")
                else:
                    answers.append(("local", np.load(yout), np.load(rout)["ids"], True))
                if packed:
                    r = run([a.moectl, "forward", "--local", "--model", packed, "--layer",
                             str(layer), "--in", xin, "--out", yout, "--routing-out", rout, "-q"])
                    if r.returncode:
                        fail(f"{w}: forward --local of the packed store: {r.stderr.strip()}")
                    else:
                        answers.append(("packed", np.load(yout), np.load(rout)["ids"], True))
            if "grpc" in a.transport:
                try:
                    y, ids = grpc.forward(name, layer, x)
                    answers.append(("gRPC", y, ids, True))
                except Exception as e:  # noqa: BLE001 (an RpcError or a bad answer)
                    fail(f"{w}: gRPC Forward: {e}")
            if "shm" in a.transport:
                r = run([a.moectl, "forward", "--socket", a.sock, "--model", name, "--layer",
                         str(layer), "--in", xin, "--out", yout, "-q"])
                if r.returncode:
                    fail(f"{w}: forward --socket: {r.stderr.strip()}")
                else:
                    # shm returns no routing: its tokens are judged by the
                    # routing moed gave the same input the other ways (it
                    # routes deterministically), or by transformers' when
                    # none ran.
                    ids = answers[0][2] if answers else None
                    answers.append(("shm", np.load(yout), ids, False))
            if answers and answers[0][2] is not None:
                ids = answers[0][2]
                flipped = sum(set(u) != set(v) for u, v in zip(ids, refs[0].ids))
                st.flipped[key] = st.flipped.get(key, 0) + int(flipped)
            for tr, y, ids, check_ids in answers:
                for ref in refs:
                    compare(st, f"{w} {tr}", key, row, ref, y, ids, check_ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="the directory make_models.py wrote")
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--moed", help="needed for the grpc and shm transports")
    ap.add_argument("--protoc", default="protoc", help="makes the gRPC client's descriptors")
    ap.add_argument("--source", required=True, help="the source tree (for proto/)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--family", action="append", choices=fam.FAMILIES)
    ap.add_argument("--transport", action="append", choices=TRANSPORTS)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads")
    a = ap.parse_args()
    a.transport = a.transport or list(TRANSPORTS)
    if not a.moed and ("grpc" in a.transport or "shm" in a.transport):
        ap.error("--moed is needed for the grpc and shm transports (or --transport local)")
    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    ckpts = [c for c in fam.checkpoints(a.models) if c[0] in (a.family or fam.FAMILIES)]
    missing = [c[3] for c in ckpts if not os.path.isdir(c[3])]
    if missing:
        print(f"FAIL missing checkpoints (run make_models.py): {', '.join(missing)}")
        return 1

    moed = grpc = None
    if "grpc" in a.transport or "shm" in a.transport:
        moed = Moed(a.moed, [c[3] for c in ckpts], a.workdir)
        a.sock = moed.sock
        grpc = Grpc(a.protoc, a.source, a.workdir, moed.port) if "grpc" in a.transport else None
    st = Stats()
    try:
        for family, dtype, layout, d in ckpts:
            check_checkpoint(a, st, grpc, family, dtype, layout, d)
    finally:
        if moed:
            rc = moed.stop()
            if rc != 0:
                fail(f"moed exited with {rc} on SIGTERM (log: {a.workdir}/moed.log)")

    print(f"\n{'family':12} {'dtype':9} {'layout':8} {'layer':>5}  {'transports':15} "
          f"{'vs hf':>9} {'vs hf-f32':>9}  {'ties':>7}")
    for f, dt, lay, layer, tr, worst, ties, n in st.rows:
        e1 = f"{worst['hf']:.2e}" if "hf" in worst else "-"
        e2 = f"{worst['hf-f32']:.2e}" if "hf-f32" in worst else "-"
        t = "-" if tr == "dense" else f"{ties}/{n}"
        print(f"{f:12} {dt:9} {lay:8} {layer:5}  {tr:15} {e1:>9} {e2:>9}  {t:>7}")
    print("\nworst per-token error / max|y| over layers, layouts and transports; hf is "
          "transformers' block in the checkpoint's dtype, hf-f32 the same weights in float32 "
          f"(tolerance: float32 {F32_TOL:.0e}, bfloat16 {BF16_TOL:.2e} = 8 x 2^-8):")
    for f, dt in st.ties:
        e1 = st.worst.get((f, dt, "hf"), 0.0)
        e2 = st.worst.get((f, dt, "hf-f32"))
        print(f"  {f:12} {dt:9} hf {e1:.2e}" + (f"  hf-f32 {e2:.2e}" if e2 is not None else
                                                  " " * 17) +
              f"   near-ties {st.ties[(f, dt)]} ({st.flipped.get((f, dt), 0)} routed "
              "otherwise by moed)")
    print(f"{time.time() - t0:.1f} s")
    if failures:
        print(f"{len(failures)} failed")
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
