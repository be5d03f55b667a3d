"""Fixtures of the moed Python package's tests: a real moed (build/daemon/moed)
serving synthetic models made by `moectl gen-model`, on a shared-memory
socket and a gRPC port, and `moectl forward --local` as the reference.

The build directory comes from $MOED_BUILD (default: <repo>/build); it must
hold daemon/moed, client/moectl and client/libmoe-client.so.1.  Without them
the tests that need moed are skipped.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
PKG = HERE.parent
REPO = PKG.parent.parent
BUILD = Path(os.environ.get("MOED_BUILD", REPO / "build"))
MOED = BUILD / "daemon" / "moed"
MOECTL = BUILD / "client" / "moectl"
LIB = BUILD / "client" / "libmoe-client.so.1"

sys.path.insert(0, str(PKG))  # the package under test, not an installed copy
if LIB.exists():
    os.environ.setdefault("MOED_CLIENT_LIB", str(LIB))

HIDDEN = 64
# name -> (arch, gen-model arguments)
MODELS = {
    "mx": ("mixtral", ["--layers", "3", "--experts", "8", "--top-k", "2", "--seed", "3"]),
    "ds": ("deepseek_v3", ["--layers", "3", "--experts", "8", "--top-k", "2", "--seed", "4"]),
}


def need_build() -> None:
    missing = [str(p) for p in (MOED, MOECTL, LIB) if not p.exists()]
    if missing:
        pytest.skip(f"not built: {', '.join(missing)} (set MOED_BUILD to a build directory)")


class Moed:
    """A moed process; stop() ends it, kill() kills it with SIGKILL."""

    def __init__(self, models: dict[str, Path], sock: Path, log: Path, port: int = 0,
                 extra: list[str] = ()) -> None:
        self.sock = sock
        self.models = models
        self.logpath = log
        self.log = open(log, "a")
        args = [str(MOED), "--listen", f"127.0.0.1:{port}", "--shm-socket", str(sock)] + list(extra)
        for n, d in models.items():
            args += ["--model", f"{n}={d}"]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = int(self._read(r"listening on port (\d+)"))
        self._read(r"shared memory on (\S+)")
        self.address = f"127.0.0.1:{self.port}"

    def _read(self, pattern: str) -> str:
        line = self.p.stdout.readline()
        m = re.search(pattern, line)
        if not m:
            self.p.kill()
            self.p.wait()
            raise RuntimeError(f"moed: expected /{pattern}/, got {line!r}: "
                               f"{self.logpath.read_text()[-2000:]}")
        return m.group(1)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moed-py")


@pytest.fixture(scope="session")
def models(workdir) -> dict[str, Path]:
    need_build()
    out = {}
    for name, (arch, args) in MODELS.items():
        d = workdir / name
        subprocess.run([str(MOECTL), "gen-model", "--arch", arch, "--out", str(d), "--hidden",
                        str(HIDDEN), "--ffn", "128", "--dtype", "bf16", "-q"] + args,
                       check=True, capture_output=True, timeout=60)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def moed_proc(workdir, models):
    d = Moed(models, workdir / "shm.sock", workdir / "moed.log")
    yield d
    d.stop()


@pytest.fixture(params=["shm", "grpc"])
def sess(request, moed_proc):
    """A session of each kind on the shared moed."""
    import moed
    if request.param == "shm":
        s = moed.connect(str(moed_proc.sock))
    else:
        pytest.importorskip("grpc")
        s = moed.connect_remote(moed_proc.address)
    yield s
    s.close()


class Reference:
    """`moectl forward --local` on the same checkpoint and input."""

    def __init__(self, models: dict[str, Path], workdir: Path) -> None:
        self.models, self.dir = models, workdir
        self.n = 0

    def __call__(self, name: str, layer: int, x: np.ndarray, routing=None) -> np.ndarray:
        self.n += 1
        xi, yo = self.dir / f"ref-x{self.n}.npy", self.dir / f"ref-y{self.n}.npy"
        np.save(xi, np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
        cmd = [str(MOECTL), "forward", "--local", "--model", str(self.models[name]), "--layer",
               str(layer), "--in", str(xi), "--out", str(yo), "-q"]
        if routing is not None:
            rp = self.dir / f"ref-r{self.n}.npz"
            np.savez(rp, ids=np.asarray(routing[0], np.int32),
                     weights=np.asarray(routing[1], np.float32))
            cmd += ["--routing-in", str(rp)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return np.load(yo).reshape(x.shape)


@pytest.fixture(scope="session")
def ref(models, workdir) -> Reference:
    return Reference(models, workdir)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (float32) rounded to bf16 or f16 and back, as the wire does."""
    x = np.asarray(x, np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
        return u.astype(np.uint32).view(np.float32)
    return x


def assert_close(y: np.ndarray, yref: np.ndarray, dtype: str) -> None:
    """f32: bit-identical or within 1e-6 relative; f16/bf16: within their rounding."""
    y = np.asarray(y, np.float32)
    assert y.shape == yref.shape
    scale = max(1.0, float(np.abs(yref).max()))
    if dtype == "f32":
        err = float(np.abs(y - yref).max())
        assert err <= 1e-6 * scale, f"max diff {err}"
        return
    tol = (2 ** -7 if dtype == "bf16" else 2 ** -10) * scale
    err = float(np.abs(round_to(yref, dtype) - y).max())
    assert err <= tol, f"max diff {err} > {tol}"


def wait_gone(path: Path, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while path.exists() and time.monotonic() < end:
        time.sleep(0.02)
