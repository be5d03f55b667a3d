"""forward, submit/wait and bad use, on both session kinds (shared memory
through libmoe-client, and gRPC), against `moectl forward --local`."""
from __future__ import annotations

import numpy as np
import pytest

import moed
from conftest import HIDDEN, assert_close, round_to

rng = np.random.RandomState(11)


def randn(*shape: int) -> np.ndarray:
    return rng.randn(*shape).astype(np.float32)


def test_models(sess):
    ms = sess.models()
    assert [m.name for m in ms] == ["mx", "ds"]
    mx = sess.model("mx")
    assert (mx.arch, mx.hidden, mx.n_experts, mx.top_k, mx.ffn, mx.n_layers) == \
        ("mixtral", HIDDEN, 8, 2, 128, 3)
    assert mx.weight_dtype == "bf16" and mx.moe_layers == [0, 1, 2]
    ds = sess.model("ds")
    assert ds.arch == "deepseek_v3" and 0 not in ds.moe_layers and ds.moe_layers
    assert sess.model().name == "mx"
    with pytest.raises(moed.ModelNotFound, match=r"'nope'.*'mx', 'ds'"):
        sess.model("nope")


@pytest.mark.parametrize("name", ["mx", "ds"])
def test_forward_f32(sess, ref, name):
    m = sess.model(name)
    layer = m.moe_layers[-1]
    x = randn(7, HIDDEN)
    y = sess.forward(name, layer, x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    assert_close(y, ref(name, layer, x), "f32")
    # A ModelInfo names the model as well as its name.
    assert np.array_equal(sess.forward(m, layer, x), y)


def test_forward_f16(sess, ref):
    x = randn(5, HIDDEN)
    y = sess.forward("mx", 1, x.astype(np.float16))
    assert y.dtype == np.float16 and y.shape == x.shape
    assert_close(y, ref("mx", 1, round_to(x, "f16")), "f16")


def test_leading_dims(sess):
    x = randn(2, 3, HIDDEN)
    y = sess.forward("mx", 0, x)
    assert y.shape == (2, 3, HIDDEN)
    assert np.array_equal(y.reshape(6, HIDDEN), sess.forward("mx", 0, x.reshape(6, HIDDEN)))
    one = sess.forward("mx", 0, x[1, 2])
    assert one.shape == (HIDDEN,) and np.array_equal(one, y[1, 2])
    empty = sess.forward("mx", 0, np.zeros((0, HIDDEN), np.float32))
    assert empty.shape == (0, HIDDEN)


def test_out(sess):
    x = randn(4, HIDDEN)
    out = np.full_like(x, np.nan)
    y = sess.forward("mx", 2, x, out=out)
    assert y is out and np.array_equal(out, sess.forward("mx", 2, x))
    # A strided out= (every other row of a larger array) works too.
    big = np.zeros((8, HIDDEN), np.float32)
    sess.forward("mx", 2, x, out=big[::2])
    assert np.array_equal(big[::2], out) and not big[1::2].any()
    with pytest.raises(moed.InvalidRequest, match="out="):
        sess.forward("mx", 2, x, out=np.zeros((4, HIDDEN), np.float16))
    with pytest.raises(moed.InvalidRequest, match="out="):
        sess.forward("mx", 2, x, out=np.zeros((5, HIDDEN), np.float32))


def test_non_contiguous(sess):
    base = randn(6, 2 * HIDDEN)
    x = base[:, ::2]  # strided columns: no [n, hidden] view without a copy
    assert not x.flags.c_contiguous
    assert np.array_equal(sess.forward("mx", 1, x), sess.forward("mx", 1, x.copy()))
    t = randn(HIDDEN, 3, 2).transpose(2, 1, 0)  # [2, 3, H]: no [6, H] view
    assert np.array_equal(sess.forward("mx", 1, t), sess.forward("mx", 1, t.copy()))


def test_submit_wait(sess, ref):
    xs = [randn(n, HIDDEN) for n in (1, 3, 8, 2, 5, 16)]
    ps = [sess.submit("mx", 1 + i % 2, x) for i, x in enumerate(xs)]
    # Waited for out of order; each answer is its own request's.
    for i in reversed(range(len(xs))):
        y = ps[i].wait(timeout=30)
        assert ps[i].done()
        assert_close(y, ref("mx", 1 + i % 2, xs[i]), "f32")
        assert ps[i].hits + ps[i].misses >= 1
        assert ps[i].total_ns > 0 and ps[i].batch_tokens >= len(xs[i])
        assert np.array_equal(ps[i].wait(), y)  # again: the same result


def test_routing(sess, ref):
    x = randn(4, HIDDEN)
    ids = np.array([[0, 1], [2, 3], [7, 0], [5, 4]], np.int32)
    w = np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.3, 0.3]], np.float32)
    y = sess.forward("mx", 1, x, ids=ids, weights=w)
    assert_close(y, ref("mx", 1, x, routing=(ids, w)), "f32")
    assert not np.array_equal(y, sess.forward("mx", 1, x))
    with pytest.raises(moed.InvalidRequest, match="both"):
        sess.forward("mx", 1, x, ids=ids)
    with pytest.raises(moed.InvalidRequest, match=r"expected \[4, 2\]"):
        sess.forward("mx", 1, x, ids=ids[:3], weights=w[:3])
    with pytest.raises(moed.InvalidRequest, match="expert"):
        sess.forward("mx", 1, x, ids=ids + 8, weights=w)


