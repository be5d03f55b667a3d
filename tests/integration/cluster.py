#!/usr/bin/python3
"""moed's cluster end to end: several moed nodes on loopback ports serving
one expert pool (daemon/cluster.h), checked against `moectl forward --local`.

Checks:
  - three nodes form a cluster: each sees its two peers up;
  - every node computes the same placement, balanced: per MoE layer the
    nodes own experts within one of each other, so bytes within one expert
    per layer;
  - a forward through any node equals `forward --local` for every
    architecture and 1, 7 and 64 tokens (f32: within 1e-5 of max |y|, the
    partial sums being added in another order), and the statistics show the
    split (remote calls, token rows sent, ForwardExperts served);
  - SIGKILL of node C under a load run through A fails no request; A counts
    failovers and reports C down;
  - C restarted on its port rejoins (A and B see it up, neither restarted),
    and the outputs stay the same;
  - a fourth node added at run time (`moectl peer add` on A, B, C) owns
    experts in the placement, serves ForwardExperts, and the outputs stay
    the same; removed again (`moectl peer remove`), the map is back to three;
  - a node with max_split_forwards 1 refuses forwards beyond one in
    flight with RESOURCE_EXHAUSTED, and answers the others;
  - a node with the wrong token is refused (its status says "refused"), and
    Peer/Ping, Peer/ForwardExperts and `moectl peer add` without the right
    token get UNAUTHENTICATED.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

try:
    import numpy as np
    from moedtest import check, finish
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy)")
    sys.exit(77)

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
TOKEN = "secret"
# fast state changes: pings every 100 ms, replicas chosen every 500 ms; at
# most 16 rows per ForwardExperts, so that the 64-token forwards are split
# into several calls per peer (what a prefill beyond max_message_bytes does)
TIMING = ["--ping-interval-ms", "100", "--rebalance-interval-ms", "500",
          "--peer-timeout-ms", "1000", "--peer-max-rows", "16"]


def free_ports(n):
    """n loopback ports free now (bound to port 0, then closed)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Node:
    def __init__(self, moed, name, port, peers, models, workdir, token=TOKEN, log="node",
                 extra=()):
        self.name, self.port, self.addr = name, port, f"127.0.0.1:{port}"
        self.log = open(f"{workdir}/{log}-{name}.log", "a+")
        args = [moed, "--listen", self.addr, "--node-name", name, "--token", token,
                "--log-level", "info"] + TIMING + list(extra)
        for pn, pp in peers:
            args += ["--peer", f"{pn} 127.0.0.1:{pp}"]
        for n, d in models.items():
            args += ["--model", f"{n}={d}"]
        self.p = None
        for _ in range(20):  # the port of a killed node may linger a moment
            self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
            line = self.p.stdout.readline()
            if re.search(r"listening on port (\d+)", line):
                return
            self.p.wait()
            time.sleep(0.25)
        self.log.seek(0)
        raise RuntimeError(f"moed {name} did not start: {self.log.read()[-2000:]}")

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -9


