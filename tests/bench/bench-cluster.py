#!/usr/bin/python3
"""bench-cluster: forward throughput and latency of 1, 2 and 3 moed nodes on
loopback serving a model whose experts do not fit one node's cache, next to
one node holding the whole model in its own cache (the limit, measured in
the same run), and the bytes sent between nodes per token next to the
minimum (only the token rows routed to remote experts, there and back).

The model: Mixtral-shaped, hidden 1024, 8 experts of ffn 2048 in 4 MoE
layers, bf16, as a packed store (384 MiB of experts).  Every node of the
cluster runs gets --host-cache-bytes 40% of the experts: one node alone must
page, two nodes nearly hold their shares, three hold everything.  Load:
`moectl bench --json` with 8 tokens a request and 4 callers in all, spread
over the nodes (one bench process per node, summed).  A last row runs the
three nodes with --replicas 0 (each node holds only the experts it owns),
another with --peer-bf16 (rows and partial outputs in bf16 between nodes).

--quick: 1 and 2 nodes, 1 s each (ctest's bench-cluster-quick).
Exit 0, 1 on failure, 77 when a daemon or moectl is missing.
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
import time

HIDDEN, FFN, EXPERTS, LAYERS, TOKENS, CALLERS = 1024, 2048, 8, 4, 8, 4
CACHE_SHARE = 0.40
TIMING = ["--ping-interval-ms", "200"]  # the rest as configured by default


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Node:
    def __init__(self, moed, name, port, peers, model, cache, workdir, extra=()):
        """extra: more arguments for moed."""
        self.name, self.addr = name, f"127.0.0.1:{port}"
        self.log = open(f"{workdir}/{name}.log", "a+")
        args = [moed, "--listen", self.addr, "--node-name", name, "--model", f"m={model}",
                "--log-level", "warn"] + TIMING + list(extra)
        if cache:
            args += ["--host-cache-bytes", str(cache)]
        for pn, pp in peers:
            args += ["--peer", f"{pn} 127.0.0.1:{pp}"]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.p.stdout.readline()
        if not re.search(r"listening on port", line):
            self.p.kill()
            self.log.seek(0)
            raise RuntimeError(f"moed {name} did not start: {self.log.read()[-2000:]}")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", default="bench-cluster")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=float, default=0, help="seconds a run (default 6, 1 quick)")
    ap.add_argument("--only", type=int, default=0, help="only the limit and the runs of N nodes")
    ap.add_argument("--moed-arg", action="append", default=[],
                    help="one more argument for every moed (repeatable)")
    a = ap.parse_args()
    for f in (a.moed, a.moectl):
        if not os.access(f, os.X_OK):
            print(f"SKIP: {f} is not there")
            return 77
    m, w = a.moectl, a.workdir
    dur = a.duration or (1.0 if a.quick else 6.0)
    warm = 1.0 if a.quick else 2.0
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    t_start = time.time()

    def ctl_json(addr, *args):
        r = subprocess.run([m] + list(args) + ["--remote", addr, "--json"], capture_output=True,
                           text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"moectl {args[0]}: {r.stderr}")
        return json.loads(r.stdout)

    ck, pk = f"{w}/checkpoint", f"{w}/model"
    for cmd in ([m, "gen-model", "--arch", "mixtral", "--out", ck, "--layers", str(LAYERS),
                 "--experts", str(EXPERTS), "--top-k", "2", "--hidden", str(HIDDEN), "--ffn",
                 str(FFN), "--dtype", "bf16", "-q"],
                [m, "pack", "--model", ck, "--out", pk, "-q"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode:
            print(f"bench-cluster: {' '.join(cmd[:2])}: {r.stderr}")
            return 1
    shutil.rmtree(ck, ignore_errors=True)
    expert_bytes = 3 * HIDDEN * FFN * 2
    all_bytes = LAYERS * EXPERTS * expert_bytes
    cache = int(CACHE_SHARE * all_bytes)

    def bench(nodes, seconds, seed):
        """One bench process per node, CALLERS spread over them; the sum."""
        n = len(nodes)
        callers = [CALLERS // n + (i < CALLERS % n) for i in range(n)]
        procs = [subprocess.Popen([m, "bench", "--remote", nd.addr, "--model", "m", "--tokens",
                                   str(TOKENS), "--callers", str(c), "--duration", str(seconds),
                                   "--seed", str(seed + i), "-q", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i, (nd, c) in enumerate(zip(nodes, callers)) if c > 0]
        res = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            if p.returncode:
                raise RuntimeError(f"moectl bench: {err[-1000:]}")
            res.append(json.loads(out))
        return res

    def counters(nodes):
        tot = {}
        for nd in nodes:
            for k, v in ctl_json(nd.addr, "stats").get("cluster", {}).items():
                tot[k] = tot.get(k, 0) + int(v)
        return tot

    def wait_up(nodes):
        t0 = time.time()
        while time.time() - t0 < 15:
            if all(all(p["state"] == "up" for p in ctl_json(nd.addr, "status").get("peers", []))
                   for nd in nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the nodes did not see each other up within 15 s")

    configs = [("1 node, all cached (limit)", 1, 0, []), ("1 node, 40% cache", 1, cache, []),
               ("2 nodes, 40% cache each", 2, cache, [])]
    if not a.quick:
        configs.append(("3 nodes, 40% cache each", 3, cache, []))
        # hot-expert replicas off: every node holds only what it owns
        configs.append(("3 nodes, 40%, --replicas 0", 3, cache, ["--replicas", "0"]))
        # activations and partial outputs in bf16 between nodes
        configs.append(("3 nodes, 40%, --peer-bf16", 3, cache, ["--peer-bf16", "true"]))
    if a.only:
        configs = [c for c in configs if c[2] == 0 or c[1] == a.only]
    print(f"bench-cluster: Mixtral-shaped, hidden {HIDDEN}, {EXPERTS} experts of ffn {FFN} in "
          f"{LAYERS} MoE layers, bf16, packed: {all_bytes / 2**20:.0f} MiB of experts; "
          f"{TOKENS} tokens a request, {CALLERS} callers spread over the nodes, {dur:g} s a run; "
          f"{os.cpu_count()} CPUs shared by all nodes")
    print(f"{'configuration':28s} {'req/s':>8s} {'tokens/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'ratio':>6s} {'hit rate':>8s} {'remote':>7s} {'B/token':>8s} {'min B/tok':>9s} "
          f"{'ratio':>6s}")
    limit = None
    rows = []
    for label, n, cache_bytes, extra in configs:
        names = ["A", "B", "C"][:n]
        ports = free_ports(n)
        nodes = []
        try:
            for i, name in enumerate(names):
                peers = [(names[j], ports[j]) for j in range(n) if j != i]
                nodes.append(Node(a.moed, name, ports[i], peers, pk, cache_bytes, w,
                                  extra + a.moed_arg))
            if n > 1:
                wait_up(nodes)
            bench(nodes, warm, 100)  # experts paged in, channels up, replicas chosen
            c0 = counters(nodes)
            res = bench(nodes, dur, 200)
            c1 = counters(nodes)
        finally:
            for nd in nodes:
                nd.stop()
        rps = sum(r["requests_per_s"] for r in res)
        tps = sum(r["tokens_per_s"] for r in res)
        toks = sum(r["tokens"] for r in res)
        errors = sum(r["errors"] for r in res)
        p50 = max(r["latency_ms"]["p50"] for r in res)
        p99 = max(r["latency_ms"]["p99"] for r in res)
        hits = sum(r["cache"]["hits"] for r in res)
        misses = sum(r["cache"]["misses"] for r in res)
        if limit is None:
            limit = tps
        d = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        moved = d.get("bytes_sent", 0) + d.get("bytes_received", 0)
        remote_rows = d.get("tokens_remote", 0)
        tok_split = d.get("tokens_total", 0)
        # the rows there and back at the wire's element size
        minimum = remote_rows * HIDDEN * (2 if "--peer-bf16" in extra else 4) * 2
        if n > 1 and toks:
            # the stats count every node's own calls; tokens: the bench's
            bpt, mpt = moved / toks, minimum / toks
            net = (f"{remote_rows / max(1, tok_split):7.2f} {bpt:8.0f} {mpt:9.0f} "
                   f"{bpt / mpt if mpt else 0:6.2f}")
        else:
            net = f"{'-':>7s} {'-':>8s} {'-':>9s} {'-':>6s}"
        hr = hits / (hits + misses) if hits + misses else 0
        print(f"{label:28s} {rps:8.1f} {tps:9.0f} {p50:8.2f} {p99:8.2f} {tps / limit:6.2f} "
              f"{hr:8.3f} {net}" + (f"  ({errors} errors)" if errors else ""), flush=True)
        rows.append((label, errors))
    print("ratio = tokens/s / the single node holding every expert (the limit, same run); "
          "p50/p99: the worst of the bench processes; hit rate: host tier, summed over nodes "
          "(it counts ForwardExperts too);")
    print("remote = token rows sent to other nodes per token; B/token = ForwardExperts request "
          "and answer bytes summed over nodes / tokens; min = remote rows x hidden x 4 B (2 B with "
          "--peer-bf16) x 2 "
          "directions / tokens; ratio = B/token / min")
    shutil.rmtree(pk, ignore_errors=True)
    print(f"{time.time() - t_start:.1f} s in all")
    return 1 if any(e for _, e in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