@pytest.mark.parametrize("bad,match", [
    (lambda: randn(3, HIDDEN - 1), r"shape \[3, 63\]: expected \[\.\.\., 64\]"),
    (lambda: randn(3, HIDDEN).astype(np.float64), "float64"),
    (lambda: np.ones((3, HIDDEN), np.int32), "int32"),
    (lambda: np.float32(1.0) * np.ones(()), "shape"),
    (lambda: [[0.0] * HIDDEN], "numpy array or a torch tensor"),
])
def test_bad_input(sess, bad, match):
    with pytest.raises(moed.InvalidRequest, match=match) as e:
        sess.forward("mx", 1, bad())
    assert e.value.code and e.value.message


def test_moed_validation(sess):
    """moed's own checks come back with moed's message."""
    x = randn(3, HIDDEN)
    x[1, 5] = np.nan
    with pytest.raises(moed.InvalidRequest) as e:
        sess.forward("mx", 1, x)
    assert "nan" in e.value.message.lower() or "finite" in e.value.message.lower(), e.value
    assert e.value.code in ("EINVAL", "ERANGE", "INVALID_ARGUMENT", "OUT_OF_RANGE")
    dup = np.array([[1, 1]] * 3, np.int32), np.full((3, 2), 0.5, np.float32)
    with pytest.raises(moed.InvalidRequest, match="at most once"):
        sess.forward("mx", 1, randn(3, HIDDEN), ids=dup[0], weights=dup[1])
    # The session goes on.
    assert sess.forward("mx", 1, randn(2, HIDDEN)).shape == (2, HIDDEN)


def test_unknown_model_and_layer(sess):
    x = randn(2, HIDDEN)
    with pytest.raises(moed.ModelNotFound, match="nope"):
        sess.forward("nope", 1, x)
    with pytest.raises(moed.ModelNotFound, match="dense"):
        sess.forward("ds", 0, x)
    with pytest.raises(moed.ModelNotFound, match="out of range"):
        sess.forward("mx", 3, x)
    with pytest.raises(moed.ModelNotFound, match="out of range"):
        sess.forward("mx", -1, x)
    with pytest.raises(moed.ModelNotFound):
        sess.forward(3, 1, x)


def test_closed(sess):
    x = randn(2, HIDDEN)
    with sess as s:
        assert s is sess and not s.closed
        s.forward("mx", 1, x)
    assert sess.closed
    with pytest.raises(moed.SessionClosed, match="closed"):
        sess.forward("mx", 1, x)
    with pytest.raises(moed.SessionClosed):
        sess.models()
    sess.close()  # twice: fine


def test_close_with_pending(moed_proc):
    s = moed.connect(str(moed_proc.sock))
    p = s.submit("mx", 1, randn(64, HIDDEN))
    s.close()
    # Either it completed before the close was seen, or it says why not.
    try:
        assert p.wait(timeout=5).shape == (64, HIDDEN)
    except moed.SessionClosed:
        pass


def test_context_manager(moed_proc):
    with moed.connect(str(moed_proc.sock), name="pytest") as s:
        y = s.forward("mx", 1, randn(2, HIDDEN))
    assert y.shape == (2, HIDDEN) and s.closed


def test_split_small_arena(moed_proc, ref):
    """A request larger than the arena is split by tokens."""
    with moed.connect(str(moed_proc.sock), arena_bytes=64 << 10) as s:
        assert s.arena_bytes <= 64 << 10 or pytest.skip(f"moed gave {s.arena_bytes} bytes")
        x = randn(300, HIDDEN)  # 75 KiB in + 75 KiB out
        p = s.submit("mx", 1, x)
        assert_close(p.wait(), ref("mx", 1, x), "f32")
        # Several in flight that together exceed the arena.
        ps = [s.submit("mx", 2, x) for _ in range(3)]
        y0 = ps[0].wait()
        for q in ps[1:]:
            assert np.array_equal(q.wait(), y0)
        # Strided rows are split as well.
        xs = randn(300, 2 * HIDDEN)[:, ::2]
        assert np.array_equal(s.forward("mx", 1, xs), s.forward("mx", 1, xs.copy()))
        # Strides that allow no [tokens, hidden] view, too big to copy whole: refused.
        with pytest.raises(moed.InvalidRequest, match="contiguous"):
            s.forward("mx", 1, randn(HIDDEN, 15, 20).transpose(2, 1, 0))
    with moed.connect(str(moed_proc.sock), arena_bytes=4096) as s:
        if s.arena_bytes < 2 * HIDDEN * 4 + 128:
            with pytest.raises(moed.InvalidRequest, match="arena_bytes="):
                s.forward("mx", 1, randn(1, HIDDEN))


def test_no_moed(workdir):
    with pytest.raises(moed.ConnectionLost, match="no moed listening"):
        moed.connect(str(workdir / "nothing.sock"))
