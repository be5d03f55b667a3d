#!/usr/bin/python3
"""moed's Prometheus endpoint (--metrics HOST:PORT), read by the real parser:
Debian's python3-prometheus-client (text_string_to_metric_families), with
Forward calls from python3-grpcio through stubs generated from proto/moe.proto
by grpc_tools.

Checks: the port is printed after the gRPC one; GET /metrics is 200 with the
0.0.4 content type, every family parses and follows the naming conventions
(moed_ prefix, counters end in _total, units in the names, HELP on each);
after some Forward calls (and bad ones) requests, tokens, errors by code,
latency and batch histograms, cache hits and misses per tier and per layer,
page-in bytes and the page-in histogram moved by exactly what the answers
say; label values are escaped; other paths get 404; without --metrics
nothing else listens.

Exit 0 pass, 1 fail, 77 skip (grpcio, numpy or prometheus_client missing).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

try:
    import numpy as np
    import grpc
    from prometheus_client.parser import text_string_to_metric_families
    from moedtest import Daemon, check, finish, stubs, tensor
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy, python3-grpcio, "
          f"python3-grpc-tools, python3-prometheus-client)")
    sys.exit(77)


def listening_tcp_ports(pid):
    """The TCP ports pid listens on, from /proc (no ss or netstat needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].split(":")[1], 16))
    return ports


