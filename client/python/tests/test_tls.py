"""The remote session over TLS: moed with a certificate, the client trusting
it by ca=, and a client without TLS refused."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from conftest import Moed, assert_close


@pytest.fixture(scope="module")
def tls_moed(workdir, models):
    if not shutil.which("openssl"):
        pytest.skip("no openssl (scripts/deps.sh installs it)")
    pytest.importorskip("grpc")
    d = workdir / "tls"
    d.mkdir(exist_ok=True)
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                        "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost"], capture_output=True)
    assert r.returncode == 0, r.stderr
    m = Moed({"mx": models["mx"]}, d / "shm.sock", d / "moed.log",
             extra=["--tls-cert", str(d / "cert.pem"), "--tls-key", str(d / "key.pem")])
    yield m, d / "cert.pem"
    m.stop()


def test_forward_over_tls(tls_moed, ref):
    import moed
    m, cert = tls_moed
    x = np.random.default_rng(5).standard_normal((3, 64), dtype=np.float32)
    with moed.connect_remote(f"localhost:{m.port}", ca=str(cert)) as s:
        assert [i.name for i in s.models()] == ["mx"]
        y = s.forward("mx", 1, x)
    assert_close(y, ref("mx", 1, x), "f32")


def test_plaintext_client_refused_by_tls_moed(tls_moed):
    import moed
    m, _ = tls_moed
    with moed.connect_remote(f"localhost:{m.port}", timeout=5) as s:
        with pytest.raises(moed.MoedError):
            s.models()


def test_untrusted_certificate_refused(tls_moed):
    import moed
    m, _ = tls_moed
    # tls=True with the system's CAs: moed's self-signed certificate is not trusted.
    with moed.connect_remote(f"localhost:{m.port}", tls=True, timeout=5) as s:
        with pytest.raises(moed.MoedError):
            s.models()
