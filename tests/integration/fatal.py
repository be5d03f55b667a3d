#!/usr/bin/python3
"""moed after a device error it cannot recover from (issue 21, item 6), with
the fault-injection hook MOED_BACKEND_FAULTS (moed(8)): the backend's Nth
grouped_ffn (ffn=N) or matmul (matmul=N) call loses its device as a sticky
CUDA error does (cudaErrorIllegalAddress and the like), on the CPU backend.

Checks:
- a bad MOED_BACKEND_FAULTS is refused at start, naming the variable and
  what it accepts;
- with ffn=6 (a forward makes one call per run of experts ready): the
  forwards before the fault are served, bit for bit what a moed without the
  hook answers; the forward that meets the fault fails with INTERNAL and
  a message naming the layer and the lost device; then health says
  NOT_SERVING, /readyz is 503 with the reason, moed_failed is 1, a message on
  a stream open meanwhile gets UNAVAILABLE with the reason; and moed exits
  with status 3 (systemd restarts it: Restart=on-failure) within seconds,
  the stream open notwithstanding, its log naming the error;
- ffn=1 with a stream that never ends and drain_timeout_ms 60 s: moed still
  exits 3 within seconds, the stream cancelled;
- 8 callers in parallel across the fault: each is answered, served ones
  are the reference's, the others INTERNAL naming the device or UNAVAILABLE;
- with matmul=1: the first forward fails at the router, and moed exits 3;
- over shared memory (the Python package): the forward that meets the fault
  fails with ENOTRECOVERABLE, the next with ESHUTDOWN, both starting with
  the reason (the shm message holds 103 bytes), and moed exits 3;
- with the hook set but never reached, SIGTERM still exits 0.

Exit 0 pass, 1 fail, 77 skip (grpcio or numpy missing).
"""
import argparse
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

try:
    import numpy as np
    import grpc
    from moedtest import Daemon, check, code_of, finish, from_tensor, stubs, tensor
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy, python3-grpcio, "
          f"python3-grpc-tools)")
    sys.exit(77)

FATAL_EXIT = 3