def http(port, path, method="GET"):
    """(status, content type, body) of one request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


class Scrape:
    """One scrape, parsed: value(sample name, **labels), or 0 when absent."""

    def __init__(self, port):
        self.status, self.ctype, self.text = http(port, "/metrics")
        self.families = list(text_string_to_metric_families(self.text))
        self.samples = {}
        for f in self.families:
            for s in f.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name, **labels):
        return self.samples.get((name, tuple(sorted(labels.items()))), 0)

    def matching(self, name, **labels):
        """Samples of name whose labels include labels: {labels: value}."""
        out = {}
        for (n, ls), v in self.samples.items():
            d = dict(ls)
            if n == name and all(d.get(k) == x for k, x in labels.items()):
                out[ls] = v
        return out


def check_conventions(s):
    """Names and types as Prometheus wants them, on the raw text and parsed."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", s.text, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", s.text, re.M))
    bad = [n for n in types if not n.startswith("moed_")]
    check("every name has the moed_ prefix", not bad, bad)
    bad = [n for n in types if n not in helps or not helps[n].strip()]
    check("every family has HELP", not bad, bad)
    bad = [n for n, t in types.items() if (t == "counter") != n.endswith("_total")]
    check("counters, and only counters, end in _total", not bad, bad)
    bad = [n for n in types if re.search(r"(duration|latency|uptime|time)", n)
           and not re.search(r"_seconds(_total)?$", n)]
    check("times are in seconds", not bad, bad)
    bad = [n for n in types if "bytes" in n and not re.search(r"_bytes(_total)?$", n)]
    check("sizes are in bytes", not bad, bad)
    bad = [n for n in types if re.search(r"(_ms|_us|_ns|milli|micro|nano)", n)]
    check("no scaled units", not bad, bad)
    parsed = {f.name: f.type for f in s.families}
    # the parser drops _total from counter family names
    bad = [n for n, t in types.items()
           if parsed.get(n[:-6] if t == "counter" else n) != t]
    check("every family parses with its type", not bad, (bad, parsed))
    for f in s.families:
        if f.type != "histogram":
            continue
        for key in {tuple(sorted((k, v) for k, v in x.labels.items() if k != "le"))
                    for x in f.samples}:
            lab = dict(key)
            buckets = [(x.labels["le"], x.value) for x in f.samples
                       if x.name == f.name + "_bucket"
                       and all(x.labels.get(k) == v for k, v in lab.items())]
            count = s.value(f.name + "_count", **lab)
            les = [float(le) for le, _ in buckets]
            vals = [v for _, v in buckets]
            ok = (buckets and buckets[-1][0] == "+Inf" and les == sorted(les)
                  and vals == sorted(vals) and vals[-1] == count)
            check(f"histogram {f.name}{lab} is cumulative, ends in +Inf = _count", ok, buckets)


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
    pb, pbg = protos[0], protos[1]

    model = f"{w}/mix"
    subprocess.run([a.moectl, "gen-model", "--arch", "mixtral", "--layers", "3", "--experts",
                    "8", "--hidden", "128", "--ffn", "96", "--out", model, "-q"], check=True)

    # without --metrics: the gRPC port is all that listens
    d = Daemon(a.moed, ["--model", f"mix={model}"], w, "plain", metrics=False)
    try:
        ports = listening_tcp_ports(d.p.pid)
        check("without --metrics only gRPC listens", ports == {d.port}, ports)
    finally:
        check("plain moed exits 0 on SIGTERM", d.stop() == 0)

    # prefetch off: every page-in is a miss of some answer, so the counts are exact
    d = Daemon(a.moed, ["--model", f"mix={model}", "--prefetch", "false"], w, "moed",
               metrics=True)
    try:
        ports = listening_tcp_ports(d.p.pid)
        check("gRPC and metrics listen", ports == {d.port, d.metrics_port}, ports)
        s0 = Scrape(d.metrics_port)
        check("GET /metrics is 200", s0.status == 200, s0.status)
        check("content type text/plain; version=0.0.4",
              s0.ctype and s0.ctype.startswith("text/plain; version=0.0.4"), s0.ctype)
        check_conventions(s0)
        want = ["moed_requests", "moed_tokens", "moed_request_errors",
                "moed_request_duration_seconds", "moed_batch_size", "moed_batch_tokens",
                "moed_cache_hits", "moed_cache_misses", "moed_cache_prefetch_hits",
                "moed_cache_wasted_prefetches", "moed_cache_evictions",
                "moed_cache_prefetched_bytes", "moed_cache_wasted_bytes",
                "moed_cache_warm_loads", "moed_cache_warm_hits",
                "moed_cache_layer_hits", "moed_cache_layer_misses",
                "moed_cache_layer_prefetch_hits", "moed_cache_layer_wasted_prefetches",
                "moed_cache_layer_evictions", "moed_cache_resident_bytes",
                "moed_cache_capacity_bytes", "moed_cache_resident_experts", "moed_page_in_bytes",
                "moed_page_in_duration_seconds", "moed_page_in_errors", "moed_bad_experts",
                "moed_models", "moed_in_flight_requests", "moed_connected_clients",
                "moed_uptime_seconds", "moed_info",
                # the cluster's: zero on a node without peers
                "moed_cluster_forwards", "moed_cluster_remote_calls", "moed_cluster_failovers",
                "moed_cluster_failovers_local", "moed_cluster_tokens_remote",
                "moed_cluster_tokens_split", "moed_cluster_sent_bytes",
                "moed_cluster_received_bytes", "moed_cluster_served_calls",
                "moed_cluster_nccl_fallbacks", "moed_cluster_strays_evicted",
                "moed_cluster_placement_version"]
        have = {f.name for f in s0.families}
        check("every family is there", not set(want) - have, sorted(set(want) - have))
        check("moed_info has the version", s0.matching("moed_info") and
              all(dict(k).get("version") for k in s0.matching("moed_info")))
        check("moed_models 1", s0.value("moed_models") == 1, s0.value("moed_models"))
        check("a node without peers: cluster counters 0, no peer series",
              s0.value("moed_cluster_remote_calls_total") == 0 and
              not s0.matching("moed_peer_up"), s0.matching("moed_peer_up"))
        check("the loaded model shows before any request",
              ("moed_requests_total", (("model", "mix"), ("transport", "grpc"))) in s0.samples)

        ctl = pbg.ControlStub(d.channel)
        exp = pbg.ExpertsStub(d.channel)
        mix = [x for x in ctl.ListModels(pb.ListModelsRequest()).models if x.name == "mix"][0]
        rng = np.random.default_rng(7)
        sizes = [(0, 1), (1, 3), (2, 5), (0, 7), (1, 2), (2, 4)]
        hits = misses = 0
        for layer, t in sizes:
            resp = exp.Forward(pb.ForwardRequest(
                model="mix", layer=layer,
                hidden=tensor(pb, rng.standard_normal((t, 128)).astype("f4"))))
            hits += resp.cache_hits
            misses += resp.cache_misses
        codes = []
        for q in (pb.ForwardRequest(model="mix", layer=9,
                                    hidden=tensor(pb, np.zeros((1, 128), "f4"))),
                  pb.ForwardRequest(model="nope", layer=0,
                                    hidden=tensor(pb, np.zeros((1, 128), "f4")))):
            try:
                exp.Forward(q)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        check("the bad requests fail",
              codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND], codes)

        s1 = Scrape(d.metrics_port)
        check("second scrape 200", s1.status == 200, s1.status)
        check_conventions(s1)
        mg = {"model": "mix", "transport": "grpc"}
        ug = {"model": "", "transport": "grpc"}

        def delta(name, **labels):
            return s1.value(name, **labels) - s0.value(name, **labels)

        n_ok, n_tok = len(sizes), sum(t for _, t in sizes)
        check("requests_total counts every answer of mix",
              delta("moed_requests_total", **mg) == n_ok + 1, delta("moed_requests_total", **mg))
        check("tokens_total counts the tokens answered",
              delta("moed_tokens_total", **mg) == n_tok, delta("moed_tokens_total", **mg))
        check("errors_total INVALID_ARGUMENT for the bad layer",
              delta("moed_request_errors_total", code="INVALID_ARGUMENT", **mg) == 1,
              s1.matching("moed_request_errors_total"))
        check("an unknown model counts under model=\"\"",
              delta("moed_requests_total", **ug) == 1 and
              delta("moed_request_errors_total", code="NOT_FOUND", **ug) == 1,
              s1.matching("moed_request_errors_total"))
        check("no other error",
              sum(s1.matching("moed_request_errors_total").values()) == 2,
              s1.matching("moed_request_errors_total"))
        check("duration histogram counts every answer",
              delta("moed_request_duration_seconds_count", **mg) == n_ok + 1
              and delta("moed_request_duration_seconds_sum", **mg) > 0,
              s1.matching("moed_request_duration_seconds_count"))
        check("batch histograms: one batch of one per good request",
              delta("moed_batch_size_count") == n_ok and delta("moed_batch_size_sum") == n_ok
              and delta("moed_batch_size_bucket", le="1") == n_ok
              and delta("moed_batch_tokens_sum") == n_tok,
              (s1.matching("moed_batch_size_count"), s1.matching("moed_batch_tokens_sum")))
        host = {"tier": "host"}
        dh, dm = delta("moed_cache_hits_total", **host), delta("moed_cache_misses_total", **host)
        check("cache hits and misses per tier equal the answers'",
              dh == hits and dm == misses and hits + misses > 0, (dh, dm, hits, misses))
        lh = sum(s1.matching("moed_cache_layer_hits_total", model="mix").values())
        lm = sum(s1.matching("moed_cache_layer_misses_total", model="mix").values())
        layers = sorted(dict(k)["layer"] for k in
                        s1.matching("moed_cache_layer_hits_total", model="mix"))
        check("per-layer hits and misses add up to the tier's",
              (lh, lm) == (hits, misses) and layers == ["0", "1", "2"], (lh, lm, layers))
        # a checkpoint's expert is read by aligned spans: a little more than expert_bytes
        paged = delta("moed_page_in_bytes_total", **host)
        tier = [t for t in ctl.Stats(pb.StatsRequest()).tiers if t.name == "host"][0]
        check("page-in bytes: one expert per miss, as Control/Stats says",
              misses and paged % misses == 0
              and mix.expert_bytes <= paged // misses < mix.expert_bytes + 16384
              and paged == tier.counters.bytes_paged,
              (paged, misses, mix.expert_bytes, tier.counters.bytes_paged))
        check("page-in histogram: one per miss",
              delta("moed_page_in_duration_seconds_count", **host) == misses
              and delta("moed_page_in_duration_seconds_sum", **host) > 0,
              s1.matching("moed_page_in_duration_seconds_count"))
        check("resident experts and bytes",
              s1.value("moed_cache_resident_experts", **host) == misses
              and s1.value("moed_cache_resident_bytes", **host) == paged,
              (s1.value("moed_cache_resident_experts", **host),
               s1.value("moed_cache_resident_bytes", **host)))
        check("capacity is the whole model",
              s1.value("moed_cache_capacity_bytes", **host) >= 24 * mix.expert_bytes,
              s1.value("moed_cache_capacity_bytes", **host))
        check("no page-in errors, no bad experts",
              s1.value("moed_page_in_errors_total", **host) == 0
              and s1.value("moed_bad_experts", model="mix") == 0)
        # both gauges drop just after the answer is sent: give them a moment
        for _ in range(50):
            s = Scrape(d.metrics_port)
            idle = (s.value("moed_in_flight_requests"), s.value("moed_connected_clients"))
            if idle == (0, 0):
                break
            time.sleep(0.02)
        check("nothing in flight", idle == (0, 0), idle)
        check("uptime goes on",
              s1.value("moed_uptime_seconds") > s0.value("moed_uptime_seconds") > 0)

        # label values are escaped: a model named with a quote, a backslash, a newline
        odd = 'q"x\\y\nz'
        ctl.LoadModel(pb.LoadModelRequest(dir=model, name=odd))
        exp.Forward(pb.ForwardRequest(model=odd, layer=0,
                                      hidden=tensor(pb, np.ones((2, 128), "f4"))))
        s2 = Scrape(d.metrics_port)
        check("odd model name escaped and parsed back",
              s2.value("moed_tokens_total", model=odd, transport="grpc") == 2
              and s2.value("moed_models") == 2
              and s2.value("moed_bad_experts", model=odd) == 0,
              s2.matching("moed_tokens_total"))
        check("escapes in the text", 'model="q\\"x\\\\y\\nz"' in s2.text)

        st, _, body = http(d.metrics_port, "/healthz")
        st2, _, body2 = http(d.metrics_port, "/readyz")
        check("/healthz and /readyz while serving", st == 200 and st2 == 200, (st, body, st2))
        ctl.Drain(pb.DrainRequest(timeout_ms=5000))
        st, _, body = http(d.metrics_port, "/healthz")
        st2, _, body2 = http(d.metrics_port, "/readyz")
        check("draining: /healthz 200, /readyz 503 saying why", st == 200 and st2 == 503
              and "draining" in body2, (st, body, st2, body2))
        ctl.Drain(pb.DrainRequest(resume=True))
        st2, _, _ = http(d.metrics_port, "/readyz")
        check("resumed: /readyz 200", st2 == 200, st2)
        st, _, _ = http(d.metrics_port, "/")
        check("GET / is 404", st == 404, st)
        st, _, _ = http(d.metrics_port, "/metrics/x")
        check("GET /metrics/x is 404", st == 404, st)
        st, _, _ = http(d.metrics_port, "/metrics", "POST")
        check("POST /metrics is refused", st == 405, st)
    finally:
        rc = d.stop()
        check("moed exits 0 on SIGTERM", rc == 0, rc)
        d.log.seek(0)
        log = d.log.read()
        check("no sanitizer report", "Sanitizer" not in log and "runtime error" not in log, log)

    # a bad address is refused at start
    p = subprocess.run([a.moed, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1",
                        "--model", f"mix={model}"], capture_output=True, text=True, timeout=30)
    check("--metrics without a port refused", p.returncode != 0 and "HOST:PORT" in p.stderr,
          p.stderr)

    return finish()

if __name__ == "__main__":
    sys.exit(main())
