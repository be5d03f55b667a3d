"""An independent float64 reference of the MoE layers moed serves.

It reads Hugging Face checkpoints itself (config.json, safetensors headers
parsed with the json module, tensors with numpy) and implements each family's
routing rule and the SwiGLU experts in float64, sharing no code with moed.
Used by the end-to-end tests to check `moectl forward --local`.
"""
import json
import os
import struct

import numpy as np


class Checkpoint:
    """Tensors of a checkpoint directory, by name, as float64 arrays."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "config.json")) as f:
            self.cfg = json.load(f)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.tensors = {}
        for name in files:
            fpath = os.path.join(path, name)
            with open(fpath, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            for tname, info in header.items():
                if tname == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.tensors[tname] = (fpath, info["dtype"], info["shape"], 8 + n + begin, 8 + n + end)

    def has(self, name):
        return name in self.tensors or self._mxfp4(name)

    def _mxfp4(self, name):
        """gpt-oss's MXFP4 experts as released: name_blocks and name_scales."""
        return name + "_blocks" in self.tensors and name + "_scales" in self.tensors

    # transformers' FP4_VALUES (integrations/mxfp4.py): e2m1 code -> value
    FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

    def get(self, name):
        if name not in self.tensors and self._mxfp4(name):
            # As transformers' dequantize: blocks [E, R, G, 16] (two e2m1
            # codes a byte, the low nibble first), scales [E, R, G] (e8m0,
            # 2^(s - 127)), to [E, R, G * 32], transposed to [E, G * 32, R]:
            # the layout of the bf16 gate_up_proj and down_proj.
            b = self.raw(name + "_blocks").astype(np.int64)
            s = self.raw(name + "_scales").astype(np.float64)
            v = np.stack([self.FP4[b & 15], self.FP4[b >> 4]], axis=-1)
            v = v.reshape(*b.shape[:-1], 32) * np.exp2(s - 127)[..., None]
            return v.reshape(b.shape[0], b.shape[1], -1).transpose(0, 2, 1)
        fpath, dtype, shape, begin, end = self.tensors[name]
        with open(fpath, "rb") as f:
            f.seek(begin)
            raw = f.read(end - begin)
        if dtype == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F16":
            a = np.frombuffer(raw, dtype="<f2")
        elif dtype == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        else:
            raise ValueError(f"{name}: dtype {dtype} not handled by the reference")
        return a.astype(np.float64).reshape(shape)

    def raw(self, name):
        """A U8 tensor's bytes, shaped."""
        fpath, dtype, shape, begin, end = self.tensors[name]
        if dtype != "U8":
            raise ValueError(f"{name}: dtype {dtype}, expected U8")
        with open(fpath, "rb") as f:
            f.seek(begin)
            return np.frombuffer(f.read(end - begin), dtype=np.uint8).reshape(shape)


