"""compute_precision through moed: `[compute] compute_precision` (the flag) and
a model's own `NAME.compute_precision` give what `moectl forward --local
--compute-precision` gives, bit for bit, and bf16 differs from exact by bf16
rounding only."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import MOECTL, Moed


def local(model, layer, x, precision, workdir, tag):
    xi, yo = workdir / f"prec-x-{tag}.npy", workdir / f"prec-y-{tag}.npy"
    np.save(xi, x)
    r = subprocess.run([str(MOECTL), "forward", "--local", "--model", str(model), "--layer",
                        str(layer), "--in", str(xi), "--out", str(yo), "-q",
                        "--compute-precision", precision], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return np.load(yo)


@pytest.mark.parametrize("how", ["flag", "model key"])
def test_moed_bf16_equals_local_bf16(how, workdir, models):
    import moed
    d = workdir / f"prec-{how.replace(' ', '-')}"
    d.mkdir(exist_ok=True)
    if how == "flag":
        m = Moed({"mx": models["mx"]}, d / "shm.sock", d / "moed.log",
                 extra=["--compute-precision", "bf16"])
    else:
        conf = d / "moed.conf"
        conf.write_text(f"[models]\nmx = {models['mx']}\nmx.compute_precision = bf16\n"
                        f"ds = {models['ds']}\n")
        m = Moed({}, d / "shm.sock", d / "moed.log", extra=["--config", str(conf)])
    try:
        x = np.random.default_rng(9).standard_normal((5, 64), dtype=np.float32)
        with moed.connect(str(m.sock)) as s:
            y = s.forward("mx", 1, x)
            if how == "model key":
                # The other model keeps the default, exact.
                yd = s.forward("ds", 1, x)
                assert np.array_equal(yd, local(models["ds"], 1, x, "exact", d, "ds"))
        bf = local(models["mx"], 1, x, "bf16", d, "bf")
        ex = local(models["mx"], 1, x, "exact", d, "ex")
        assert np.array_equal(y, bf), "moed's bf16 differs from forward --local's bf16"
        assert not np.array_equal(bf, ex), "bf16 gave exact's bits: the setting did nothing"
        scale = float(np.abs(ex).max())
        assert float(np.abs(bf - ex).max()) <= 2 ** -6 * scale
    finally:
        m.stop()
