#!/usr/bin/python3
"""The cluster's NCCL transport end to end, on the GPUs of this machine.

With two GPUs or more: nodes A and B, NCCL on devices 0 and 1.
  - each sees the other's NCCL "ready" (communicators made over
    Peer/NcclConnect);
  - forwards through A and through B equal `moectl forward --local`
    (mixtral and deepseek_v3, 1, 7 and 64 tokens), with token rows over NCCL
    both ways (nccl_calls > 0 on each side) and no fallback to gRPC;
  - SIGKILL of B under a load run through A fails no request (A aborts the
    communicator and fails over); B restarted rejoins and NCCL is ready
    again (a new generation), outputs unchanged;
  - B frozen (SIGSTOP): A's SIGTERM still exits 0 within 30 s.
With one GPU: NCCL refuses two ranks on one device, so A's communicator to
B fails: A says "failed: ..." for B, the rows go over gRPC, and every
forward still equals --local.  Without a GPU: skip (77).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
try:
    import numpy as np
    from moedtest import check, finish
    from cluster import Node, compare_forwards, free_ports, run
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy)")
    sys.exit(77)


def gpu_count():
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    n_gpu = gpu_count()
    if n_gpu == 0:
        print("SKIP: no GPU (nvidia-smi lists none): the NCCL transport needs one")
        return 77
    w, m = a.workdir, a.moectl
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)

    def ctl(node, *args):
        return run([m] + list(args) + ["--remote", node.addr])

    def js(node, *args):
        import json
        r = ctl(node, *args, "--json")
        if r.returncode:
            raise RuntimeError(f"moectl {' '.join(args)} at {node.name}: {r.stderr}")
        return json.loads(r.stdout)

    def peer(node, name):
        return next(p for p in js(node, "status").get("peers", []) if p["name"] == name)

    def wait_nccl(node, name, prefix, timeout):
        t0, st = time.time(), ""
        while time.time() - t0 < timeout:
            st = peer(node, name).get("nccl", "")
            if st.startswith(prefix):
                break
            time.sleep(0.25)
        return st

    models, inputs = {}, {}
    for arch in ("mixtral", "deepseek_v3"):
        d = f"{w}/{arch}"
        r = run([m, "gen-model", "--arch", arch, "--out", d, "--layers", "3", "--experts", "8",
                 "--top-k", "2", "--hidden", "128", "--ffn", "256", "--seed", "5", "-q"])
        if r.returncode:
            print(r.stderr)
            return 1
        models[arch] = d
        layer = 1 if arch == "deepseek_v3" else 0
        for tokens in (1, 7, 64):
            xf, yf = f"{w}/x-{arch}-{tokens}.npy", f"{w}/yl-{arch}-{tokens}.npy"
            np.save(xf, np.random.RandomState(tokens).randn(tokens, 128).astype(np.float32))
            r = run([m, "forward", "--local", "--model", d, "--layer", str(layer), "--in", xf,
                     "--out", yf, "-q"])
            check(f"forward --local {arch}/{tokens}", r.returncode == 0, r.stderr)
            inputs[(arch, tokens)] = (layer, xf, np.load(yf))

    def forwards(via, label):
        bad = compare_forwards(ctl, w, inputs, via)
        check(f"{label}: forwards through {','.join(n.name for n in via)} equal --local",
              not bad, "; ".join(bad[:5]))

    pa, pb = free_ports(2)
    dev_b = 1 if n_gpu >= 2 else 0

    def start(name, port, other, dev):
        return Node(a.moed, name, port, [other], models, w,
                    extra=["--nccl-device", str(dev), "--peer-timeout-ms", "5000"])

    nodes = []
    try:
        A = start("A", pa, ("B", pb), 0)
        nodes.append(A)
        B = start("B", pb, ("A", pa), dev_b)
        nodes.append(B)
        if n_gpu == 1:
            st = wait_nccl(A, "B", "failed:", 60)
            check("one GPU: A's NCCL to B fails (two ranks on one device) and says why",
                  st.startswith("failed:"), st)
            forwards([A, B], "one GPU, rows over gRPC")
            pi = peer(A, "B")
            check("one GPU: nothing went over NCCL", int(pi.get("nccl_calls", 0)) == 0, pi)
            return finish()

        for x, y in ((A, "B"), (B, "A")):
            st = wait_nccl(x, y, "ready", 60)
            check(f"{x.name}'s NCCL to {y} is ready", st == "ready", st)
        forwards([A, B], "two GPUs, rows over NCCL")
        for x, y in ((A, "B"), (B, "A")):
            pi = peer(x, y)
            check(f"{x.name} sent {y} rows over NCCL and served its (nccl_calls, nccl_served)",
                  int(pi.get("nccl_calls", 0)) > 0 and int(pi.get("nccl_served", 0)) > 0 and
                  int(pi.get("nccl_bytes", 0)) > 0, pi)
            fb = int(js(x, "stats").get("cluster", {}).get("nccl_fallbacks", 0))
            check(f"{x.name}: no NCCL transfer fell back to gRPC", fb == 0, fb)

        # SIGKILL of B under load through A: no request fails.
        layer, xf, _ = inputs[("mixtral", 64)]
        failed, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                r = ctl(A, "forward", "--model", "mixtral", "--layer", str(layer), "--in", xf,
                        "--out", f"{w}/y-load.npy")
                if r.returncode:
                    failed.append(r.stderr.strip())
        t = threading.Thread(target=load)
        t.start()
        time.sleep(1.0)
        B.stop(signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        t.join()
        check("SIGKILL of B under load through A: no request failed", not failed, failed[:3])
        cl = js(A, "stats").get("cluster", {})
        check("A counts the failover", int(cl.get("failovers", 0)) +
              int(cl.get("nccl_fallbacks", 0)) > 0, cl)
        B = start("B", pb, ("A", pa), dev_b)
        nodes[1] = B
        for x, y in ((A, "B"), (B, "A")):
            st = wait_nccl(x, y, "ready", 90)
            check(f"B restarted: {x.name}'s NCCL to {y} is ready again", st == "ready", st)
        calls = {x.name: int(peer(x, y).get("nccl_calls", 0)) for x, y in ((A, "B"), (B, "A"))}
        forwards([A, B], "after B rejoined")
        check("after the restart both directions carry rows over NCCL again",
              int(peer(A, "B").get("nccl_calls", 0)) > calls["A"] and
              int(peer(B, "A").get("nccl_calls", 0)) > calls["B"], calls)

        # B frozen (SIGSTOP) with both communicators up: A's SIGTERM aborts
        # its own and exits 0 in bounded time (NCCL waits are bounded:
        # moed_cluster_stop gives joins and closes MOED_NCCL_STOP_WAIT_MS).
        B.p.send_signal(signal.SIGSTOP)
        try:
            t0 = time.time()
            rc = A.stop()
            took = time.time() - t0
            check("B frozen: A exits 0 on SIGTERM", rc == 0, rc)
            check("... within 30 s (no NCCL wait on the frozen peer)", took < 30, f"{took:.1f} s")
        finally:
            B.p.send_signal(signal.SIGCONT)
    finally:
        for n in nodes:
            rc = n.stop()
            check(f"{n.name} exits 0", rc == 0, rc)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
