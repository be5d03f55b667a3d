#!/usr/bin/python3
"""moed's state directory end to end: live routing recording (Control
RecordRouting through `moectl record`) and the warm start.

Checks:
- record: refused without a state directory, with a bad name, twice, when
  stopped while not recording, over an existing file; a recording of forwards
  through moed holds one record per token per MoE layer forwarded, and
  `moectl cache-sim` replays it; status while recording;
- warm start: at stop moed saves each model's heat (STATE/heat/NAME.heat,
  only experts used, on the forwarded layers); at the next start, with a
  cache smaller than the model, it pages the hottest in before any request
  (`moectl stats`: "warm start host: N experts paged in"), and the same
  forwards then miss less than they did cold, with warm hits counted; with
  warm_start false nothing is paged in; a damaged heat file is reported in
  the log and ignored, and moed serves.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

try:
    import numpy as np
    from moedtest import Daemon, check, finish
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy and python3-grpcio)")
    sys.exit(77)


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def stats(m, d):
    """(misses, warm loads, warm hits) of the host tier from `moectl stats`."""
    p = run([m, "stats"] + d.addr)
    out = p.stdout
    host = re.search(r"^host\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(\d+)\s+(\d+)", out, re.M)
    warm = re.search(r"warm start host: (\d+) experts paged in at start, (\d+) of them used", out)
    misses = None
    if host:
        misses = int(host.group(2))
    return misses, (int(warm.group(1)) if warm else 0), (int(warm.group(2)) if warm else 0), out


def forward_all(m, d, w, layers):
    for layer in layers:
        p = run([m, "forward", "--model", "mix", "--layer", str(layer), "--in", f"{w}/x.npy",
                 "--out", f"{w}/y{layer}.npy"] + d.addr)
        if p.returncode != 0:
            return p
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    m, w = a.moectl, a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    model = f"{w}/model"
    p = run([m, "gen-model", "--arch", "mixtral", "--layers", "4", "--experts", "8",
             "--hidden", "256", "--ffn", "384", "--out", model, "-q"])
    if p.returncode != 0:
        print(p.stderr)
        return 1
    # expert: 3 x 256 x 384 bf16 = 576 KiB; 32 experts (18 MiB); the cache
    # holds 12 of them.
    rng = np.random.default_rng(3)
    T = 6
    np.save(f"{w}/x.npy", rng.standard_normal((T, 256)).astype(np.float32))
    state = f"{w}/state"
    base = ["--model", f"mix={model}", "--host-cache-bytes", "7M", "--threads", "1",
            "--prefetch", "false"]
    layers = [0, 1, 2]

    # ---- recording ----
    d = Daemon(a.moed, ["--model", f"mix={model}", "--threads", "1"], w, "nostate")
    try:
        p = run([m, "record", "mix", "start"] + d.addr)
        check("record without a state directory is refused, saying why",
              p.returncode != 0 and "state_dir" in p.stderr, p.stdout + p.stderr)
    finally:
        d.stop()

    d = Daemon(a.moed, base + ["--state-dir", state], w, "cold")
    try:
        p = run([m, "record", "mix"] + d.addr)
        check("record status: nothing is being recorded", p.returncode == 0
              and "not being recorded" in p.stdout, p.stdout + p.stderr)
        p = run([m, "record", "mix", "start", "--name", "../escape"] + d.addr)
        check("record: a name with a slash is refused", p.returncode != 0
              and "not a plain file name" in p.stderr, p.stdout + p.stderr)
        p = run([m, "record", "mix", "stop"] + d.addr)
        check("record stop while not recording is refused", p.returncode != 0
              and "not being recorded" in p.stderr, p.stdout + p.stderr)
        p = run([m, "record", "nosuch", "start"] + d.addr)
        check("record of an unknown model is refused", p.returncode != 0
              and "no model called 'nosuch'" in p.stderr, p.stdout + p.stderr)
        p = run([m, "record", "mix", "start", "--name", "t1.trace"] + d.addr)
        check("record start", p.returncode == 0 and f"{state}/traces/t1.trace" in p.stdout,
              p.stdout + p.stderr)
        p = run([m, "record", "mix", "start", "--name", "t2.trace"] + d.addr)
        check("record start while recording is refused, naming the running one",
              p.returncode != 0 and "t1.trace" in p.stderr, p.stdout + p.stderr)
        bad = forward_all(m, d, w, layers)
        check("forwards through moed", bad is None, bad and bad.stderr)
        misses_cold, wl, _, out = stats(m, d)
        check("a cold start pages nothing in by itself", wl == 0 and misses_cold, out)
        p = run([m, "record", "mix", "status"] + d.addr)
        check("record status while recording", p.returncode == 0
              and f"{T * len(layers)} records" in p.stdout, p.stdout + p.stderr)
        p = run([m, "record", "mix", "stop"] + d.addr)
        check("record stop: one record per token per layer forwarded",
              p.returncode == 0 and f"{T * len(layers)} records" in p.stdout, p.stdout + p.stderr)
        trace = f"{state}/traces/t1.trace"
        p = run([m, "cache-sim", "--trace", trace, "--capacity", "8"])
        check("cache-sim replays the recording", p.returncode == 0
              and re.search(rf"{T * len(layers)}\b", p.stdout) is not None,
              p.stdout + p.stderr)
        p = run([m, "record", "mix", "start", "--name", "t1.trace"] + d.addr)
        check("record over an existing trace is refused", p.returncode != 0
              and "exists" in p.stderr, p.stdout + p.stderr)
        p = run([m, "record", "mix", "start", "--name", "t3.trace", "--max-records", "7"]
                + d.addr)
        forward_all(m, d, w, layers)
        p = run([m, "record", "mix", "stop"] + d.addr)
        check("record --max-records: whole steps up to the limit, then full",
              p.returncode == 0 and f" {T} records" in p.stdout and "full" in p.stdout,
              p.stdout + p.stderr)
        # A recording still running when moed stops is closed whole.
        run([m, "record", "mix", "start", "--name", "t4.trace"] + d.addr)
        forward_all(m, d, w, [0])
    finally:
        rc = d.stop()
    check("moed stops cleanly", rc == 0, d.text())
    p = run([m, "cache-sim", "--trace", f"{state}/traces/t4.trace", "--capacity", "8"])
    check("a recording running at stop is closed whole", p.returncode == 0, p.stdout + p.stderr)

    heat = f"{state}/heat/mix.heat"
    check("heat saved at stop", os.path.exists(heat), d.text())
    hl = set()
    if os.path.exists(heat):
        lines = open(heat).read().splitlines()
        check("heat file header", "moed-heat 1 4 8" in lines, lines[:3])
        for ln in lines:
            f = ln.split()
            if len(f) == 3 and not ln.startswith(("#", "moed-heat")):
                hl.add(int(f[0]))
        check("heat only on the layers forwarded", hl == set(layers), hl)

    # ---- warm start ----
    d = Daemon(a.moed, base + ["--state-dir", state], w, "warm")
    try:
        time.sleep(0.5)
        log = d.text()
        mm = re.search(r"warm start of mix: paging in the (\d+) experts", log)
        check("warm start logged", mm is not None, log)
        _, wl, wh, out = stats(m, d)
        check("warm start pages experts in before any request", 0 < wl <= 12, out)
        bad = forward_all(m, d, w, layers)
        check("forwards after a warm start", bad is None, bad and bad.stderr)
        misses_warm, wl, wh, out = stats(m, d)
        check("a warm start misses less than a cold one",
              misses_warm is not None and misses_cold is not None and misses_warm < misses_cold,
              f"cold {misses_cold}, warm {misses_warm}\n{out}")
        check("warm hits counted", wh > 0, out)
    finally:
        d.stop()

    d = Daemon(a.moed, base + ["--state-dir", state, "--warm-start", "false"], w, "nowarm")
    try:
        _, wl, _, out = stats(m, d)
        check("warm_start false pages nothing in", wl == 0, out)
    finally:
        d.stop()

    # Prefetch precision and wasted bytes in stats and top (prefetch on,
    # a cache of 12 experts; the layers in order, a few times).
    d = Daemon(a.moed, ["--model", f"mix={model}", "--host-cache-bytes", "7M", "--threads", "1"],
               w, "prefetch")
    try:
        for _ in range(3):
            forward_all(m, d, w, [0, 1, 2, 3])
        p = run([m, "stats"] + d.addr)
        mm = re.search(r"prefetch host: precision (\S+) \((\d+) used, (\d+) wasted of (\d+)\), "
                       r"(.+) prefetched, (.+) wasted", p.stdout)
        check("stats: prefetch precision, used, wasted and bytes per tier", mm is not None
              and int(mm.group(4)) > 0, p.stdout)
        p = run([m, "top", "--iterations", "2", "--interval", "0.2", "--json"] + d.addr)
        import json
        frames = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
        tiers = frames[-1]["tiers"] if frames else []
        check("top --json: prefetch_precision, prefetched and wasted bytes per second per tier",
              bool(tiers) and all(k in tiers[0] for k in
                                  ("prefetch_precision", "prefetched_bytes_per_s",
                                   "wasted_bytes_per_s", "warm_hits")), p.stdout + p.stderr)
    finally:
        d.stop()

    with open(heat, "w") as f:
        f.write("moed-heat 1 4 8\n0 0 nan\n")
    d = Daemon(a.moed, base + ["--state-dir", state], w, "badheat")
    try:
        bad = forward_all(m, d, w, [0])
        log = d.text()
        check("a damaged heat file is reported, naming the line, and ignored",
              re.search(r"warm start of mix skipped: .*mix\.heat:2:", log) is not None, log)
        check("moed serves after a damaged heat file", bad is None, bad and bad.stderr)
    finally:
        d.stop()

    return finish()


if __name__ == "__main__":
    sys.exit(main())
