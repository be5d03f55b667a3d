"""numpy arrays and torch tensors as moed sees them: [tokens, hidden] rows of
f32, f16 or bf16, copied once into (or out of) memory that moed reads.

torch is never imported here: a tensor can only exist when the caller has
imported it already, so ``sys.modules`` tells.
"""
from __future__ import annotations

import ctypes
import math
import sys
import warnings
from typing import Any

import numpy as np

from ._lib import MOE_BF16, MOE_F16, MOE_F32
from .errors import InvalidRequest

DTYPE_NAMES = {MOE_F32: "f32", MOE_F16: "f16", MOE_BF16: "bf16"}


def _torch():
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


class Rows:
    """x seen as n rows of hidden elements.

    Attributes:
        x: the caller's array or tensor (detached for torch).
        torch: whether x is a torch tensor.
        code: MOE_F32, MOE_F16 or MOE_BF16.
        itemsize: bytes per element.
        shape: x's shape; n: rows (product of the leading dims); hidden.
        x2d: x as [n, hidden] without a copy, or None when x's strides do not
            allow that view (then it is copied whole, once).
    """

    def __init__(self, x: Any, hidden: int, what: str = "x") -> None:
        if is_torch(x):
            t = _torch()
            self.torch = True
            self.x = x.detach()
            codes = {t.float32: MOE_F32, t.float16: MOE_F16, t.bfloat16: MOE_BF16}
            dt = x.dtype
            hint = f"{what}.float(), {what}.half() or {what}.bfloat16()"
        elif isinstance(x, np.ndarray):
            self.torch = False
            self.x = x
            dt = x.dtype
            codes = {np.dtype(np.float32): MOE_F32, np.dtype(np.float16): MOE_F16}
            if dt.name == "bfloat16" and dt.itemsize == 2:  # ml_dtypes.bfloat16
                codes[dt] = MOE_BF16
            hint = f"{what}.astype(np.float32) or np.float16; torch tensors may be bfloat16"
        else:
            raise InvalidRequest(
                f"{what} is a {type(x).__module__}.{type(x).__name__}: expected a numpy array "
                f"or a torch tensor of shape [..., {hidden}]", "EINVAL")
        if dt not in codes:
            raise InvalidRequest(
                f"{what} has dtype {str(dt).replace('torch.', '')}: moed takes float32, float16 "
                f"or bfloat16 ({hint})", "EINVAL")
        self.code = codes[dt]
        self.itemsize = 4 if self.code == MOE_F32 else 2
        self.shape = tuple(x.shape)
        if len(self.shape) == 0 or self.shape[-1] != hidden:
            raise InvalidRequest(
                f"{what} has shape {list(self.shape)}: expected [..., {hidden}] "
                f"(the model's hidden size is {hidden})", "EINVAL")
        self.hidden = hidden
        self.n = math.prod(self.shape[:-1])
        self.x2d = _view2d(self.x, self.n, hidden)

    @property
    def row_bytes(self) -> int:
        return self.hidden * self.itemsize

    def empty_like(self) -> Any:
        """A new array/tensor of x's kind, dtype, shape (and device)."""
        if self.torch:
            return _torch().empty(self.shape, dtype=self.x.dtype, device=self.x.device)
        return np.empty(self.shape, dtype=self.x.dtype)

    def check_out(self, out: Any) -> None:
        """InvalidRequest unless out can take the result."""
        ok = is_torch(out) if self.torch else isinstance(out, np.ndarray)
        kind = "torch tensor" if self.torch else "numpy array"
        if not ok:
            raise InvalidRequest(f"out= must be a {kind} like x", "EINVAL")
        if tuple(out.shape) != self.shape or out.dtype != self.x.dtype:
            raise InvalidRequest(
                f"out= has shape {list(out.shape)} and dtype {out.dtype}: expected "
                f"{list(self.shape)} and {self.x.dtype}, as x", "EINVAL")
        if not self.torch and not out.flags.writeable:
            raise InvalidRequest("out= is read-only", "EINVAL")

    # ---- shared memory -------------------------------------------------------------

    def _arena(self, ptr: int, rows: int) -> Any:
        """rows x hidden elements at ptr, as an array/tensor of x's kind (no copy)."""
        buf = (ctypes.c_char * (rows * self.row_bytes)).from_address(ptr)
        if self.torch:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _torch().frombuffer(buf, dtype=self.x.dtype).view(rows, self.hidden)
        return np.frombuffer(buf, dtype=self.x.dtype).reshape(rows, self.hidden)

    def copy_in(self, ptr: int, start: int, rows: int) -> None:
        """Copies rows [start, start + rows) of x to ptr (the one copy)."""
        dst = self._arena(ptr, rows)
        if self.x2d is None:  # only ever one chunk then: see Session
            if self.torch:
                dst.view(self.shape).copy_(self.x)
            else:
                np.copyto(dst.reshape(self.shape), self.x)
            return
        src = self.x2d[start:start + rows]
        if self.torch:
            dst.copy_(src)
        else:
            np.copyto(dst, src)

    def copy_out(self, dest: Any, ptr: int, start: int, rows: int) -> None:
        """Copies rows at ptr to rows [start, start + rows) of dest (x's shape)."""
        src = self._arena(ptr, rows)
        d2 = _view2d(dest, self.n, self.hidden)
        if d2 is None:  # only ever one chunk then
            if self.torch:
                dest.copy_(src.view(self.shape))
            else:
                np.copyto(dest, src.reshape(self.shape))
            return
        if self.torch:
            d2[start:start + rows].copy_(src)
        else:
            np.copyto(d2[start:start + rows], src)

    # ---- gRPC ------------------------------------------------------------------------

    def to_bytes(self, start: int, rows: int) -> bytes:
        """Rows [start, start + rows) of x, little-endian, row-major."""
        if self.torch:
            t = _torch()
            src = self.x2d if self.x2d is not None else self.x.reshape(self.n, self.hidden)
            part = src[start:start + rows].to("cpu").contiguous()
            u = part.view(t.int16 if self.itemsize == 2 else t.int32)
            return u.numpy().tobytes()
        src = self.x2d if self.x2d is not None else self.x.reshape(self.n, self.hidden)
        return src[start:start + rows].tobytes()  # little-endian hosts only, as moed

    def from_bytes(self, dest: Any, data: bytes, start: int, rows: int) -> None:
        """Writes data (rows x hidden of x's dtype) into rows of dest."""
        if len(data) != rows * self.row_bytes:
            raise InvalidRequest(
                f"moed answered {len(data)} bytes for {rows} rows of {self.row_bytes}", "EPROTO")
        if self.torch:
            t = _torch()
            raw = np.frombuffer(data, dtype="<i2" if self.itemsize == 2 else "<i4")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = t.from_numpy(raw).view(self.x.dtype).view(rows, self.hidden)
        else:
            src = np.frombuffer(data, dtype=self.x.dtype).reshape(rows, self.hidden)
        d2 = _view2d(dest, self.n, self.hidden)
        if d2 is None:
            if self.torch:
                dest.copy_(src.view(self.shape))
            else:
                np.copyto(dest, src.reshape(self.shape))
            return
        if self.torch:
            d2[start:start + rows].copy_(src)
        else:
            np.copyto(d2[start:start + rows], src)


