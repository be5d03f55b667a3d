"""ctypes bindings of libmoe-client (client/moe_client.h), loaded on first use.

The structures mirror the header field for field (natural alignment on
x86-64 and aarch64, as the C compiler lays them out); test_package.py checks
their sizes against the header's layout.  Nothing here is imported at
``import moed`` time, so remote-only use needs no library.

Where the library is found: the environment variable ``MOED_CLIENT_LIB`` (the
path of libmoe-client.so.1), else ``ctypes.util.find_library("moe-client")``
(an installed libmoe-client), else a build tree next to this package
(``build/client`` of the source checkout it lives in).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

from .errors import LibraryNotFound

MOE_F32, MOE_F16, MOE_BF16 = 0, 1, 2
MOE_DTYPE_OTHER = -1
MOE_OP_FORWARD = 1
MOE_SESSION_POLL = 1
MOE_MAX_MODELS = 64
MAX_TOKENS = 1 << 20  # moe_request.n_tokens' upper bound
ARENA_GRAIN = 64  # moe_alloc rounds sizes up to this


class SessionOpts(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("arena_bytes", ctypes.c_uint64),
        ("flags", ctypes.c_uint),
        ("name", ctypes.c_char_p),
    ]


class ModelInfoC(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("name", ctypes.c_char * 64),
        ("arch", ctypes.c_char * 32),
        ("weight_dtype", ctypes.c_int),
        ("n_layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("n_experts", ctypes.c_int),
        ("top_k", ctypes.c_int),
        ("ffn", ctypes.c_int),
        ("n_shared", ctypes.c_int),
        ("moe_layer", ctypes.c_ubyte * 32),
    ]


class Request(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int),
        ("model", ctypes.c_uint32),
        ("layer", ctypes.c_int),
        ("dtype", ctypes.c_int),
        ("n_tokens", ctypes.c_uint32),
        ("input", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("tag", ctypes.c_uint64),
    ]


class Completion(ctypes.Structure):
    _fields_ = [
        ("tag", ctypes.c_uint64),
        ("status", ctypes.c_int),
        ("hits", ctypes.c_uint32),
        ("misses", ctypes.c_uint32),
        ("batch_requests", ctypes.c_uint32),
        ("batch_tokens", ctypes.c_uint32),
        ("queue_ns", ctypes.c_uint64),
        ("compute_ns", ctypes.c_uint64),
        ("total_ns", ctypes.c_uint64),
        ("msg", ctypes.c_char * 104),
    ]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    env = os.environ.get("MOED_CLIENT_LIB")
    if env:
        return [env]
    out = []
    found = ctypes.util.find_library("moe-client")
    if found:
        out.append(found)
    # A source checkout: client/python/moed/_lib.py -> <root>/build/client.
    root = Path(__file__).resolve().parents[3]
    for build in ("build", "build-py"):
        p = root / build / "client" / "libmoe-client.so.1"
        if p.exists():
            out.append(str(p))
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P = ctypes.c_void_p
    sigs = {
        "moe_connect": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(SessionOpts),
                                       ctypes.POINTER(P)]),
        "moe_connect_error": (ctypes.c_char_p, []),
        "moe_close": (None, [P]),
        "moe_last_error": (ctypes.c_char_p, [P]),
        "moe_strerror": (ctypes.c_char_p, [ctypes.c_int]),
        "moe_models": (ctypes.c_int, [P, ctypes.POINTER(ModelInfoC), ctypes.c_int]),
        "moe_alloc": (P, [P, ctypes.c_size_t]),
        "moe_free": (None, [P, P]),
        "moe_arena_size": (ctypes.c_size_t, [P]),
        "moe_submit": (ctypes.c_int, [P, ctypes.POINTER(Request)]),
        "moe_wait": (ctypes.c_int, [P, ctypes.POINTER(Completion), ctypes.c_int]),
        "moe_poll": (ctypes.c_int, [P, ctypes.POINTER(Completion)]),
        "moe_session_fd": (ctypes.c_int, [P]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


def lib() -> ctypes.CDLL:
    """libmoe-client, loaded once; LibraryNotFound saying how to point at it."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in _candidates():
            try:
                cand = ctypes.CDLL(path)
                _declare(cand)
            except (OSError, AttributeError) as e:
                tried.append(f"{path}: {e}")
                continue
            _lib = cand
            return _lib
        raise LibraryNotFound(
            "libmoe-client not found"
            + (f" ({'; '.join(tried)})" if tried else "")
            + ": set MOED_CLIENT_LIB to the path of libmoe-client.so.1 (in a build tree: "
            "build/client/libmoe-client.so.1), or install libmoe-client where the dynamic "
            "linker finds it (ldconfig)", "ENOENT")
