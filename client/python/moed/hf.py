"""Serving a transformers model's experts with moed.

A transformers MoE model keeps attention, norms and the KV cache in torch;
its sparse MoE blocks (routed experts, the router, and shared experts) can
run in moed instead, which holds the experts once for every process on the
host, pages them from disk and batches callers together::

    import moed, torch
    from moed.hf import attach_experts
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)
    with moed.connect("/run/moed/shm.sock") as s:      # moed --model DIR
        att = attach_experts(model, s)                  # checks the match first
        ids = model.generate(prompt, max_new_tokens=32)  # MoE blocks run in moed
        att.detach()                                    # back to torch's own blocks

moed must serve the same checkpoint (``moed --model DIR`` or ``moectl load``):
attaching compares the model's configuration with what moed serves (family,
hidden size, layers, MoE layers, experts, top-k, expert and shared-expert
sizes) and then runs a few random tokens through every MoE layer both ways;
it refuses a model that differs and says what differs.

Families: every transformers MoE model whose decoder layers hold a block with
``experts`` and a router (``gate``, or Llama 4's ``router``) under ``mlp``,
``block_sparse_moe`` or ``feed_forward`` (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3, Llama 4, gpt-oss, ...), as moed serves them.

Inference only: the attached blocks take their input detached from autograd
and return outputs without gradients.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import MoedError

__all__ = ["attach_experts", "detach_experts", "Attachment", "AttachError", "moe_blocks"]

_ATTR = "_moed_attachment"


class AttachError(MoedError, ValueError):
    """The model does not match what moed serves, or cannot be attached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "EINVAL")