def _view2d(x: Any, n: int, hidden: int) -> Any:
    """x as [n, hidden] sharing its memory, or None when that needs a copy."""
    if is_torch(x):
        try:
            return x.view(n, hidden)
        except RuntimeError:
            return None
    v = x.view()
    try:
        v.shape = (n, hidden)  # raises instead of copying
    except AttributeError:
        return None
    return v


def routing(ids: Any, weights: Any, n: int, top_k: int, n_experts: int
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids int32 [n, top_k], weights float32 [n, top_k]) as numpy views or
    copies, checked; None when neither is given."""
    if ids is None and weights is None:
        return None
    if ids is None or weights is None:
        raise InvalidRequest("caller routing needs both ids= and weights= (or neither)", "EINVAL")

    def arr(v: Any, what: str) -> np.ndarray:
        if is_torch(v):
            v = v.detach().to("cpu")
            if v.dtype == _torch().bfloat16:
                v = v.float()
            v = v.numpy()
        a = np.asarray(v)
        if a.size != n * top_k:
            raise InvalidRequest(
                f"{what} has shape {list(a.shape)}: expected [{n}, {top_k}] "
                f"(tokens, the model's top_k)", "EINVAL")
        return a.reshape(n, top_k)

    i = arr(ids, "ids")
    w = arr(weights, "weights")
    if i.dtype.kind not in "iu":
        raise InvalidRequest(f"ids has dtype {i.dtype}: expected an integer type (int32)", "EINVAL")
    if w.dtype.kind != "f":
        raise InvalidRequest(f"weights has dtype {w.dtype}: expected float32", "EINVAL")
    if i.size and (i.min() < 0 or i.max() >= n_experts):
        raise InvalidRequest(
            f"ids holds expert {int(i.min()) if i.min() < 0 else int(i.max())}: the model has "
            f"experts 0 to {n_experts - 1}", "ERANGE")
    return i, w
