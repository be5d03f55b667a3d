"""moed going away under a session, and coming back: ConnectionLost within a
second or two (never a hang), and reconnect() once moed is back."""
from __future__ import annotations

import time

import numpy as np
import pytest

import moed
from conftest import HIDDEN, Moed, wait_gone


@pytest.mark.parametrize("kind", ["shm", "grpc"])
def test_killed_and_restarted(kind, models, tmp_path):
    if kind == "grpc":
        pytest.importorskip("grpc")
    sock = tmp_path / "shm.sock"
    d = Moed(models, sock, tmp_path / "moed.log")
    port = d.port
    x = np.ones((4, HIDDEN), np.float32)
    try:
        s = moed.connect(str(sock)) if kind == "shm" else \
            moed.connect_remote(d.address, timeout=10)
        y = s.forward("mx", 1, x)
        pending = s.submit("mx", 1, x) if kind == "shm" else None
        d.kill()
        t0 = time.monotonic()
        with pytest.raises(moed.ConnectionLost) as e:
            for _ in range(3):  # the first may still find its answer
                s.forward("mx", 1, x)
        assert time.monotonic() - t0 < 3, "ConnectionLost took too long"
        assert "reconnect" in str(e.value), e.value
        if pending is not None:
            try:
                pending.wait(timeout=3)  # answered before the kill, or lost
            except moed.ConnectionLost:
                pass
            with pytest.raises(moed.ConnectionLost):
                s.models()
        # Still down: reconnect says so, quickly.
        wait_gone(sock, 1)
        t0 = time.monotonic()
        with pytest.raises(moed.ConnectionLost):
            s.reconnect()
            s.models()
        assert time.monotonic() - t0 < 3
        # Back (same socket, same port): reconnect works.
        d = Moed(models, sock, tmp_path / "moed.log", port=port)
        assert s.reconnect() is s
        assert np.array_equal(s.forward("mx", 1, x), y)
        s.close()
    finally:
        d.stop()


def test_sigterm_under_wait(models, tmp_path):
    """moed stopping while a wait sleeps: the wait ends with ConnectionLost."""
    sock = tmp_path / "shm.sock"
    d = Moed(models, sock, tmp_path / "moed.log")
    try:
        s = moed.connect(str(sock))
        ps = [s.submit("mx", 1 + i % 2, np.ones((256, HIDDEN), np.float32)) for i in range(8)]
        d.kill()
        t0 = time.monotonic()
        lost = 0
        for p in ps:
            try:
                p.wait(timeout=5)
            except moed.ConnectionLost:
                lost += 1
        assert time.monotonic() - t0 < 3
        assert all(p.done() for p in ps)
        s.close()
    finally:
        d.stop()
