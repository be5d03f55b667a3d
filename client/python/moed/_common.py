"""What the shared-memory and the gRPC sessions share: ModelInfo, the model
and layer checks, forward as submit + wait, the context manager."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ModelNotFound, SessionClosed


@dataclass
class ModelInfo:
    """A model moed serves.

    Attributes:
        id: what shared-memory requests name (the remote session numbers the
            models in ListModels' order instead).
        name: the name requests use.
        arch: config.json's model_type, e.g. "mixtral".
        weight_dtype: the experts' stored type: "f32", "f16", "bf16" or "other".
        n_layers: decoder layers; hidden: hidden size; n_experts: routed
            experts per MoE layer; top_k: experts per token; ffn: a routed
            expert's intermediate size (0 when moed does not say: a remote
            model with quantized experts); n_shared: shared experts per layer.
        moe_layers: the layers forward may name, ascending.
    """

    id: int
    name: str
    arch: str
    weight_dtype: str
    n_layers: int
    hidden: int
    n_experts: int
    top_k: int
    ffn: int
    n_shared: int
    moe_layers: list[int] = field(default_factory=list)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether forward may name layer."""
        return layer in self.moe_layers


ModelRef = Union[str, ModelInfo]


@dataclass
class Stats:
    """What moed reported for one request (summed over the chunks a large
    request was split into; batch sizes and latencies are the largest).

    Attributes:
        hits, misses: experts found resident / paged in.
        batch_requests, batch_tokens: the cross-caller batch that served it.
        queue_ns, compute_ns, total_ns: waiting for a batch, the batch's
            forward, submission to completion (moed's clock).
    """

    hits: int = 0
    misses: int = 0
    batch_requests: int = 0
    batch_tokens: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    total_ns: int = 0

    def add(self, hits: int, misses: int, batch_requests: int, batch_tokens: int,
            queue_ns: int, compute_ns: int, total_ns: int) -> None:
        self.hits += hits
        self.misses += misses
        self.batch_requests = max(self.batch_requests, batch_requests)
        self.batch_tokens = max(self.batch_tokens, batch_tokens)
        self.queue_ns = max(self.queue_ns, queue_ns)
        self.compute_ns += compute_ns
        self.total_ns = max(self.total_ns, total_ns)


class PendingBase:
    """A request in flight; ``wait()`` returns its result.

    The completion's statistics are on it once done: ``hits``, ``misses``,
    ``batch_requests``, ``batch_tokens``, ``queue_ns``, ``compute_ns``,
    ``total_ns`` (also as ``stats``, a :class:`Stats`).
    """

    def __init__(self) -> None:
        self.stats = Stats()
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._done = False

    def __getattr__(self, name: str) -> Any:
        if name in Stats.__dataclass_fields__:
            return getattr(self.stats, name)
        raise AttributeError(name)

    def done(self) -> bool:
        """Whether the request has completed (successfully or not); never blocks."""
        raise NotImplementedError

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Waits for the result: an array/tensor of x's kind, dtype and shape.

        timeout: seconds (None: until it completes or moed goes away).
        Raises moed.Timeout when it runs out (the request stays in flight:
        wait again), or the request's error (InvalidRequest, ModelNotFound,
        ConnectionLost, SessionClosed, MoedError) as often as it is called.
        """
        raise NotImplementedError

    def _finish(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class SessionBase:
    """The calls both sessions share; see Session and RemoteSession."""

    _closed = False

    def __init__(self) -> None:
        self._models: dict[str, ModelInfo] = {}
        self._order: list[ModelInfo] = []

    # -- to be provided ---------------------------------------------------------------
    def _fetch_models(self) -> list[ModelInfo]:
        raise NotImplementedError

    def submit(self, model: ModelRef, layer: int, x: Any, *, ids: Any = None,
               weights: Any = None, out: Any = None) -> PendingBase:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"the session with {self._describe()} is closed; "
                                "connect again (or call reconnect())", "ESHUTDOWN")

    def models(self) -> list[ModelInfo]:
        """The models moed serves now (one round trip to moed)."""
        self._check_open()
        ms = self._fetch_models()
        self._models = {m.name: m for m in ms}
        self._order = ms
        return list(ms)

    def model(self, name: Optional[str] = None) -> ModelInfo:
        """The model called name (None: the only, or first, one moed serves).

        Raises ModelNotFound naming the loaded models.
        """
        ms = self.models()
        if name is None:
            if not ms:
                raise ModelNotFound(f"moed ({self._describe()}) has no model loaded", "ENOENT")
            return ms[0]
        if name in self._models:
            return self._models[name]
        raise ModelNotFound(
            f"moed has no model '{name}' loaded (loaded: "
            f"{', '.join(repr(m.name) for m in ms) or 'none'})", "ENOENT")

    def _resolve(self, model: ModelRef, layer: int) -> ModelInfo:
        """The ModelInfo of model (a name or a ModelInfo), checking layer."""
        self._check_open()
        name = model.name if isinstance(model, ModelInfo) else model
        if not isinstance(name, str):
            raise ModelNotFound(
                f"model must be a name or a moed.ModelInfo, not {type(model).__name__}", "EINVAL")
        m = self._models.get(name)
        if m is None:
            m = self.model(name)
        if isinstance(layer, bool) or not isinstance(layer, int):
            try:
                layer = int(layer.__index__())
            except AttributeError:
                raise ModelNotFound(f"layer must be an int, not {type(layer).__name__}",
                                    "EINVAL") from None
        if not m.is_moe_layer(layer):
            what = (f"out of range (the model has layers 0 to {m.n_layers - 1})"
                    if layer < 0 or layer >= m.n_layers else "a dense layer")
            raise ModelNotFound(
                f"layer {layer} of model '{m.name}' is not a MoE layer: {what}; its MoE layers "
                f"are {_ranges(m.moe_layers)}", "ENOENT")
        return m

    def _forget(self, name: str) -> None:
        """Drops a cached model (moed said it does not have it)."""
        self._models.pop(name, None)

    def forward(self, model: ModelRef, layer: int, x: Any, *, ids: Any = None,
                weights: Any = None, out: Any = None) -> Any:
        """MoE layer ``layer`` of ``model`` applied to x's rows.

        Args:
            model: a model name or a ModelInfo.
            layer: one of the model's MoE layers.
            x: numpy array (float32, float16) or torch tensor (float32,
                float16, bfloat16) of shape [..., hidden]; any strides.
            ids, weights: optional routing chosen by the caller, int32 and
                float32 [tokens, top_k] (tokens: the product of x's leading
                dims); None: moed routes with the model's router.
            out: optional array/tensor like x to write the result into.

        Returns:
            An array/tensor of x's kind, dtype, shape (and torch device): out
            when given.

        Raises:
            InvalidRequest, ModelNotFound, ConnectionLost, SessionClosed,
            MoedError (each with moed's message).
        """
        return self.submit(model, layer, x, ids=ids, weights=weights, out=out).wait()

    def __enter__(self) -> "SessionBase":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _ranges(ls: list[int]) -> str:
    """'1-3, 5' for [1, 2, 3, 5]; 'none' for []."""
    if not ls:
        return "none"
    out, start, prev = [], ls[0], ls[0]
    for v in ls[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)
