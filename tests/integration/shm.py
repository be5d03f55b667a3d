#!/usr/bin/python3
"""moed's shared-memory transport end to end: a real moed with --shm-socket,
clients through libmoe-client (moectl forward and bench with --socket, and
the client/examples program), checked against `moectl forward --local`.

Checks:
  - round trips for every architecture, f32/bf16/f16 activations and 1, 7
    and 64 tokens equal `forward --local` (f32 bit for bit; bf16 and f16
    within their rounding);
  - a NaN input is refused with its position and moed goes on; so is a
    finite input whose output overflows, naming its row;
  - several client processes at once (shm and gRPC together), none failing;
  - a client killed with SIGKILL mid-run: moed goes on, the other clients
    are unaffected, its session is reclaimed (moed_shm_sessions back to 0);
  - control commands given the shm socket say which socket they need;
  - moed stopped under a connected client: the client gets a clear error
    naming the reason, and connects again to the restarted moed;
  - a shm caller and a gRPC caller, one request at a time each, share
    batches (shared memory and gRPC batch together).

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

try:
    import numpy as np
    from moedtest import check, finish
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy)")
    sys.exit(77)

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


class Moed:
    def __init__(self, moed, models, sock, workdir, name, extra=()):
        self.log = open(f"{workdir}/{name}.log", "w+")
        args = [moed, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--shm-socket", sock] + list(extra)
        for n, d in models.items():
            args += ["--model", f"{n}={d}"]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = self._read(r"listening on port (\d+)")
        self.metrics = self._read(r"metrics on port (\d+)")
        self._read(r"shared memory on (\S+)")

    def _read(self, pattern):
        line = self.p.stdout.readline()
        m = re.search(pattern, line)
        if not m:
            self.p.kill()
            self.log.seek(0)
            raise RuntimeError(f"moed: expected /{pattern}/, got {line!r}: {self.log.read()}")
        return m.group(1)

    def gauge(self, name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics",
                                      timeout=10).read().decode()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -1


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def round_to(x, dtype):
    """x rounded to bf16 or f16 and back, as the wire does."""
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
        return u.astype(np.uint32).view(np.float32)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--example", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    m = a.moectl
    sock = f"{w}/shm.sock"

    models = {}
    for arch in ARCHS:
        d = f"{w}/{arch}"
        r = run([m, "gen-model", "--arch", arch, "--out", d, "--layers", "3", "--experts", "8",
                 "--top-k", "2", "--hidden", "128", "--ffn", "256", "--dtype", "bf16",
                 "--seed", "3"])
        if r.returncode:
            print(r.stderr)
            return 1
        models[arch] = d

    d = Moed(a.moed, models, sock, w, "moed")
    try:
        rng = np.random.RandomState(7)
        for arch in ARCHS:
            layer = 1 if arch != "deepseek_v3" else 2
            for tokens in (1, 7, 64):
                x = rng.randn(tokens, 128).astype(np.float32)
                np.save(f"{w}/x.npy", x)
                for dtype in ("f32", "bf16", "f16"):
                    xr = round_to(x, dtype)
                    np.save(f"{w}/xr.npy", xr)
                    loc = run([m, "forward", "--local", "--model", models[arch], "--layer",
                               str(layer), "--in", f"{w}/xr.npy", "--out", f"{w}/yl.npy", "-q"])
                    r = run([m, "forward", "--socket", sock, "--model", arch, "--layer",
                             str(layer), "--in", f"{w}/x.npy", "--out", f"{w}/ys.npy",
                             "--dtype", dtype])
                    name = f"{arch} layer {layer}, {tokens} tokens, {dtype}"
                    if loc.returncode or r.returncode:
                        check(name, False, loc.stderr + r.stderr)
                        continue
                    yl, ys = np.load(f"{w}/yl.npy"), np.load(f"{w}/ys.npy")
                    if dtype == "f32":
                        check(f"{name}: bit-identical to --local", np.array_equal(yl, ys),
                              f"max diff {np.abs(yl - ys).max()}")
                    else:
                        tol = (2 ** -7 if dtype == "bf16" else 2 ** -10) * max(
                            1.0, float(np.abs(yl).max()))
                        err = float(np.abs(round_to(yl, dtype) - ys).max())
                        check(f"{name}: within rounding of --local", err <= tol,
                              f"max diff {err} > {tol}")
        check("forward says it went through shared memory",
              "through shared memory" in r.stdout, r.stdout)

        # A NaN is refused with where it is; moed goes on.
        x = np.ones((2, 128), np.float32)
        x[1, 5] = np.nan
        np.save(f"{w}/nan.npy", x)
        r = run([m, "forward", "--socket", sock, "--model", "mixtral", "--layer", "0", "--in",
                 f"{w}/nan.npy", "--out", f"{w}/y.npy"])
        check("a NaN input is refused with its place",
              r.returncode == 1 and "token 1, element 5 is not finite" in r.stderr, r.stderr)
        # A finite input whose output overflows (issue 22, defect 5): refused, naming the row.
        x[1, 5] = 1e38
        np.save(f"{w}/big.npy", x)
        r = run([m, "forward", "--socket", sock, "--model", "mixtral", "--layer", "0", "--in",
                 f"{w}/big.npy", "--out", f"{w}/y.npy"])
        check("a NaN output is refused with its row",
              r.returncode == 1 and "output row 1 is not finite" in r.stderr, r.stderr)
        r = run([m, "forward", "--socket", sock, "--model", "nosuch", "--layer", "0", "--in",
                 f"{w}/x.npy", "--out", f"{w}/y.npy"])
        check("an unknown model is named", r.returncode == 1 and "nosuch" in r.stderr, r.stderr)
        r = run([m, "status", "--socket", sock])
        check("status on the shm socket says which socket it needs",
              r.returncode == 2 and "shared-memory socket" in r.stderr, r.stderr)
        r = run([m, "bench", "--transport", "shm", "--model", "mixtral", "--requests", "5",
                 "--remote", f"127.0.0.1:{d.port}"])
        check("bench --transport shm without the shm socket is refused",
              r.returncode == 2 and "--socket" in r.stderr, r.stderr)

        # Several client processes at once, shm and gRPC together.
        procs = [subprocess.Popen([m, "bench", "--socket", sock, "--model", "mixtral",
                                   "--requests", "300", "--callers", "2", "-q", "--json",
                                   "--dtype", dt], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for dt in ("f32", "bf16", "f16", "f32")]
        procs.append(subprocess.Popen([m, "bench", "--remote", f"127.0.0.1:{d.port}", "--model",
                                       "mixtral", "--requests", "300", "-q", "--json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            ok = p.returncode == 0 and '"errors": 0' in out.replace('"errors":0', '"errors": 0')
            check(f"concurrent client {i} ({'grpc' if i == 4 else 'shm'}): 300 requests, "
                  f"no error", ok and '"ok": 300' in out, out + err)

        # A client killed mid-run; another runs on.
        other = subprocess.Popen([m, "bench", "--socket", sock, "--model", "deepseek_v3",
                                  "--duration", "3", "-q", "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        victim = subprocess.Popen([m, "bench", "--socket", sock, "--model", "mixtral",
                                   "--duration", "30", "--callers", "4", "--tokens", "16", "-q"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        out, err = other.communicate(timeout=60)
        check("the other client saw no error while one was killed",
              other.returncode == 0 and re.search(r'"errors":\s*0', out), out + err)
        sessions = None
        for _ in range(50):
            sessions = d.gauge("moed_shm_sessions")
            if sessions == 0:
                break
            time.sleep(0.1)
        check("the killed client's sessions are reclaimed", sessions == 0, f"{sessions} open")
        check("moed still runs", d.p.poll() is None)
        opened = d.gauge("moed_shm_sessions_opened_total")
        check("sessions were counted", opened is not None and opened >= 20, opened)

        # The example program: every MoE layer for a stream of tokens.
        r = run([a.example, "--socket", sock, "--model", "deepseek_v3", "--tokens", "48",
                 "--steps", "3", "--dtype", "bf16"])
        check("client/examples/moe-layers runs", r.returncode == 0 and "tokens/s" in r.stdout,
              r.stdout + r.stderr)

        # moed stopped under a connected client, then restarted.
        ex = subprocess.Popen([a.example, "--socket", sock, "--model", "mixtral", "--tokens", "64",
                               "--steps", "100000"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        rc = d.stop()
        check("moed stops cleanly with a client connected", rc == 0, rc)
        out, err = ex.communicate(timeout=30)
        check("the client gets a clear error when moed stops",
              ex.returncode != 0 and "moed" in err and ("stop" in err or "reconnect" in err),
              err[-500:])
        d = Moed(a.moed, models, sock, w, "moed2")
        r = run([a.example, "--socket", sock, "--model", "mixtral", "--tokens", "8", "--steps",
                 "2"])
        check("a client connects again to the restarted moed", r.returncode == 0,
              r.stdout + r.stderr)

        # One shm caller and one gRPC caller, each with one request at a
        # time, on one layer, with a 20 ms batch window: a batch of two
        # requests holds one of each, so shared memory and gRPC batch
        # together.
        d.stop()
        d = Moed(a.moed, models, sock, w, "moed3", ["--batch-window-us", "20000"])
        common = ["--model", "mixtral", "--layers", "1", "--callers", "1", "--duration", "2",
                  "-q", "--json"]
        ps = [subprocess.Popen([m, "bench", "--socket", sock] + common, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True),
              subprocess.Popen([m, "bench", "--remote", f"127.0.0.1:{d.port}"] + common,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        outs = [p.communicate(timeout=60) for p in ps]
        try:
            js = [json.loads(o) for o, _ in outs]
            ok = all(j["errors"] == 0 for j in js)
            mixed = js[0]["mean_batch_requests"]
        except (ValueError, KeyError) as e:
            ok, mixed = False, f"{e}: {outs}"
        check("a shm and a gRPC caller run side by side without error", ok, outs)
        check("their requests share batches (mean batch > 1.3 requests with one of each)",
              isinstance(mixed, float) and mixed > 1.3, mixed)
    finally:
        rc = d.stop()
    check("moed exits 0", rc == 0, rc)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