def moe_blocks(model: Any) -> Iterator[tuple[int, Any]]:
    """Yields (layer index, sparse MoE block) of a transformers causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AttachError(
            f"{type(model).__name__} has no decoder layers at .model.layers: "
            "not a transformers causal LM this module knows")
    for i, layer in enumerate(layers):
        for name in ("block_sparse_moe", "mlp", "feed_forward"):
            block = getattr(layer, name, None)
            if (block is not None and hasattr(block, "experts") and
                    (hasattr(block, "gate") or hasattr(block, "router"))):
                yield i, block
                break


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def describe(model: Any) -> dict[str, Any]:
    """What moed must serve for this model: family, sizes and MoE layers,
    read from its configuration and its modules."""
    c = model.config
    arch = getattr(c, "model_type", "?")
    # transformers' text-only Qwen3.5-MoE class; moed calls the family qwen3_5_moe.
    arch = {"qwen3_5_moe_text": "qwen3_5_moe"}.get(arch, arch)
    n_experts = _cfg(c, "num_local_experts", "n_routed_experts", "num_experts")
    if arch in ("mixtral", "olmoe"):
        ffn = _cfg(c, "intermediate_size")
    else:
        ffn = _cfg(c, "moe_intermediate_size", "intermediate_size")
    if arch in ("qwen2_moe", "qwen3_next", "qwen3_5_moe"):
        n_shared = 1 if _cfg(c, "shared_expert_intermediate_size", default=0) else 0
    elif arch == "llama4_text":
        n_shared = 1  # Llama4TextMoe's shared_expert, always
    else:
        n_shared = _cfg(c, "n_shared_experts", default=0) or 0
    return {
        "arch": arch,
        "hidden": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "moe_layers": [i for i, _ in moe_blocks(model)],
        "n_experts": n_experts,
        "top_k": _cfg(c, "num_experts_per_tok"),
        "ffn": ffn,
        "n_shared": n_shared,
    }


def differences(model: Any, info: Any) -> list[str]:
    """How the model differs from moed's model `info` (a moed.ModelInfo):
    one line per field, empty when they match."""
    want = describe(model)
    labels = {
        "arch": "family (model_type)",
        "hidden": "hidden size",
        "n_layers": "layers",
        "moe_layers": "MoE layers",
        "n_experts": "routed experts",
        "top_k": "experts per token (top-k)",
        "ffn": "expert ffn size",
        "n_shared": "shared experts",
    }
    out = []
    for key, label in labels.items():
        have = getattr(info, key, None)
        if have is None or want[key] is None:
            continue
        if key == "moe_layers":
            have = list(have)
        if have != want[key]:
            out.append(f"{label}: model {want[key]}, moed {have}")
    return out


@dataclass
class Attachment:
    """A model whose sparse MoE blocks run in moed; `detach()` undoes it."""

    model: Any
    session: Any
    info: Any  # moed.ModelInfo of the model moed serves
    layers: list[int]
    calls: int = 0  # MoE block calls served by moed since attaching
    tokens: int = 0  # token rows sent
    check_error: float | None = None  # worst relative error of the attach check
    _saved: dict[int, Any] = field(default_factory=dict, repr=False)

    def detach(self) -> None:
        """Gives every block back its own forward (idempotent)."""
        for _, block in moe_blocks(self.model):
            if block.__dict__.get(_ATTR) is self:
                del block.__dict__["forward"]
                del block.__dict__[_ATTR]
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self._saved.clear()

    @property
    def attached(self) -> bool:
        return getattr(self.model, _ATTR, None) is self

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def _moed_forward(att: Attachment, layer: int):
    name = att.info.name

    def forward(block: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        shape = hidden_states.shape
        x = hidden_states.detach().reshape(-1, shape[-1])
        y = att.session.forward(name, layer, x)
        att.calls += 1
        att.tokens += x.shape[0]
        if hasattr(block, "router") and getattr(block.router, "bias", None) is not None:
            # GptOssMLP returns (out [batch, seq, hidden], router scores [tokens, k]).
            import torch

            with torch.no_grad():
                scores = block.router(x)[1]
            return y.view(shape), scores
        if hasattr(block, "router"):
            # Llama4TextMoe returns (out [tokens, hidden], router logits).
            import torch

            with torch.no_grad():
                logits = torch.nn.functional.linear(x, block.router.weight)
            return y.view(-1, shape[-1]), logits
        return y.view(shape)

    return forward


def _check(model: Any, session: Any, info: Any, layers: list[int], tokens: int,
           tolerance: float | None) -> float:
    """Runs `tokens` random rows through each MoE layer in torch and in moed;
    raises AttachError where they differ.  Returns the worst relative error
    of the tokens that agree on routing closely enough to compare."""
    import torch

    blocks = dict(moe_blocks(model))
    p = next(model.parameters())
    dtype = p.dtype
    if tolerance is None:
        # float32 is exact up to summation order; bf16/f16 round activations
        # in torch (moed keeps them in fp32), a few ulps of the output.
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    g = torch.Generator().manual_seed(1234)
    worst = 0.0
    for layer in layers:
        x = torch.randn(1, tokens, model.config.hidden_size, generator=g).to(dtype)
        with torch.no_grad():
            ref = blocks[layer](x)
            if isinstance(ref, tuple):  # Llama 4, gpt-oss: (out, router logits or scores)
                ref = ref[0]
            ref = ref.float().reshape(tokens, -1)
        y = session.forward(info.name, layer, x.reshape(tokens, -1)).float()
        err = ((y - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1e-30))
        bad = int((err > tolerance).sum())
        # A token whose top-k choice sits on a near-tie may route differently
        # under different rounding; one such token is tolerated, a mismatch in
        # the weights or the routing rule shows in nearly every token.
        if bad > max(1, tokens // 8):
            raise AttachError(
                f"layer {layer}: moed's output differs from the model's own block for "
                f"{bad} of {tokens} random tokens (worst relative error {float(err.max()):.3g}, "
                f"tolerance {tolerance:g}): moed model '{info.name}' is not this checkpoint, "
                "or its routing rule differs")
        ok = err[err <= tolerance]
        if ok.numel():
            worst = max(worst, float(ok.max()))
    return worst


def attach_experts(model: Any, session: Any, model_name: str | None = None, *,
                   check: bool = True, check_tokens: int = 8,
                   tolerance: float | None = None) -> Attachment:
    """Makes every sparse MoE block of `model` (router, routed experts and
    shared experts) run in moed through `session` (a moed.Session or
    moed.RemoteSession); attention, norms and the KV cache stay in torch.

    model_name: the model as moed names it; None: the one model moed serves
    whose family and sizes match (an error if none or several do).
    check: also run `check_tokens` random tokens through each MoE layer in
    torch and in moed and refuse the model if they differ beyond `tolerance`
    (relative to each token's largest output; default 1e-4 in float32,
    5e-2 in bfloat16/float16).

    Returns an Attachment; `detach_experts(model)` or `Attachment.detach()`
    restores the model's own blocks.  Raises AttachError when the model is
    already attached, has no MoE blocks, or differs from moed's model (the
    message lists each difference)."""
    if getattr(model, _ATTR, None) is not None:
        raise AttachError("the model is already attached to moed: detach_experts(model) first")
    layers = [i for i, _ in moe_blocks(model)]
    if not layers:
        raise AttachError(f"{type(model).__name__} has no sparse MoE blocks to serve")
    if model_name is None:
        models = session.models()
        matching = [m for m in models if not differences(model, m)]
        if len(matching) != 1:
            served = ", ".join(f"'{m.name}' ({m.arch})" for m in models) or "none"
            if not matching:
                detail = "; ".join(f"'{m.name}': " + ", ".join(differences(model, m))
                                   for m in models)
                raise AttachError(f"moed serves no model that matches this "
                                  f"{describe(model)['arch']} model (served: {served})"
                                  + (f"; {detail}" if detail else ""))
            raise AttachError(f"several models in moed match ({served}): name one")
        info = matching[0]
    else:
        info = session.model(model_name)
        diff = differences(model, info)
        if diff:
            raise AttachError(f"the model does not match moed's model '{info.name}': "
                              + "; ".join(diff))
    att = Attachment(model=model, session=session, info=info, layers=layers)
    if check:
        att.check_error = _check(model, session, info, layers, check_tokens, tolerance)
    for layer, block in moe_blocks(model):
        block.__dict__["forward"] = types.MethodType(_moed_forward(att, layer), block)
        block.__dict__[_ATTR] = att
    model.__dict__[_ATTR] = att
    return att


def detach_experts(model: Any) -> None:
    """Restores the model's own MoE blocks; a model not attached: no-op."""
    att = getattr(model, _ATTR, None)
    if att is not None:
        att.detach()
