"""torch tensors in and out (float32, float16, bfloat16), on both session
kinds; skipped where torch is not installed (Debian's python3)."""
from __future__ import annotations

import numpy as np
import pytest

import moed
from conftest import HIDDEN, assert_close, round_to

torch = pytest.importorskip("torch")


def rand(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float32)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "f32"), (torch.float16, "f16"),
                                        (torch.bfloat16, "bf16")])
def test_forward(sess, ref, dtype, name):
    x = rand(2, 5, HIDDEN)
    xt = x.to(dtype)
    y = sess.forward("mx", 1, xt)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == xt.shape
    assert y.device == xt.device
    yref = ref("mx", 1, round_to(x.numpy(), name))
    assert_close(y.float().numpy(), yref, name)


def test_out_and_strides(sess):
    x = rand(6, 2 * HIDDEN).to(torch.bfloat16)[:, ::2]  # strided
    assert not x.is_contiguous()
    y = sess.forward("mx", 2, x.contiguous())
    out = torch.empty(6, HIDDEN, dtype=torch.bfloat16)
    assert sess.forward("mx", 2, x, out=out) is out
    assert torch.equal(out, y)
    t = rand(HIDDEN, 3, 2).permute(2, 1, 0)  # no [6, H] view
    assert torch.equal(sess.forward("mx", 2, t), sess.forward("mx", 2, t.contiguous()))
    with pytest.raises(moed.InvalidRequest, match="out="):
        sess.forward("mx", 2, x, out=np.zeros((6, HIDDEN), np.float32))


def test_requires_grad_and_submit(sess):
    x = rand(3, HIDDEN).requires_grad_()
    ps = [sess.submit("mx", 1, x) for _ in range(4)]
    ys = [p.wait(timeout=30) for p in ps]
    assert not ys[0].requires_grad
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_routing_tensors(sess):
    x = rand(2, HIDDEN)
    ids = torch.tensor([[0, 1], [3, 2]])  # int64: converted
    w = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    y = sess.forward("mx", 1, x, ids=ids, weights=w)
    assert torch.equal(y, sess.forward("mx", 1, x, ids=ids.int().numpy(), weights=w.numpy()))


@pytest.mark.parametrize("bad", [torch.float64, torch.int32, torch.int8])
def test_bad_dtype(sess, bad):
    with pytest.raises(moed.InvalidRequest, match=str(bad).replace("torch.", "")):
        sess.forward("mx", 1, torch.zeros(2, HIDDEN, dtype=bad))


def test_shape(sess):
    with pytest.raises(moed.InvalidRequest, match="expected"):
        sess.forward("mx", 1, rand(2, HIDDEN + 1))