def http_get(port, path):
    """(status, body) of GET path on the metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def gauge(body, name):
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def with_env(**kv):
    env = dict(os.environ)
    env.update(kv)
    return env


class FaultyDaemon(Daemon):
    """Daemon with MOED_BACKEND_FAULTS set to faults."""

    def __init__(self, moed, args, workdir, name, faults, metrics=False):
        old = os.environ.get("MOED_BACKEND_FAULTS")
        os.environ["MOED_BACKEND_FAULTS"] = faults
        try:
            super().__init__(moed, args, workdir, name, metrics=metrics)
        finally:
            if old is None:
                del os.environ["MOED_BACKEND_FAULTS"]
            else:
                os.environ["MOED_BACKEND_FAULTS"] = old


def wait_exit(d, timeout):
    """(exit status or None when still running after timeout, seconds)."""
    t0 = time.time()
    try:
        rc = d.p.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
        d.p.kill()
        d.p.wait()
    return rc, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    protos = stubs(a.source, w)
    if not protos:
        return finish()
    pb, pbg, hpb, hpbg = protos
    model = f"{w}/mix"
    subprocess.run([a.moectl, "gen-model", "--arch", "mixtral", "--layers", "3", "--experts",
                    "8", "--hidden", "128", "--ffn", "96", "--out", model, "-q"], check=True)
    args = ["--model", f"mix={model}", "--threads", "1"]
    x = np.random.default_rng(1).standard_normal((5, 128)).astype(np.float32)

    # bad values of the hook: refused at start, naming it and what it takes
    for bad in ["ffn=x", "ffn=", "gpu=1", "ffn=-1", "ffn"]:
        p = subprocess.run([a.moed, "--listen", "127.0.0.1:0"] + args, capture_output=True,
                           text=True, timeout=60, env=with_env(MOED_BACKEND_FAULTS=bad))
        check(f"MOED_BACKEND_FAULTS={bad} refused",
              p.returncode == 1 and f"MOED_BACKEND_FAULTS='{bad}'" in p.stderr
              and "expected ffn=N, matmul=N and copy=N" in p.stderr,
              f"status {p.returncode}: {p.stderr[-400:]}")

    # the reference: the same forward on a moed without the hook
    d = Daemon(a.moed, args, w, "ref")
    try:
        want = from_tensor(pb, pbg.ExpertsStub(d.channel).Forward(
            pb.ForwardRequest(model="mix", layer=1, hidden=tensor(pb, x)), timeout=30).output)
    finally:
        check("reference moed exits 0", d.stop() == 0)

    # ffn=6: forwards served until the sixth grouped_ffn call loses the device
    d = FaultyDaemon(a.moed, args, w, "ffn6", "ffn=6", metrics=True)
    stream_q, stream_out = queue.Queue(), []
    try:
        exp = pbg.ExpertsStub(d.channel)
        health = hpbg.HealthStub(d.channel)
        check("the hook is logged", "MOED_BACKEND_FAULTS=ffn=6" in d.stderr(), d.stderr())
        r = health.Check(hpb.HealthCheckRequest(), timeout=10)
        check("SERVING before the fault",
              r.status == hpb.HealthCheckResponse.SERVING, r.status)

        # a stream held open across the fault (its messages come from a queue)
        def gen():
            while True:
                item = stream_q.get()
                if item is None:
                    return
                yield item

        def run_stream():
            try:
                for resp in exp.ForwardStream(gen(), timeout=60):
                    stream_out.append(("ok", resp.tag))
            except grpc.RpcError as e:
                stream_out.append((e.code(), e.details()))
        th = threading.Thread(target=run_stream)
        th.start()

        served, same, got = 0, True, []
        for _ in range(30):
            code, det = code_of(lambda: got.append(from_tensor(pb, exp.Forward(
                pb.ForwardRequest(model="mix", layer=1, hidden=tensor(pb, x)),
                timeout=30).output)))
            if code != grpc.StatusCode.OK:
                break
            same = same and np.array_equal(got[-1], want)
            served += 1
            if served == 1:
                st, body = http_get(d.metrics_port, "/metrics")
                check("moed_failed 0 before the fault",
                      st == 200 and gauge(body, "moed_failed") == 0,
                      (st, gauge(body, "moed_failed")))
        check("forwards before the fault served", served >= 1, (served, code, det))
        check("... bit for bit the reference's", same)
        check("the forward that meets the fault fails with INTERNAL",
              code == grpc.StatusCode.INTERNAL, (code, det))
        check("... naming the layer, the lost device and the restart",
              "layer 1" in det and "device lost: injected fault on grouped_ffn call 6" in det
              and "exits to be restarted" in det, det)
        # for a second gRPC still answers (health), then the open stream
        # holds the drain (at most 2 s): the metrics endpoint still answers
        try:
            status = health.Check(hpb.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as e:
            status = (e.code(), e.details())
        check("health NOT_SERVING after the fault",
              status == hpb.HealthCheckResponse.NOT_SERVING, status)
        code, det = code_of(lambda: exp.Forward(
            pb.ForwardRequest(model="mix", layer=0, hidden=tensor(pb, x)), timeout=5))
        check("a new forward gets UNAVAILABLE with the reason",
              code == grpc.StatusCode.UNAVAILABLE and "moed failed" in det
              and "injected fault on grouped_ffn call 6" in det, (code, det))
        st, body = http_get(d.metrics_port, "/readyz")
        check("/readyz 503 with the reason", st == 503 and "moed failed" in body
              and "injected fault on grouped_ffn call 6" in body, (st, body))
        st, body = http_get(d.metrics_port, "/metrics")
        check("moed_failed 1", st == 200 and gauge(body, "moed_failed") == 1,
              (st, gauge(body, "moed_failed") if st == 200 else body))
        stream_q.put(pb.ForwardRequest(model="mix", layer=0, hidden=tensor(pb, x), tag=7))
        th.join(15)
        check("a message on the open stream gets UNAVAILABLE with the reason",
              len(stream_out) == 1 and stream_out[0][0] == grpc.StatusCode.UNAVAILABLE
              and "moed failed" in stream_out[0][1]
              and "injected fault on grouped_ffn call 6" in stream_out[0][1], stream_out)
        rc, took = wait_exit(d, 20)
        check(f"moed exits {FATAL_EXIT} by itself", rc == FATAL_EXIT, rc)
        check("... within seconds (no hang)", took < 10, f"{took:.1f} s")
        log = d.stderr()
        check("the log names the error and the exit status",
              "the cpu backend cannot compute any more: device lost: injected fault on "
              "grouped_ffn call 6" in log and "exiting with status 3 to be restarted" in log,
              log[-1500:])
    finally:
        stream_q.put(None)
        d.stop()

    # ffn=1, drain_timeout_ms 60 s and a stream that never ends: moed does
    # not wait for it (the drain after a lost device is 2 s at most)
    d = FaultyDaemon(a.moed, args + ["--drain-timeout-ms", "60000"], w, "drain", "ffn=1")
    hold, ended = threading.Event(), []
    try:
        exp = pbg.ExpertsStub(d.channel)

        def endless():
            hold.wait(60)
            return
            yield

        def run_endless():
            try:
                for _ in exp.ForwardStream(endless(), timeout=60):
                    pass
                ended.append("ok")
            except grpc.RpcError as e:
                ended.append(e.code())
        th = threading.Thread(target=run_endless)
        th.start()
        time.sleep(0.2)
        code, det = code_of(lambda: exp.Forward(
            pb.ForwardRequest(model="mix", layer=0, hidden=tensor(pb, x)), timeout=30))
        check("ffn=1: the first forward fails with INTERNAL",
              code == grpc.StatusCode.INTERNAL and "grouped_ffn call 1" in det, (code, det))
        rc, took = wait_exit(d, 20)
        check(f"ffn=1: moed exits {FATAL_EXIT}", rc == FATAL_EXIT, rc)
        check("... within seconds though a stream stays open and drain_timeout_ms is 60 s",
              took < 10, f"{took:.1f} s")
        th.join(15)
        check("... and the open stream is ended (cancelled)", ended and ended[0] != "ok", ended)
    finally:
        hold.set()
        d.stop()

    # callers in parallel across the fault: every call is answered (none
    # hangs), served ones are the reference's, failed ones say why
    d = FaultyDaemon(a.moed, args + ["--batch-window-us", "2000"], w, "parallel", "ffn=10")
    try:
        exp = pbg.ExpertsStub(d.channel)
        results, lock = [], threading.Lock()

        def caller():
            for _ in range(50):
                try:
                    y = from_tensor(pb, exp.Forward(pb.ForwardRequest(
                        model="mix", layer=1, hidden=tensor(pb, x)), timeout=30).output)
                    r = ("ok", np.array_equal(y, want))
                except grpc.RpcError as e:
                    r = (e.code(), e.details())
                with lock:
                    results.append(r)
                if r[0] != "ok":
                    return
        th = [threading.Thread(target=caller) for _ in range(8)]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        check("parallel: every caller is answered (no hang)",
              not any(t.is_alive() for t in th) and len(results) >= 8, len(results))
        ok = [r for r in results if r[0] == "ok"]
        bad = [r for r in results if r[0] != "ok"]
        check("parallel: served forwards are the reference's", all(r[1] for r in ok),
              sum(not r[1] for r in ok))
        check("parallel: at least one forward met the fault (INTERNAL, the reason)",
              any(r[0] == grpc.StatusCode.INTERNAL and "injected fault on grouped_ffn" in r[1]
                  for r in bad), bad[:3])
        # after the fault: INTERNAL naming the device (computing already),
        # or UNAVAILABLE (refused with the reason, or moed gone)
        check("parallel: every failure is INTERNAL naming the lost device, or UNAVAILABLE",
              all((r[0] == grpc.StatusCode.INTERNAL and "device lost" in r[1]) or
                  r[0] == grpc.StatusCode.UNAVAILABLE for r in bad), bad[:5])
        rc, took = wait_exit(d, 20)
        check(f"parallel: moed exits {FATAL_EXIT}", rc == FATAL_EXIT, rc)
    finally:
        d.stop()

    # matmul=1: the router of the first forward
    d = FaultyDaemon(a.moed, args, w, "matmul1", "matmul=1")
    try:
        exp = pbg.ExpertsStub(d.channel)
        code, det = code_of(lambda: exp.Forward(
            pb.ForwardRequest(model="mix", layer=0, hidden=tensor(pb, x)), timeout=30))
        check("matmul=1: the first forward fails with INTERNAL at the router",
              code == grpc.StatusCode.INTERNAL and "router of layer 0" in det
              and "matmul call 1" in det, (code, det))
        rc, _ = wait_exit(d, 20)
        check(f"matmul=1: moed exits {FATAL_EXIT}", rc == FATAL_EXIT, rc)
    finally:
        d.stop()

    # shared memory (libmoe-client through the Python package, whose error
    # messages hold 103 bytes: the reason comes first): the forward that
    # meets the fault fails naming the lost device, the next one is refused
    # with the reason
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(a.moed))), "client",
                       "libmoe-client.so.1")
    sys.path.insert(0, f"{a.source}/client/python")
    os.environ["MOED_CLIENT_LIB"] = lib
    try:
        import moed as moedpy
    except ImportError as e:
        moedpy = None
        print(f"shared memory part skipped: {e}")
    if moedpy and not os.path.exists(lib):
        print(f"shared memory part skipped: no {lib} (not built)")
        moedpy = None
    if moedpy:
        # A sanitizer build's libmoe-client needs the ASan runtime loaded in
        # the program, which Python is not.
        try:
            moedpy._lib.lib()
        except moedpy.LibraryNotFound as e:
            print(f"shared memory part skipped: {e}")
            moedpy = None
    if moedpy:
        sock = f"{w}/shm.sock"
        d = FaultyDaemon(a.moed, args + ["--shm-socket", sock], w, "shm", "ffn=8")
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            s = moedpy.connect(sock)
            served, err = 0, None
            for _ in range(30):
                try:
                    y = s.forward("mix", 1, x)
                    check_same = np.array_equal(np.asarray(y), want)
                    if not check_same:
                        check("shm: forwards before the fault are the reference's", False)
                    served += 1
                except moedpy.MoedError as e:
                    err = e
                    break
            check("shm: forwards before the fault served", served >= 1, served)
            check("shm: the forward that meets the fault fails naming the lost device",
                  err is not None and err.code == "ENOTRECOVERABLE"
                  and err.message.startswith("device lost: injected fault on grouped_ffn call 8"),
                  err and (err.code, err.message))
            try:
                s.forward("mix", 1, x)
                err = None
            except moedpy.MoedError as e:
                err = e
            check("shm: the next forward is refused with the reason",
                  err is not None and err.code == "ESHUTDOWN" and err.message.startswith(
                      "moed failed: device lost: injected fault on grouped_ffn call 8"),
                  err and (err.code, err.message))
            rc, took = wait_exit(d, 20)
            check(f"shm: moed exits {FATAL_EXIT}", rc == FATAL_EXIT, rc)
            s.close()
        finally:
            d.stop()

    # the hook set but never reached: a normal stop
    d = FaultyDaemon(a.moed, args, w, "unreached", "ffn=1000")
    try:
        exp = pbg.ExpertsStub(d.channel)
        exp.Forward(pb.ForwardRequest(model="mix", layer=0, hidden=tensor(pb, x)), timeout=30)
        r = hpbg.HealthStub(d.channel).Check(hpb.HealthCheckRequest(), timeout=10)
        check("unreached hook: SERVING", r.status == hpb.HealthCheckResponse.SERVING, r.status)
    finally:
        check("unreached hook: SIGTERM exits 0", d.stop() == 0)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
