"""The remote session: moed's gRPC API (moe.v1.Experts/Forward and
moe.v1.Control/ListModels), with the calls of the shared-memory Session.

Each request is one Forward call (a request larger than max_request_bytes
is split by tokens into several, in flight together); submit returns at once
with the calls' futures.  A RemoteSession may be used from several threads
(gRPC channels are thread-safe), though its Pending objects are not.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional, Union

from . import _proto
from ._common import ModelInfo, ModelRef, PendingBase, SessionBase, deadline
from ._lib import MOE_BF16, MOE_F16, MOE_F32
from ._tensors import Rows, routing
from .errors import (InvalidRequest, MoedError, SessionClosed, Timeout, from_grpc)

Credential = Union[str, bytes, "os.PathLike[str]", None]


def _grpc():
    try:
        import grpc  # type: ignore
    except ImportError:
        raise MoedError("the remote session needs grpcio: pip install grpcio "
                        "(or apt-get install python3-grpcio)", "ENOPKG") from None
    return grpc


def _read(v: Credential, what: str) -> Optional[bytes]:
    if v is None or isinstance(v, bytes):
        return v
    try:
        with open(v, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidRequest(f"cannot read the TLS {what} '{v}': {e.strerror}", "EINVAL") from None


class RemotePending(PendingBase):
    """A request in flight on a RemoteSession (see PendingBase)."""

    def __init__(self, session: "RemoteSession", rows: Rows, result: Any, model: str) -> None:
        super().__init__()
        self._session = session
        self._rows = rows
        self._result = result
        self._model = model
        self._calls: list[tuple[int, int, Any]] = []  # (start, rows, grpc future)
        self._taken = 0  # calls whose answers are in _result

    def done(self) -> bool:
        return self._done or all(f.done() for _, _, f in self._calls[self._taken:])

    def wait(self, timeout: Optional[float] = None) -> Any:
        grpc = _grpc()
        end = deadline(timeout)
        while not self._done:
            start, n, fut = self._calls[self._taken]
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                resp = fut.result(timeout=left)
            except grpc.FutureTimeoutError:
                raise Timeout(f"the request did not complete within {timeout} s; it is still "
                              "in flight (wait again)", "DEADLINE_EXCEEDED") from None
            except grpc.RpcError as e:
                self._fail(self._session._rpc_error(e, self._model))
                continue
            except grpc.FutureCancelledError:
                self._fail(SessionClosed("the session was closed while this request was in "
                                         "flight", "CANCELLED"))
                continue
            try:
                self._take(resp, start, n)
            except MoedError as e:
                self._fail(e)
                continue
            self._taken += 1
            if self._taken == len(self._calls):
                self._done = True
        return self._finish()

    def _take(self, resp: Any, start: int, n: int) -> None:
        pb = _proto.messages()
        codes = {MOE_F32: pb.DTYPE_F32, MOE_F16: pb.DTYPE_F16, MOE_BF16: pb.DTYPE_BF16}
        out = resp.output
        if out.dtype != codes[self._rows.code]:
            raise MoedError(f"moed answered dtype {out.dtype} for a request of "
                            f"{codes[self._rows.code]}", "INTERNAL")
        self._rows.from_bytes(self._result, out.data, start, n)
        t = resp.timing
        self.stats.add(resp.cache_hits, resp.cache_misses, t.batch_requests, t.batch_tokens,
                       t.queue_ns, t.compute_ns, t.total_ns)

    def _fail(self, e: BaseException) -> None:
        for _, _, f in self._calls[self._taken:]:
            f.cancel()
        self._error = e
        self._result = None
        self._done = True


class RemoteSession(SessionBase):
    """A session with moed over gRPC (see moed.connect_remote)."""

    def __init__(self, address: str = "127.0.0.1:50051", token: Optional[str] = None,
                 tls: bool = False, ca: Credential = None, cert: Credential = None,
                 key: Credential = None, timeout: float = 30.0,
                 max_request_bytes: int = 16 << 20) -> None:
        super().__init__()
        self.address = address
        self.timeout = timeout
        self.max_request_bytes = int(max_request_bytes)
        self._token = token
        self._tls = bool(tls or ca or cert or key)
        self._ca, self._cert, self._key = (_read(ca, "CA certificate"),
                                           _read(cert, "certificate"), _read(key, "key"))
        self._lock = threading.Lock()
        self._pb = _proto.messages()
        self._channel: Any = None
        self._open()

    def _open(self) -> None:
        grpc = _grpc()
        # A channel of its own subchannels: with gRPC's global pool, a channel
        # made by reconnect() would inherit the dead one's connect backoff.
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1)]
        if self._tls:
            creds = grpc.ssl_channel_credentials(root_certificates=self._ca,
                                                 private_key=self._key,
                                                 certificate_chain=self._cert)
            ch = grpc.secure_channel(self.address, creds, options=opts)
        else:
            ch = grpc.insecure_channel(self.address, options=opts)
        pb = self._pb
        self._forward = ch.unary_unary("/moe.v1.Experts/Forward",
                                       request_serializer=pb.ForwardRequest.SerializeToString,
                                       response_deserializer=pb.ForwardResponse.FromString)
        self._list = ch.unary_unary("/moe.v1.Control/ListModels",
                                    request_serializer=pb.ListModelsRequest.SerializeToString,
                                    response_deserializer=pb.ListModelsResponse.FromString)
        self._channel = ch
        self._models = {}

    def _describe(self) -> str:
        return f"moed at {self.address}"

    def _metadata(self) -> Optional[list[tuple[str, str]]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else None

    def _rpc_error(self, e: Any, model: Optional[str] = None) -> MoedError:
        code = e.code()
        name = code.name if code is not None else "UNKNOWN"
        msg = e.details() or name
        if name == "UNAVAILABLE":
            msg = f"moed at {self.address} is not reachable ({msg})"
        if name == "CANCELLED" and self._closed:
            return SessionClosed("the session was closed while this request was in flight",
                                 name)
        err = from_grpc(name, msg)
        if name == "NOT_FOUND" and model:
            self._forget(model)
        return err

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled (SessionClosed)."""
        if getattr(self, "_channel", None) is None or self._closed:
            self._closed = True
            return
        self._closed = True
        self._channel.close()

    def reconnect(self) -> "RemoteSession":
        """A new channel to the same address (after moed restarted).  Returns self."""
        if self._channel is not None:
            self._channel.close()
        self._closed = False
        self._open()
        return self

    def _fetch_models(self) -> list[ModelInfo]:
        grpc = _grpc()
        pb = self._pb
        try:
            r = self._list(pb.ListModelsRequest(), timeout=self.timeout,
                           metadata=self._metadata())
        except grpc.RpcError as e:
            raise self._rpc_error(e) from None
        names = {pb.DTYPE_F32: "f32", pb.DTYPE_F16: "f16", pb.DTYPE_BF16: "bf16"}
        el = {pb.DTYPE_F32: 4, pb.DTYPE_F16: 2, pb.DTYPE_BF16: 2}
        out = []
        for i, m in enumerate(r.models):
            ffn = 0
            if m.dtype in el and m.hidden:
                per = 3 * m.hidden * el[m.dtype]
                if m.expert_bytes % per == 0:
                    ffn = m.expert_bytes // per
            out.append(ModelInfo(id=i, name=m.name, arch=m.arch,
                                 weight_dtype=names.get(m.dtype, "other"), n_layers=m.layers,
                                 hidden=m.hidden, n_experts=m.experts, top_k=m.top_k, ffn=ffn,
                                 n_shared=m.shared_experts,
                                 moe_layers=sorted(int(v) for v in m.moe_layer_ids)))
        return out

    def submit(self, model: ModelRef, layer: int, x: Any, *, ids: Any = None,
               weights: Any = None, out: Any = None) -> RemotePending:
        """Starts forward(model, layer, x, ...) as gRPC calls and returns at once."""
        m = self._resolve(model, layer)
        rows = Rows(x, m.hidden)
        route = routing(ids, weights, rows.n, m.top_k, m.n_experts)
        if out is not None:
            rows.check_out(out)
            result = out
        else:
            result = rows.empty_like()
        p = RemotePending(self, rows, result, m.name)
        if rows.n == 0:
            p._done = True
            return p
        pb = self._pb
        codes = {MOE_F32: pb.DTYPE_F32, MOE_F16: pb.DTYPE_F16, MOE_BF16: pb.DTYPE_BF16}
        per = max(1, self.max_request_bytes // (rows.row_bytes + 8 * m.top_k))
        for start in range(0, rows.n, per):
            n = min(per, rows.n - start)
            req = pb.ForwardRequest(model=m.name, layer=int(layer))
            req.hidden.shape.extend([n, m.hidden])
            req.hidden.dtype = codes[rows.code]
            req.hidden.data = rows.to_bytes(start, n)
            if route is not None:
                req.routing.top_k = m.top_k
                req.routing.expert_ids.extend(route[0][start:start + n].ravel().tolist())
                req.routing.weights.extend(route[1][start:start + n].ravel().tolist())
            fut = self._forward.future(req, timeout=self.timeout, metadata=self._metadata())
            p._calls.append((start, n, fut))
        return p


def connect_remote(address: str = "127.0.0.1:50051", token: Optional[str] = None,
                   tls: bool = False, ca: Credential = None, cert: Credential = None,
                   key: Credential = None, timeout: float = 30.0) -> RemoteSession:
    """A session with moed's gRPC server.

    Args:
        address: host:port (moed's ``listen``).
        token: sent as ``authorization: Bearer <token>`` (needed only for
            mutating control calls when moed has one; Forward takes none).
        tls: use TLS; ca, cert, key: PEM paths or bytes (the CA to trust,
            default the system's; a client certificate and key for mutual TLS).
            Any of them implies tls.
        timeout: seconds each call may take (the gRPC deadline).

    Connecting is lazy (as gRPC's): an unreachable moed shows at the first
    call, as ConnectionLost.  Needs grpcio, protobuf and grpcio-tools (the
    latter once, to generate the messages from moe.proto).
    """
    return RemoteSession(address, token, tls, ca, cert, key, timeout)
