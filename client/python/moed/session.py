"""The shared-memory session: libmoe-client through ctypes.

A request's rows are copied once from the caller's array/tensor into buffers
allocated in the session's arena (moe_alloc), moed reads them and writes its
output into the arena, and the completion copies the output out (into the
result or out=) and frees the buffers.  A request larger than the arena is
split by tokens into chunks (rows are independent); when the arena is full
of other requests in flight, submitting waits for some of them to complete.

Thread safety: a Session is not meant to be shared between threads (like
libmoe-client's sessions); it holds a lock around every call into the
library, so sharing one cannot corrupt it, but calls then wait for each
other.  Use one session per thread for parallel work.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
import time
from typing import Any, Optional

from . import _lib
from ._common import ModelInfo, ModelRef, PendingBase, SessionBase, deadline
from ._tensors import Rows, routing
from .errors import (ConnectionLost, InvalidRequest, MoedError, SessionClosed,
                     Timeout, errno_name, from_errno)

_SLICE_MS = 100  # longest single wait in C: keeps Ctrl-C and other threads responsive
_DTYPES = {_lib.MOE_F32: "f32", _lib.MOE_F16: "f16", _lib.MOE_BF16: "bf16"}


def _align(n: int) -> int:
    g = _lib.ARENA_GRAIN
    return (max(n, 1) + g - 1) // g * g


class _Chunk:
    """Rows [start, start + rows) of a request, in flight with their buffers."""

    __slots__ = ("start", "rows", "bufs", "out_ptr", "tag")

    def __init__(self, start: int, rows: int, bufs: list[int], out_ptr: int, tag: int) -> None:
        self.start, self.rows, self.bufs, self.out_ptr, self.tag = start, rows, bufs, out_ptr, tag


class Pending(PendingBase):
    """A request submitted on a shared-memory Session (see PendingBase).

    Keeps its arena buffers until its completions arrive; holds the session
    alive meanwhile.
    """

    def __init__(self, session: "Session", rows: Rows, result: Any, model: str) -> None:
        super().__init__()
        self._session = session
        self._rows = rows
        self._result = result
        self._model = model
        self._left = 0  # chunks in flight
        self._submitting = True  # more chunks to come: not done at _left == 0

    def done(self) -> bool:
        if not self._done:
            self._session._reap(block_ms=0)
        return self._done

    def wait(self, timeout: Optional[float] = None) -> Any:
        end = deadline(timeout)
        while not self._done:
            left_ms = -1
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise Timeout(f"the request did not complete within {timeout} s; it is "
                                  "still in flight (wait again)", "ETIMEDOUT")
                left_ms = max(1, int(left * 1000))
            self._session._reap(block_ms=left_ms if left_ms >= 0 and left_ms < _SLICE_MS
                                else _SLICE_MS, until=self)
        return self._finish()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._result = None

    def _chunk_done(self) -> None:
        self._left -= 1
        if self._left == 0 and not self._submitting:
            self._done = True

    def _submitted(self) -> None:
        """Every chunk is in flight (or done)."""
        self._submitting = False
        if self._left == 0:
            self._done = True


class Session(SessionBase):
    """A session on moed's shared-memory socket (see moed.connect).

    Not thread-safe in the sense of libmoe-client: calls from several threads
    are serialised by a lock; use one session per thread for parallelism.
    """

    def __init__(self, socket_path: str = "/run/moed/shm.sock", arena_bytes: int = 0,
                 name: Optional[str] = None, poll: bool = False) -> None:
        super().__init__()
        self._lib = _lib.lib()
        self.socket_path = os.fspath(socket_path)
        self._arena_req = int(arena_bytes)
        self._name = name
        self._poll = bool(poll)
        self._lock = threading.RLock()
        self._s: Optional[int] = None
        self._lost: Optional[MoedError] = None
        self._inflight: dict[int, tuple[Pending, _Chunk]] = {}
        self._tags = itertools.count(1)
        self._comp = _lib.Completion()
        self._open()

    # ---- lifetime --------------------------------------------------------------------

    def _open(self) -> None:
        opts = _lib.SessionOpts()
        opts.arena_bytes = self._arena_req
        opts.flags = _lib.MOE_SESSION_POLL if self._poll else 0
        opts.name = self._name.encode() if self._name else b"python"
        s = ctypes.c_void_p()
        rc = self._lib.moe_connect(self.socket_path.encode(), ctypes.byref(opts), ctypes.byref(s))
        if rc < 0:
            msg = (self._lib.moe_connect_error() or b"").decode(errors="replace") or \
                os.strerror(-rc)
            if -rc in (errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT):
                raise ConnectionLost(msg, errno_name(rc))
            if -rc == errno.EINVAL or -rc == errno.ENAMETOOLONG:
                raise InvalidRequest(msg, errno_name(rc))
            raise MoedError(msg, errno_name(rc))
        self._s = s.value
        self._lost = None
        self.arena_bytes = int(self._lib.moe_arena_size(self._s))
        self._models = {}

    def _describe(self) -> str:
        return f"moed at {self.socket_path}"

    def close(self) -> None:
        """Closes the session: moed reclaims its memory; requests in flight are
        abandoned (their wait() raises SessionClosed).  Closing twice is fine."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            self._drop(SessionClosed("the session was closed while this request was in flight",
                                     "ESHUTDOWN"))

    def _drop(self, err: MoedError) -> None:
        """Fails every request in flight with err and closes the C session."""
        for p, _ in list(self._inflight.values()):
            p._fail(err)
            p._done = True
        self._inflight.clear()
        if self._s is not None:
            self._lib.moe_close(self._s)
            self._s = None

    def reconnect(self) -> "Session":
        """A new session on the same socket (after moed restarted), replacing
        this one's: requests in flight fail with ConnectionLost.  Raises
        ConnectionLost while moed is still not there.  Returns self."""
        with self._lock:
            self._drop(ConnectionLost("the session was replaced by reconnect()", "ECONNRESET"))
            self._closed = False
            self._lost = None
            self._open()
        return self

    def _check_open(self) -> None:
        super()._check_open()
        if self._lost is not None:
            raise type(self._lost)(self._lost.message, self._lost.code)
        if self._s is None:
            raise ConnectionLost(f"no session with moed at {self.socket_path}; call reconnect()",
                                 "ENOTCONN")

    def _error(self, rc: int) -> MoedError:
        """The exception for a -errno of the library; a dead session is marked lost."""
        msg = (self._lib.moe_last_error(self._s) or b"").decode(errors="replace") \
            if self._s is not None else ""
        msg = msg or self._lib.moe_strerror(rc).decode(errors="replace")
        e = from_errno(rc, msg)
        if isinstance(e, ConnectionLost):
            if "reconnect" not in msg:
                e = ConnectionLost(msg + "; call reconnect() once moed is back", e.code)
            else:
                e = ConnectionLost(msg.replace("moe_connect", "reconnect()"), e.code)
            self._lost = e
            self._drop(e)
        return e

    # ---- models ----------------------------------------------------------------------

    def _fetch_models(self) -> list[ModelInfo]:
        with self._lock:
            self._check_open()
            arr = (_lib.ModelInfoC * _lib.MOE_MAX_MODELS)()
            n = self._lib.moe_models(self._s, arr, _lib.MOE_MAX_MODELS)
            if n < 0:
                raise self._error(n)
            return [_model_info(arr[i]) for i in range(n)]

    # ---- requests ---------------------------------------------------------------------

    def submit(self, model: ModelRef, layer: int, x: Any, *, ids: Any = None,
               weights: Any = None, out: Any = None) -> Pending:
        """Queues forward(model, layer, x, ...) and returns at once with a
        Pending (wait() gives the result).  Several may be in flight.  A
        request larger than the free arena waits for earlier ones to make
        room, and one larger than the whole arena is split by tokens."""
        with self._lock:
            m = self._resolve(model, layer)
            rows = Rows(x, m.hidden)
            route = routing(ids, weights, rows.n, m.top_k, m.n_experts)
            if out is not None:
                rows.check_out(out)
                result = out
            else:
                result = rows.empty_like()
            p = Pending(self, rows, result, m.name)
            if rows.n > 0:
                self._submit_chunks(p, m, int(layer), rows, route)
            p._submitted()
            return p

    def _per_token(self, rows: Rows, m: ModelInfo, route: Any) -> int:
        return 2 * rows.row_bytes + (8 * m.top_k if route is not None else 0)

    def _submit_chunks(self, p: Pending, m: ModelInfo, layer: int, rows: Rows,
                       route: Any) -> None:
        per = self._per_token(rows, m, route)
        nbuf = 4 if route is not None else 2
        cap = (self.arena_bytes - nbuf * _lib.ARENA_GRAIN) // per
        cap = min(cap, _lib.MAX_TOKENS)
        if cap < 1:
            raise InvalidRequest(
                f"one token needs {per + nbuf * _lib.ARENA_GRAIN} bytes of arena, the session's "
                f"arena has {self.arena_bytes}: connect with a larger arena_bytes=", "ENOMEM")
        if rows.x2d is None and rows.n > cap:
            raise InvalidRequest(
                f"x ({rows.n} tokens) needs splitting to fit the arena of {self.arena_bytes} "
                f"bytes, but its strides do not allow a view of its rows: pass a contiguous "
                f"x, or connect with a larger arena_bytes= (at least "
                f"{rows.n * per + nbuf * _lib.ARENA_GRAIN})", "ENOMEM")
        start = 0
        while start < rows.n:
            want = min(cap, rows.n - start)
            bufs = self._alloc_rows(p, rows, m, route, want)
            got, bufs = bufs
            self._submit_one(p, m, layer, rows, route, start, got, bufs)
            start += got

    def _alloc_rows(self, p: Pending, rows: Rows, m: ModelInfo, route: Any,
                    want: int) -> tuple[int, list[int]]:
        """Buffers for up to want rows: (rows, [in, out(, ids, weights)]).
        Waits for requests in flight to free room; halves the rows when the
        arena is fragmented."""
        while True:
            sizes = [want * rows.row_bytes] * 2
            if route is not None:
                sizes += [want * m.top_k * 4] * 2
            bufs = []
            for b in sizes:
                ptr = self._lib.moe_alloc(self._s, b)
                if not ptr:
                    break
                bufs.append(ptr)
            if len(bufs) == len(sizes):
                return want, bufs
            for b in bufs:
                self._lib.moe_free(self._s, b)
            if self._inflight:
                self._reap(block_ms=_SLICE_MS, until=None, one=True)
                self._check_open()
                if p._error is not None:
                    raise p._error
                continue
            if want > 1:
                want = (want + 1) // 2
                continue
            raise InvalidRequest(
                f"no room in the arena of {self.arena_bytes} bytes for one token: "
                f"{(self._lib.moe_last_error(self._s) or b'').decode(errors='replace')}",
                "ENOMEM")

    def _submit_one(self, p: Pending, m: ModelInfo, layer: int, rows: Rows, route: Any,
                    start: int, n: int, bufs: list[int]) -> None:
        try:
            rows.copy_in(bufs[0], start, n)
            req = _lib.Request(op=_lib.MOE_OP_FORWARD, model=m.id, layer=layer, dtype=rows.code,
                               n_tokens=n, input=bufs[0], output=bufs[1])
            if route is not None:
                import numpy as np
                k = m.top_k
                ids = np.frombuffer((ctypes.c_char * (n * k * 4)).from_address(bufs[2]),
                                    dtype=np.int32).reshape(n, k)
                w = np.frombuffer((ctypes.c_char * (n * k * 4)).from_address(bufs[3]),
                                  dtype=np.float32).reshape(n, k)
                np.copyto(ids, route[0][start:start + n], casting="unsafe")
                np.copyto(w, route[1][start:start + n], casting="unsafe")
                req.ids, req.weights = bufs[2], bufs[3]
            tag = next(self._tags)
            req.tag = tag
            while True:
                rc = self._lib.moe_submit(self._s, ctypes.byref(req))
                if rc == -errno.EAGAIN and self._inflight:
                    self._reap(block_ms=_SLICE_MS, until=None, one=True)
                    self._check_open()
                    continue
                break
            if rc < 0:
                raise self._error(rc)
        except BaseException:
            if self._s is not None:
                for b in bufs:
                    self._lib.moe_free(self._s, b)
            raise
        self._inflight[tag] = (p, _Chunk(start, n, bufs, bufs[1], tag))
        p._left += 1

    def _reap(self, block_ms: int, until: Optional[Pending] = None, one: bool = False) -> None:
        """Takes completions: all that are ready (block_ms 0), or waits up to
        block_ms for one (then takes the rest that are ready).  Stops early once
        `until` is done."""
        with self._lock:
            if self._s is None or not self._inflight:
                if until is not None and not until._done:
                    # Nothing in flight yet not done: the session ended under it.
                    until._fail(self._lost or SessionClosed("the session is closed", "ESHUTDOWN"))
                    until._done = True
                return
            c = self._comp
            first = True
            while self._inflight:
                if first and block_ms != 0:
                    rc = self._lib.moe_wait(self._s, ctypes.byref(c), block_ms)
                else:
                    rc = self._lib.moe_poll(self._s, ctypes.byref(c))
                first = False
                if rc == -errno.EAGAIN or rc == -errno.ETIMEDOUT:
                    return
                if rc < 0:
                    self._error(rc)  # marks the session lost and fails the requests
                    return
                self._complete(c)
                if one or (until is not None and until._done):
                    return

    def _complete(self, c: _lib.Completion) -> None:
        entry = self._inflight.pop(c.tag, None)
        if entry is None:
            return  # not ours (cannot happen: the library checks tags)
        p, ch = entry
        try:
            if c.status < 0:
                msg = c.msg.decode(errors="replace")
                e = from_errno(c.status, msg)
                if e.code == "ENOENT":
                    self._forget(p._model)
                p._fail(e)
            elif p._error is None:
                p._rows.copy_out(p._result, ch.out_ptr, ch.start, ch.rows)
                p.stats.add(c.hits, c.misses, c.batch_requests, c.batch_tokens, c.queue_ns,
                            c.compute_ns, c.total_ns)
        except BaseException as e:  # e.g. a device copy failing
            p._fail(e)
        finally:
            for b in ch.bufs:
                self._lib.moe_free(self._s, b)
            p._chunk_done()