class Family:
    """The routing rule and tensor names of one model family, from config.json
    (transformers' config defaults where a key is absent)."""

    def __init__(self, cfg):
        self.layers = "model.layers"
        if cfg["model_type"] == "qwen3_5_moe":
            # The released, multimodal config: the text model's keys.
            cfg = cfg["text_config"]
            self.layers = "model.language_model.layers"
        elif cfg["model_type"] == "llama4":
            cfg = cfg["text_config"]
            self.layers = "language_model.model.layers"
        self.cfg = cfg
        mt = cfg["model_type"]
        if mt == "qwen3_5_moe_text":
            mt = "qwen3_5_moe"
        self.model_type = mt
        self.v2_groups = False  # DeepSeek-V2: groups scored by their best softmax
        self.shared_gate = False
        self.shared = None
        self.bias = False
        self.sigmoid = False
        self.n_group = self.topk_group = 1
        self.scale = 1.0
        self.topk_sigmoid = False  # Llama 4: top-k of the logits, sigmoid scales the input
        self.gpt_oss = False  # router bias, expert biases, clamped SwiGLU
        self.k = cfg["num_experts_per_tok"]
        if mt == "gpt_oss":
            # GptOssMLP: logits + bias, top-k, softmax over the k (the
            # renormalised softmax); transformers' GptOssConfig defaults.
            self.E = cfg.get("num_local_experts", cfg.get("num_experts"))
            self.moe = "mlp"
            self.proj = None
            self.norm = True
            self.gpt_oss = True
            self.alpha = cfg.get("swiglu_alpha", 1.702)
            self.limit = cfg.get("swiglu_limit", 7.0)
        elif mt == "llama4_text":
            self.E = cfg["num_local_experts"]
            self.moe = "feed_forward"
            self.proj = ("gate_proj", "up_proj", "down_proj")
            self.norm = False
            self.topk_sigmoid = True
            self.shared = "shared_expert"
        elif mt == "mixtral":
            self.E = cfg["num_local_experts"]
            self.moe = "block_sparse_moe"
            self.proj = ("w1", "w3", "w2")
            self.norm = True
        elif mt in ("qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next", "qwen3_5_moe"):
            self.E = cfg["num_experts"]
            self.moe = "mlp"
            self.proj = ("gate_proj", "up_proj", "down_proj")
            # Qwen3-Next renormalises by default, Qwen3.5-MoE always.
            self.norm = (mt == "qwen3_5_moe" or
                         bool(cfg.get("norm_topk_prob", mt == "qwen3_next")))
            shared_default = 0 if mt == "qwen2_moe" else 512
            if (mt in ("qwen2_moe", "qwen3_next", "qwen3_5_moe") and
                    cfg.get("shared_expert_intermediate_size", shared_default) > 0):
                self.shared = "shared_expert"
                self.shared_gate = True
        elif mt in ("deepseek_v3", "kimi_k2", "glm4_moe"):
            glm = mt == "glm4_moe"
            self.E = cfg["n_routed_experts"]
            self.moe = "mlp"
            self.proj = ("gate_proj", "up_proj", "down_proj")
            self.norm = bool(cfg.get("norm_topk_prob", True))
            self.sigmoid = True
            self.bias = True
            self.n_group = cfg.get("n_group", 1 if glm else 8)
            self.topk_group = cfg.get("topk_group", 1 if glm else 4)
            self.scale = cfg.get("routed_scaling_factor", 1.0 if glm else 2.5)
            if (cfg.get("n_shared_experts", 1) or 0) > 0:
                self.shared = "shared_experts"
        elif mt == "deepseek_v2":
            # softmax; greedy or group_limited_greedy; never renormalised.
            self.E = cfg["n_routed_experts"]
            self.moe = "mlp"
            self.proj = ("gate_proj", "up_proj", "down_proj")
            self.norm = False
            self.scale = cfg.get("routed_scaling_factor", 1.0)
            if cfg.get("topk_method", "greedy") == "group_limited_greedy":
                self.v2_groups = True
                self.n_group = cfg["n_group"]
                self.topk_group = cfg["topk_group"]
            if (cfg.get("n_shared_experts", 2) or 0) > 0:
                self.shared = "shared_experts"
        else:
            raise ValueError(f"unknown model_type {mt}")

    def is_moe(self, layer):
        c = self.cfg
        mt = self.model_type
        if mt in ("deepseek_v3", "kimi_k2", "deepseek_v2", "glm4_moe"):
            first = c.get("first_k_dense_replace", {"deepseek_v2": 0, "glm4_moe": 1}.get(mt, 3))
            freq = 1 if mt == "glm4_moe" else c.get("moe_layer_freq", 1)
            return layer >= first and layer % freq == 0
        if mt in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
            return layer not in c.get("mlp_only_layers", []) and (layer + 1) % c.get("decoder_sparse_step", 1) == 0
        if mt == "llama4_text":
            if c.get("moe_layers") is not None:
                return layer in c["moe_layers"]
            return (layer + 1) % c.get("interleave_moe_layer_step", 1) == 0
        return True

    def prefix(self, layer):
        return f"{self.layers}.{layer}.{self.moe}"

    def router_prefix(self, ck, layer):
        """Where the router is: mixtral's fused layout names its block mlp."""
        p = self.prefix(layer)
        if not ck.has(f"{p}.gate.weight"):
            p = f"{self.layers}.{layer}.mlp"
        return p

    def selection_scores(self, logits, bias):
        """Scores the top-k is taken over (after group masking), and the scores weights come from."""
        if self.topk_sigmoid:
            return logits, 1.0 / (1.0 + np.exp(-logits))
        if not self.sigmoid:
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            if self.v2_groups and self.n_group > 1:
                # DeepSeek-V2: keep the topk_group groups of best max score,
                # the others' scores are 0.
                T = p.shape[0]
                best = p.reshape(T, self.n_group, -1).max(axis=2)
                keep = np.argsort(-best, axis=1, kind="stable")[:, : self.topk_group]
                mask = np.zeros((T, self.n_group), dtype=bool)
                np.put_along_axis(mask, keep, True, axis=1)
                return np.where(np.repeat(mask, self.E // self.n_group, axis=1), p, 0.0), p
            return p, p
        s = 1.0 / (1.0 + np.exp(-logits))
        c = s + (bias if bias is not None else 0.0)
        if self.n_group > 1:
            T = c.shape[0]
            g = c.reshape(T, self.n_group, -1)
            top2 = -np.sort(-g, axis=2)[:, :, :2].sum(axis=2)
            keep = np.argsort(-top2, axis=1, kind="stable")[:, : self.topk_group]
            mask = np.zeros((T, self.n_group), dtype=bool)
            np.put_along_axis(mask, keep, True, axis=1)
            c = np.where(np.repeat(mask, self.E // self.n_group, axis=1), c, -np.inf)
        return c, s

    def weights_for(self, ids, weight_scores):
        w = np.take_along_axis(weight_scores, ids, axis=1)
        if self.norm and (not self.sigmoid or self.k > 1):
            w = w / (w.sum(axis=1, keepdims=True) + (1e-20 if self.sigmoid else 0.0))
        return w * self.scale


def silu(z):
    return z / (1.0 + np.exp(-z))


def expert(x, gate, up, down):
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def gpt_oss_expert(x, gu, gub, dn, dnb, alpha, limit):
    """transformers' GptOssExperts for one expert, in float64: x @ W + b
    with W [H, 2F], gate the even columns, up the odd ones, clamped."""
    h = x @ gu + gub
    gate, up = np.minimum(h[:, ::2], limit), np.clip(h[:, 1::2], -limit, limit)
    return ((up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))) @ dn + dnb


def layer_reference(ck, fam, layer, x, ids=None):
    """Routes x (unless ids are given) and returns (ids, weights, y, sel)."""
    p = fam.router_prefix(ck, layer)
    x = x.astype(np.float64)
    if fam.topk_sigmoid or fam.gpt_oss:
        router = f"{fam.prefix(layer)}.router.weight"
    else:
        router = f"{p}.gate.weight"
    logits = x @ ck.get(router).T
    if fam.gpt_oss:
        logits = logits + ck.get(f"{fam.prefix(layer)}.router.bias")
    bias = ck.get(f"{p}.gate.e_score_correction_bias") if fam.bias else None
    sel, ws = fam.selection_scores(logits, bias)
    if ids is None:
        ids = np.argsort(-sel, axis=1, kind="stable")[:, : fam.k]
    w = fam.weights_for(ids, ws)
    y = routed_output(ck, fam, layer, x, ids, w)
    return ids, w, y, sel


def routed_output(ck, fam, layer, x, ids, w):
    p = fam.prefix(layer)
    x = x.astype(np.float64)
    y = np.zeros_like(x)
    if fam.gpt_oss:
        e = f"{p}.experts"
        gu, gub = ck.get(f"{e}.gate_up_proj"), ck.get(f"{e}.gate_up_proj_bias")
        dn, dnb = ck.get(f"{e}.down_proj"), ck.get(f"{e}.down_proj_bias")
        for ex in np.unique(ids):
            rows, slot = np.nonzero(ids == ex)
            y[rows] += w[rows, slot][:, None] * gpt_oss_expert(
                x[rows], gu[ex], gub[ex], dn[ex], dnb[ex], fam.alpha, fam.limit)
        return y
    g, u, d = fam.proj
    fused = f"{fam.layers}.{layer}.mlp.experts"
    if fam.topk_sigmoid and ck.has(f"{p}.experts.gate_up_proj"):
        # Llama 4's, transposed (x @ W): gate_up_proj [E, H, 2F] (gate
        # columns, then up columns), down_proj [E, F, H].
        gu, dn = ck.get(f"{p}.experts.gate_up_proj"), ck.get(f"{p}.experts.down_proj")
        F = dn.shape[1]
        experts = {e: (gu[e][:, :F].T, gu[e][:, F:].T, dn[e].T) for e in np.unique(ids)}
    elif ck.has(f"{fused}.gate_up_proj"):
        # transformers 5's layout: gate_up_proj [E, 2F, H] (gate rows, then
        # up rows), down_proj [E, H, F].
        gu, dn = ck.get(f"{fused}.gate_up_proj"), ck.get(f"{fused}.down_proj")
        F = dn.shape[2]
        experts = {e: (gu[e, :F], gu[e, F:], dn[e]) for e in np.unique(ids)}
    else:
        experts = {e: [ck.get(f"{p}.experts.{e}.{n}.weight") for n in (g, u, d)]
                   for e in np.unique(ids)}
    for e in np.unique(ids):
        rows, slot = np.nonzero(ids == e)
        if fam.topk_sigmoid:
            # Llama 4 scales the expert's input by the weight, not its output.
            y[rows] += expert(w[rows, slot][:, None] * x[rows], *experts[e])
        else:
            y[rows] += w[rows, slot][:, None] * expert(x[rows], *experts[e])
    if fam.shared:
        W = [ck.get(f"{p}.{fam.shared}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")]
        s = expert(x, *W)
        if fam.shared_gate:
            gl = x @ ck.get(f"{p}.shared_expert_gate.weight").T
            s *= 1.0 / (1.0 + np.exp(-gl))
        y += s
    return y


def rel_l2(got, ref):
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))