def compare_forwards(ctl, w, inputs, via, cases=None, rel=1e-5):
    """Runs each input {(arch, tokens): (layer, x.npy, y_local)} through each
    node of via (`moectl forward`); what failed or differs from y_local by
    more than rel of max |y_local|, one line each."""
    bad = []
    for (arch, tokens), (layer, xf, yl) in inputs.items():
        if cases and (arch, tokens) not in cases:
            continue
        for n in via:
            out = f"{w}/y-{n.name}.npy"
            r = ctl(n, "forward", "--model", arch, "--layer", str(layer), "--in", xf,
                    "--out", out)
            if r.returncode:
                bad.append(f"{arch}/{tokens} via {n.name}: {r.stderr.strip()}")
                continue
            y = np.load(out)
            err = float(np.abs(y - yl).max()) if y.shape == yl.shape else float("inf")
            tol = rel * max(1.0, float(np.abs(yl).max()))
            if not err <= tol:
                bad.append(f"{arch}/{tokens} via {n.name}: max diff {err} > {tol}")
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    w, m = a.workdir, a.moectl
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    t_start = time.time()

    def ctl(node, *args, token=None):
        cmd = [m] + list(args) + ["--remote", node.addr]
        if token:
            cmd += ["--token", token]
        return run(cmd)

    def js(node, *args):
        r = ctl(node, *args, "--json")
        if r.returncode:
            raise RuntimeError(f"moectl {' '.join(args)} at {node.name}: {r.stderr}")
        return json.loads(r.stdout)

    def peer_states(node):
        return {p["name"]: p["state"] for p in js(node, "status").get("peers", [])}

    def wait_states(node, want, timeout=10.0):
        """Waits until node sees every peer of want in its state; the states."""
        t0, st = time.time(), {}
        while time.time() - t0 < timeout:
            st = peer_states(node)
            if all(st.get(k) == v for k, v in want.items()):
                break
            time.sleep(0.1)
        return st

    models = {}
    for arch in ARCHS:
        d = f"{w}/{arch}"
        r = run([m, "gen-model", "--arch", arch, "--out", d, "--layers", "3", "--experts", "8",
                 "--top-k", "2", "--hidden", "128", "--ffn", "256", "--seed", "5", "-q"])
        if r.returncode:
            print(r.stderr)
            return 1
        models[arch] = d

    pa, pb, pc, pd, pe, pf, pg, pm = free_ports(8)
    ports = {"A": pa, "B": pb, "C": pc, "D": pd, "E": pe, "F": pf, "G": pg}

    def metrics():
        """A's Prometheus samples, {'name{labels}': value}."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{pm}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {mt.group(1) + (mt.group(2) or ""): float(mt.group(3))
                for mt in re.finditer(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M)}

    def start(name, peers, token=TOKEN, log="node", extra=()):
        return Node(a.moed, name, ports[name], [(p, ports[p]) for p in peers], models, w,
                    token=token, log=log, extra=extra)

    nodes = {}
    try:
        nodes["A"] = start("A", ["B", "C"], extra=["--metrics", f"127.0.0.1:{pm}"])
        nodes["B"] = start("B", ["A", "C"])
        nodes["C"] = start("C", ["A", "B"])
        A, B, C = nodes["A"], nodes["B"], nodes["C"]

        # ---- membership ----
        for n in (A, B, C):
            want = {k: "up" for k in "ABC" if k != n.name}
            st = wait_states(n, want)
            check(f"{n.name} sees its 2 peers up", st == want, st)
        # Every peer says how its rows travel: NCCL "ready", or why gRPC.
        ns = {p["name"]: p.get("nccl", "") for p in js(A, "status").get("peers", [])}
        check("A says of each peer whether NCCL carries its rows, or why not",
              sorted(ns) == ["B", "C"] and all(
                  v == "ready" or v.startswith(("off:", "unavailable", "failed:", "connecting"))
                  for v in ns.values()), ns)

        info = {x["name"]: x for x in js(A, "models")["models"]}

        # ---- placement: the same map everywhere, balanced ----
        def placement_checks(nodes_now, label):
            names = sorted(n.name for n in nodes_now)
            for arch in ("mixtral", "deepseek_v3"):
                mi = info[arch]
                maps = [js(n, "placement", "--model", arch) for n in nodes_now]
                owners = [{(e.get("layer", 0), e.get("expert", 0)): e["owner"]
                           for e in p["entries"]} for p in maps]
                check(f"{label}: {arch}: every node computes the same owners",
                      all(o == owners[0] for o in owners), "maps differ")
                p = maps[0]
                nl = {x["name"]: x for x in p["nodes"]}
                check(f"{label}: {arch}: placement lists the nodes {names}",
                      sorted(nl) == names, sorted(nl))
                per_layer = {}
                for e in p["entries"]:
                    per_layer.setdefault(e.get("layer", 0), {}).setdefault(e["owner"], 0)
                    per_layer[e.get("layer", 0)][e["owner"]] += 1
                ok = len(per_layer) == len(mi["moe_layer_ids"]) and all(
                    len(c) == min(len(names), mi["experts"]) and
                    max(c.values()) - min(c.values()) <= 1 for c in per_layer.values())
                check(f"{label}: {arch}: per layer, the nodes own experts within one of "
                      f"each other", ok, per_layer)
                total = len(mi["moe_layer_ids"]) * mi["experts"]
                ex = [nl[n].get("experts", 0) for n in names]
                by = [int(nl[n].get("bytes", 0)) for n in names]
                check(f"{label}: {arch}: each node owns ~1/{len(names)} of the {total} experts "
                      f"and bytes within one expert per layer",
                      sum(ex) == total and max(ex) - min(ex) <= len(mi["moe_layer_ids"]) and
                      max(by) - min(by) <= len(mi["moe_layer_ids"]) * int(mi["expert_bytes"]),
                      f"experts {ex}, bytes {by}")

        placement_checks([A, B, C], "3 nodes")

        # ---- forwards through any node equal --local ----
        rng = np.random.RandomState(11)
        inputs = {}
        for arch in ARCHS:
            layers = info[arch]["moe_layer_ids"]
            for i, tokens in enumerate((1, 7, 64)):
                layer = layers[i % len(layers)]
                x = rng.randn(tokens, 128).astype(np.float32)
                xf, yf = f"{w}/x-{arch}-{tokens}.npy", f"{w}/yl-{arch}-{tokens}.npy"
                np.save(xf, x)
                r = run([m, "forward", "--local", "--model", models[arch], "--layer",
                         str(layer), "--in", xf, "--out", yf, "-q"])
                if r.returncode:
                    check(f"forward --local {arch}", False, r.stderr)
                    continue
                inputs[(arch, tokens)] = (layer, xf, np.load(yf))

        def forwards(via, label, cases=None, rel=1e-5):
            bad = compare_forwards(ctl, w, inputs, via, cases, rel)
            n_cases = len(cases) if cases else len(inputs)
            check(f"{label}: {n_cases} forwards through each of "
                  f"{','.join(n.name for n in via)} equal --local", not bad, "; ".join(bad[:5]))

        forwards([A, B, C], "3 nodes, every architecture, 1/7/64 tokens")
        cl = {n.name: js(n, "stats")["cluster"] for n in (A, B, C)}
        check("every node split its forwards (remote_calls > 0, tokens_remote > 0)",
              all(int(c.get("remote_calls", 0)) > 0 and int(c.get("tokens_remote", 0)) > 0
                  for c in cl.values()), cl)
        check("every node served ForwardExperts for the others",
              all(int(c.get("peer_calls_served", 0)) > 0 for c in cl.values()), cl)
        mx = metrics()
        check("A's metrics: remote calls counted, B and C up, NCCL not ready (no GPU) or ready",
              mx.get("moed_cluster_remote_calls_total", 0) > 0 and
              mx.get('moed_peer_up{peer="B"}') == 1 and mx.get('moed_peer_up{peer="C"}') == 1 and
              mx.get('moed_peer_nccl_ready{peer="B"}') in (0, 1),
              {k: v for k, v in mx.items() if "peer" in k or "remote_calls" in k})
        check("bytes between nodes are counted",
              all(int(c.get("bytes_sent", 0)) > 0 and int(c.get("bytes_received", 0)) > 0
                  for c in cl.values()), cl)
        # --peer-max-rows 16: one 64-token forward through A sends each peer
        # its rows (about half of them) in calls of at most 16 rows.
        def peer_counts():
            return {p["name"]: (int(p.get("calls", 0)), int(p.get("tokens_sent", 0)))
                    for p in js(A, "status").get("peers", [])}
        c0 = peer_counts()
        forwards([A], "one 64-token forward through A", [("mixtral", 64)])
        c1 = peer_counts()
        d = {k: (c1[k][0] - c0[k][0], c1[k][1] - c0[k][1]) for k in c1}
        check("a share above peer_max_rows goes in several calls of at most 16 rows",
              all(calls >= 2 and rows > 16 and rows <= 16 * calls for calls, rows in d.values()),
              d)

        # ---- concurrent callers at A and B: C batches their calls ----
        # ForwardExperts from A and from B go to C's scheduler like local
        # requests, so under concurrent load C computes fewer batches than
        # calls it serves (one batch per call without batching; about 1.15
        # calls a batch here, with the 200 us window and 3 layers).
        s0 = js(C, "stats")
        benches = [subprocess.Popen([m, "bench", "--remote", n.addr, "--model", "mixtral",
                                     "--duration", "2", "--callers", "3", "--tokens", "4", "-q",
                                     "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for n in (A, B)]
        for bp in benches:
            bp.communicate(timeout=60)
        s1 = js(C, "stats")
        served = int(s1["cluster"].get("peer_calls_served", 0)) - \
            int(s0["cluster"].get("peer_calls_served", 0))
        batches = int(s1.get("batches", 0)) - int(s0.get("batches", 0))
        check(f"C batches the calls of concurrent callers at A and B ({served} calls served "
              f"in {batches} batches)", served > 0 and batches > 0 and served > 1.05 * batches,
              f"{served} calls, {batches} batches")

        # ---- SIGKILL of C under load through A ----
        before = js(A, "stats")["cluster"]
        bench = subprocess.Popen([m, "bench", "--remote", A.addr, "--model", "mixtral",
                                  "--duration", "4", "--callers", "2", "--tokens", "4", "-q",
                                  "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        time.sleep(1.0)
        C.p.send_signal(signal.SIGKILL)
        C.p.wait()
        out, err = bench.communicate(timeout=60)
        try:
            b = json.loads(out)
        except ValueError:
            b = {}
        check("no request failed while C was killed (bench errors 0)",
              bench.returncode == 0 and b.get("errors") == 0 and b.get("ok", 0) > 0,
              out[-600:] + err[-600:])
        st = wait_states(A, {"C": "down"}, 5)
        check("A reports C down", st.get("C") == "down", st)
        mx = metrics()
        check("A's metrics: C down (moed_peer_up 0), failovers counted",
              mx.get('moed_peer_up{peer="C"}') == 0 and
              mx.get("moed_cluster_failovers_total", 0) > 0,
              {k: v for k, v in mx.items() if "peer_up" in k or "failovers" in k})
        after = js(A, "stats")["cluster"]
        check("A counted failovers",
              int(after.get("failovers", 0)) > int(before.get("failovers", 0)),
              f"before {before.get('failovers')}, after {after.get('failovers')}")
        check("B still sees A up", peer_states(B).get("A") == "up")
        forwards([A, B], "C down", cases=[("mixtral", 7), ("deepseek_v3", 64)])

        # ---- C restarts on its port and rejoins ----
        nodes["C"] = C = start("C", ["A", "B"], log="restart")
        for n in (A, B):
            st = wait_states(n, {"C": "up"})
            check(f"{n.name} sees the restarted C up (not restarted itself)",
                  st.get("C") == "up" and n.p.poll() is None, st)
        st = wait_states(C, {"A": "up", "B": "up"})
        check("the restarted C sees A and B up", st == {"A": "up", "B": "up"}, st)
        forwards([A, B, C], "C rejoined")
        # What A paged in for C's experts while C was down goes back to C:
        # evicted at a rebalance once C is up (every 500 ms here).
        t0, strays = time.time(), 0
        while time.time() - t0 < 5 and not strays:
            strays = int(js(A, "stats")["cluster"].get("strays_evicted", 0))
            time.sleep(0.2)
        check("A gives back the copies of C's experts it paged in meanwhile (strays_evicted)",
              strays > 0, strays)

        # ---- a fourth node at run time ----
        nodes["D"] = D = start("D", ["A", "B", "C"])
        ok = True
        for n in (A, B, C):
            r = ctl(n, "peer", "add", "D", D.addr, token=TOKEN)
            ok &= r.returncode == 0
            if r.returncode:
                check(f"peer add D at {n.name}", False, r.stderr)
        check("moectl peer add D on A, B and C", ok)
        for n in (A, B, C):
            st = wait_states(n, {"D": "up"})
            check(f"{n.name} sees D up", st.get("D") == "up", st)
        p = js(A, "placement", "--model", "mixtral")
        nl = {x["name"]: x for x in p["nodes"]}
        check("A's placement has D owning experts",
              "D" in nl and nl["D"].get("experts", 0) > 0, nl.get("D"))
        placement_checks([A, B, C, D], "4 nodes")
        served = int(js(D, "stats")["cluster"].get("peer_calls_served", 0))
        forwards([A, B, C, D], "4 nodes")
        served2 = int(js(D, "stats")["cluster"].get("peer_calls_served", 0))
        check("D serves ForwardExperts for the others", served2 > served, f"{served}->{served2}")

        # ... and removed again
        ok = True
        for n in (A, B, C):
            r = ctl(n, "peer", "remove", "D", token=TOKEN)
            ok &= r.returncode == 0
            if r.returncode:
                check(f"peer remove D at {n.name}", False, r.stderr)
        check("moectl peer remove D on A, B and C", ok)
        p = js(A, "placement", "--model", "mixtral")
        check("A's placement is back to A, B, C",
              sorted(x["name"] for x in p["nodes"]) == ["A", "B", "C"], p["nodes"])
        forwards([A, B, C], "D removed", cases=[("olmoe", 64), ("qwen2_moe", 7)])
        check("D stops cleanly", D.stop() == 0)
        del nodes["D"]

        # ---- the wrong token ----
        nodes["E"] = E = start("E", ["A"], token="wrong")
        st = wait_states(E, {"A": "refused"})
        check("E (wrong token) sees A as refused", st.get("A") == "refused", st)
        forwards([E], "E alone (A refused)", cases=[("mixtral", 7)])
        r = ctl(A, "peer", "add", "X", "127.0.0.1:1")
        check("moectl peer add without the token: UNAUTHENTICATED",
              r.returncode != 0 and "UNAUTHENTICATED" in r.stderr, r.stderr)
        r = ctl(A, "peer", "add", "X", "127.0.0.1:1", token="wrong")
        check("moectl peer add with the wrong token: UNAUTHENTICATED",
              r.returncode != 0 and "UNAUTHENTICATED" in r.stderr, r.stderr)
        grpc_checks(a, w, A)
        check("E stops cleanly", E.stop() == 0)
        del nodes["E"]

        # ---- bf16 on the wire ----
        # F sends its peers bf16 rows and asks for bf16 answers: within bf16
        # rounding of --local (2e-2 of max |y|; a wrong conversion is off by
        # the whole output), in about half the bytes per row of A's f32.
        # F's cache holds 4 experts: it pages, and its predictor, fed the
        # whole routing of its split forwards, prefetches what it holds.
        nodes["F"] = F = start("F", ["A", "B", "C"], extra=["--peer-bf16", "true",
                                                           "--host-cache-bytes", "800K"])
        st = wait_states(F, {k: "up" for k in "ABC"})
        check("F (peer_bf16) sees A, B and C up", st == {k: "up" for k in "ABC"}, st)
        forwards([F], "F, bf16 on the wire", cases=[("mixtral", 64), ("deepseek_v3", 64),
                                                   ("qwen3_moe", 7)], rel=2e-2)
        per_row = {}
        for n in (A, F):
            c = js(n, "stats")["cluster"]
            per_row[n.name] = int(c.get("bytes_sent", 0)) / max(1, int(c.get("tokens_remote", 1)))
        check("F sends about half the bytes per remote row that A sends (bf16 vs f32)",
              0.4 < per_row["F"] / per_row["A"] < 0.65, per_row)
        r = ctl(F, "bench", "--model", "mixtral", "--duration", "2", "--callers", "1",
                "--tokens", "4", "-q")
        tot = js(F, "stats").get("total", {})
        check("F's split forwards feed its predictor: prefetches under paging",
              r.returncode == 0 and int(tot.get("prefetches", 0)) > 0, f"{tot} {r.stderr}")
        check("F stops cleanly", F.stop() == 0)
        del nodes["F"]

        # ---- a cap on split forwards in flight ----
        G = nodes["G"] = start("G", ["A"], extra=["--max-split-forwards", "1"])
        wait_states(G, {"A": "up"})
        split_cap_check(a, w, G)
        check("G stops cleanly", G.stop() == 0)
        del nodes["G"]
    finally:
        for name in sorted(nodes):
            rc = nodes[name].stop()
            check(f"{name} exits 0", rc == 0, rc)
    print(f"{time.time() - t_start:.1f} s")
    return finish()


def split_cap_check(a, w, G):
    """G (max_split_forwards 1, one peer): Forwards beyond the one split
    forward in flight get RESOURCE_EXHAUSTED naming the key; the others and
    the next ones are answered."""
    try:
        import grpc
        from moedtest import stubs, tensor
    except ImportError as e:
        print(f"skip: the split forward cap needs python3-grpcio and grpc_tools ({e})")
        return
    protos = stubs(a.source, w)
    if not protos:
        return
    pb, pbg = protos[0], protos[1]
    ch = grpc.insecure_channel(G.addr)
    exp = pbg.ExpertsStub(ch)
    x = np.random.RandomState(4).randn(64, 128).astype(np.float32)
    req = pb.ForwardRequest(model="mixtral", layer=0, hidden=tensor(pb, x))
    codes, says = {}, ""
    # The daemon's threads while many split forwards run: bounded by the
    # pools (split forwards at most max_split_forwards, parts at most
    # PART_THREADS in cluster_int.h), not one per request.  Sampled from
    # /proc/PID/task on a thread of this test.
    task_dir = f"/proc/{G.p.pid}/task"
    idle = len(os.listdir(task_dir))
    peak, sampling = [idle], threading.Event()

    def sample():
        while not sampling.is_set():
            try:
                peak[0] = max(peak[0], len(os.listdir(task_dir)))
            except OSError:
                return
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(5):  # 32 calls at once; a round may find the pool free each time
        futs = [exp.Forward.future(req, timeout=30) for _ in range(32)]
        for f in futs:
            try:
                f.result()
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    says = e.details()
        if codes.get("RESOURCE_EXHAUSTED"):
            break
    # More rounds for the thread count, whatever the codes.
    for _ in range(3):
        for f in [exp.Forward.future(req, timeout=30) for _ in range(64)]:
            try:
                f.result()
            except grpc.RpcError:
                pass
    sampling.set()
    sampler.join()
    # + max_split_forwards (1) + the parts of one split forward to one peer
    # (2), and slack for gRPC's own threads: far below the 64 at once.
    cap = idle + 1 + 2 + 13
    check(f"G's threads stay bounded under many split forwards ({idle} idle, peak {peak[0]}, "
          f"cap {cap})", peak[0] <= cap, f"{peak[0]} > {cap}")
    check("a split forward beyond max_split_forwards: RESOURCE_EXHAUSTED naming the key",
          codes.get("RESOURCE_EXHAUSTED", 0) > 0 and "max_split_forwards" in says and
          set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes.get("OK", 0) > 0,
          f"{codes} {says}")
    ok = all(exp.Forward(req, timeout=30).output.data for _ in range(3))
    check("  one at a time, each is answered", ok)
    ch.close()


def grpc_checks(a, w, A):
    """Peer/Ping and Peer/ForwardExperts straight to A (grpcio, stubs from
    the proto): refused without the right token, answered with it."""
    try:
        import grpc
        from moedtest import code_of, stubs, tensor
    except ImportError as e:
        print(f"skip: the direct Peer calls need python3-grpcio and grpc_tools ({e})")
        return
    protos = stubs(a.source, w)
    if not protos:
        return
    pb, pbg = protos[0], protos[1]
    ch = grpc.insecure_channel(A.addr)
    peer = pbg.PeerStub(ch)
    x = np.random.RandomState(3).randn(2, 128).astype(np.float32)
    fe = pb.ForwardExpertsRequest(model="mixtral", layer=0, hidden=tensor(pb, x), top_k=2,
                                  expert_ids=[0, 1, 2, -1], weights=[0.5, 0.5, 1.0, 0.0],
                                  **{"from": "intruder"})
    for label, md in (("no token", None), ("wrong token", [("authorization", "Bearer wrong")])):
        code, det = code_of(lambda: peer.Ping(pb.PingRequest(**{"from": "X"}), timeout=10,
                                              metadata=md))
        check(f"Peer/Ping with {label}: UNAUTHENTICATED",
              code == grpc.StatusCode.UNAUTHENTICATED, f"{code} {det}")
        code, det = code_of(lambda: peer.ForwardExperts(fe, timeout=10, metadata=md))
        check(f"Peer/ForwardExperts with {label}: UNAUTHENTICATED",
              code == grpc.StatusCode.UNAUTHENTICATED, f"{code} {det}")
    good = [("authorization", f"Bearer {TOKEN}")]
    code, det = code_of(lambda: peer.Ping(pb.PingRequest(**{"from": "X"}), timeout=10,
                                          metadata=good))
    check("Peer/Ping with the token: OK", code == grpc.StatusCode.OK, f"{code} {det}")
    code, det = code_of(lambda: peer.ForwardExperts(fe, timeout=10, metadata=good))
    check("Peer/ForwardExperts with the token: OK", code == grpc.StatusCode.OK, f"{code} {det}")
    # bf16 rows, bf16 answer: the f32 answer within bf16 rounding.
    y32 = peer.ForwardExperts(fe, timeout=10, metadata=good).output
    fb = pb.ForwardExpertsRequest()
    fb.CopyFrom(fe)
    fb.hidden.CopyFrom(tensor(pb, x, "bf16"))
    fb.output_dtype = pb.DTYPE_BF16
    y16 = peer.ForwardExperts(fb, timeout=10, metadata=good).output
    a32 = np.frombuffer(y32.data, "<f4").reshape(2, 128)
    a16 = (np.frombuffer(y16.data, "<u2").astype(np.uint32) << 16).view("<f4").reshape(2, 128)
    err = float(np.abs(a16 - a32).max())
    check("Peer/ForwardExperts in bf16 both ways: the f32 answer within bf16 rounding",
          y16.dtype == pb.DTYPE_BF16 and len(y16.data) == 2 * 128 * 2 and
          err <= 2e-2 * float(np.abs(a32).max()), f"dtype {y16.dtype}, max diff {err}")

    # Bad requests from a peer: each refused with what is wrong; A goes on.
    INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    nan = x.copy()
    nan[1, 3] = np.nan

    def fe_with(**kw):
        f = dict(model="mixtral", layer=0, hidden=tensor(pb, x), top_k=2,
                 expert_ids=[0, 1, 2, -1], weights=[0.5, 0.5, 1.0, 0.0])
        f.update(kw)
        return pb.ForwardExpertsRequest(**f)
    bad = [
        ("an unknown model", fe_with(model="nosuch"), NF, "nosuch"),
        ("a layer that is not there", fe_with(layer=99), INV, "no MoE layer 99"),
        ("rows of the wrong width", fe_with(hidden=tensor(pb, x[:, :64].copy())), INV, "128"),
        ("f16 rows", fe_with(hidden=tensor(pb, x, "f16")), INV, "float32 or bfloat16"),
        ("an f16 answer", fe_with(output_dtype=pb.DTYPE_F16), INV, "output_dtype"),
        ("another top_k", fe_with(top_k=3), INV, "top_k"),
        ("too few ids", fe_with(expert_ids=[0, 1, 2]), INV, "ids"),
        ("an expert out of range", fe_with(expert_ids=[0, 99, 2, -1]), INV, "out of range"),
        ("an expert twice in a row", fe_with(expert_ids=[4, 4, 2, -1]), INV, "twice"),
        ("a NaN", fe_with(hidden=tensor(pb, nan)), INV, "not finite"),
    ]
    for label, req, want, says in bad:
        code, det = code_of(lambda: peer.ForwardExperts(req, timeout=10, metadata=good))
        check(f"Peer/ForwardExperts with {label}: {want.name}", code == want and says in det,
              f"{code} {det}")
    # NCCL: NcclConnect and ForwardExperts over NCCL, refused with what is
    # wrong; where A cannot use NCCL (no GPU, or built without it) a good
    # request is refused too, saying why.
    FP = grpc.StatusCode.FAILED_PRECONDITION
    a_nccl = peer.Ping(pb.PingRequest(**{"from": "X"}), timeout=10, metadata=good).nccl
    print(f"A's NCCL: {a_nccl or '(none)'}")
    nc = [
        ("an id of 5 bytes", dict(unique_id=b"12345", generation=1, **{"from": "B"}), INV,
         "128 bytes"),
        ("generation 0", dict(unique_id=bytes(128), generation=0, **{"from": "B"}), INV,
         "generation"),
        ("a stranger", dict(unique_id=bytes(128), generation=1, **{"from": "intruder"}), FP,
         "no peer called 'intruder'"),
    ]
    if not a_nccl:
        nc.append(("no NCCL at A", dict(unique_id=bytes(128), generation=1, **{"from": "B"}),
                   FP, "cannot use NCCL"))
    for label, kw, want, says in nc:
        code, det = code_of(lambda: peer.NcclConnect(pb.NcclConnectRequest(**kw), timeout=10,
                                                     metadata=good))
        check(f"Peer/NcclConnect with {label}: {want.name}", code == want and says in det,
              f"{code} {det}")
    code, det = code_of(lambda: peer.NcclConnect(pb.NcclConnectRequest(
        unique_id=bytes(128), generation=1, **{"from": "B"}), timeout=10))
    check("Peer/NcclConnect without the token: UNAUTHENTICATED",
          code == grpc.StatusCode.UNAUTHENTICATED, f"{code} {det}")
    shape_only = pb.Tensor(shape=[2, 128], dtype=pb.DTYPE_F32)
    for label, req, want, says in (
            ("nccl_seq without a generation", fe_with(nccl_seq=1, **{"from": "B"}), INV,
             "both or neither"),
            ("NCCL and data too", fe_with(nccl_seq=1, nccl_generation=1, **{"from": "B"}), INV,
             "no data"),
            ("NCCL from a stranger", fe_with(hidden=shape_only, nccl_seq=1, nccl_generation=1,
                                             **{"from": "intruder"}), FP, "not a peer"),
            ("NCCL without a communicator",
             fe_with(hidden=shape_only, nccl_seq=1, nccl_generation=77, **{"from": "B"}), FP,
             "NCCL")):
        code, det = code_of(lambda: peer.ForwardExperts(req, timeout=10, metadata=good))
        check(f"Peer/ForwardExperts with {label}: {want.name}", code == want and says in det,
              f"{code} {det}")
    ctl = pbg.ControlStub(ch)
    for label, fn, want, says in (
            ("AddPeer with a space in the name",
             lambda: ctl.AddPeer(pb.AddPeerRequest(name="x y", address="127.0.0.1:1"),
                                 timeout=10, metadata=good), INV, "HOST:PORT"),
            ("AddPeer without a port",
             lambda: ctl.AddPeer(pb.AddPeerRequest(name="x", address="127.0.0.1"),
                                 timeout=10, metadata=good), INV, "HOST:PORT"),
            ("AddPeer of the node itself",
             lambda: ctl.AddPeer(pb.AddPeerRequest(name="A", address="127.0.0.1:1"),
                                 timeout=10, metadata=good), INV, "own name"),
            ("RemovePeer of a stranger",
             lambda: ctl.RemovePeer(pb.RemovePeerRequest(name="nobody"), timeout=10,
                                    metadata=good), NF, "nobody"),
            ("Placement of an unknown model",
             lambda: ctl.Placement(pb.PlacementRequest(model="nosuch"), timeout=10), NF,
             "nosuch")):
        code, det = code_of(fn)
        check(f"{label}: {want.name}", code == want and says in det, f"{code} {det}")
    code, det = code_of(lambda: peer.ForwardExperts(fe, timeout=10, metadata=good))
    check("A still serves Peer/ForwardExperts after the bad ones", code == grpc.StatusCode.OK,
          f"{code} {det}")
    ch.close()


if __name__ == "__main__":
    sys.exit(main())