def _model_info(c: _lib.ModelInfoC) -> ModelInfo:
    layers = [l for l in range(min(c.n_layers, 256)) if (c.moe_layer[l // 8] >> (l % 8)) & 1]
    return ModelInfo(id=c.id, name=c.name.decode(errors="replace"),
                     arch=c.arch.decode(errors="replace"),
                     weight_dtype=_DTYPES.get(c.weight_dtype, "other"), n_layers=c.n_layers,
                     hidden=c.hidden, n_experts=c.n_experts, top_k=c.top_k, ffn=c.ffn,
                     n_shared=c.n_shared, moe_layers=layers)


def connect(socket_path: str = "/run/moed/shm.sock", arena_bytes: int = 0,
            name: Optional[str] = None, poll: bool = False) -> Session:
    """Connects to moed's shared-memory socket.

    Args:
        socket_path: moed's ``shm_socket`` (``--shm-socket``).
        arena_bytes: the shared arena's size; 0: libmoe-client's default
            (64 MiB; moed may cap it).  Requests larger than it are split.
        name: the client's name in moed's logs (default "python").
        poll: spin while waiting instead of sleeping (lowest latency, burns a
            core).

    Raises:
        ConnectionLost: no moed listening there; LibraryNotFound:
        libmoe-client missing; MoedError: refused (e.g. EACCES).
    """
    return Session(socket_path, arena_bytes, name, poll)
