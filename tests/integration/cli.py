#!/usr/bin/python3
"""moectl's command line: usage errors, help, and bad input from files, each
answered with a clear message and the right exit status (0 ok, 1 failed,
2 usage), never a crash.

Exit 0 pass, 1 fail, 77 skip (numpy missing).
"""
import argparse
import os
import re
import shutil
import struct
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: python3-numpy is not installed (scripts/deps.sh installs it)")
    sys.exit(77)

failures = []


def check(name, cmd, status, needle=None, stream="stderr", env=None):
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    out = p.stderr if stream == "stderr" else p.stdout
    ok = p.returncode == status and (needle is None or needle in out)
    if p.returncode < 0 or p.returncode >= 128:
        ok = False
    print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[:160]}")
    if not ok:
        failures.append(f"{name}: expected exit {status} with '{needle}' in {stream}, got "
                        f"{p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")


def gen_progress(m, w):
    """gen-model on a terminal shows its progress by bytes: one shard of a
    checkpoint moves through many byte counts while it is written (it used
    to show "1/2 files" until the whole shard was done)."""
    import pty
    mfd, sfd = pty.openpty()
    p = subprocess.Popen([m, "gen-model", "--arch", "mixtral", "--layers", "4", "--experts",
                          "8", "--hidden", "256", "--ffn", "512", "--out", f"{w}/progress"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sfd)
    os.close(sfd)
    raw = b""
    while True:
        try:
            chunk = os.read(mfd, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        raw += chunk
    os.close(mfd)
    out = p.stdout.read().decode()
    p.wait(60)
    text = raw.decode(errors="replace")
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    size = r"([\d.]+) (B|KiB|MiB|GiB|TiB)"
    steps = []
    for line in re.split(r"[\r\n]+", text):
        g = re.search(rf"(\d+)%\s+{size} of {size}, file (\d+) of (\d+)", line)
        if g:
            steps.append((int(g[1]), float(g[2]) * units[g[3]], float(g[4]) * units[g[5]],
                          int(g[6]), int(g[7])))
    shard = [s for s in steps if s[3] == 2]
    done = [s[1] for s in shard]
    ok = (p.returncode == 0 and "wrote mixtral" in out and len(shard) >= 10
          and all(b >= a for a, b in zip(done, done[1:])) and len(set(done)) >= 10
          and steps[-1][0] == 100 and steps[-1][1] == steps[-1][2] and steps[-1][3:] == (2, 2)
          and all(s[4] == 2 for s in steps) and text.endswith("\n"))
    print(f"{'ok  ' if ok else 'FAIL'} gen-model on a terminal: progress by bytes, "
          f"{len(set(done))} byte counts within the shard")
    if not ok:
        failures.append(f"gen-model progress by bytes: exit {p.returncode}, "
                        f"{len(shard)} steps in the shard: {steps[:5]} ... {steps[-3:]}; "
                        f"stderr {text[-400:]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    m = a.moectl
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)

    # usage and help
    check("no arguments", [m], 2, "usage")
    check("--help", [m, "--help"], 0, "gen-model", stream="stdout")
    check("--version", [m, "--version"], 0, "moectl", stream="stdout")
    check("unknown command", [m, "frobnicate"], 2, "unknown command 'frobnicate'")
    for sub in ("gen-model", "inspect", "forward"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "usage", stream="stdout")
    check("gen-model without --arch", [m, "gen-model", "--out", f"{w}/x"], 2, "--arch")
    check("gen-model bad arch", [m, "gen-model", "--arch", "llama", "--out", f"{w}/x"], 2,
          "expected mixtral, qwen2_moe")
    check("gen-model bad number", [m, "gen-model", "--arch", "mixtral", "--layers", "four",
                                   "--out", f"{w}/x"], 2, "--layers 'four'")
    check("gen-model negative", [m, "gen-model", "--arch", "mixtral", "--hidden", "-5",
                                 "--out", f"{w}/x"], 2, "--hidden '-5'")
    check("gen-model bad dtype", [m, "gen-model", "--arch", "mixtral", "--dtype", "f8",
                                  "--out", f"{w}/x"], 2, "--dtype 'f8'")
    check("gen-model top-k > experts", [m, "gen-model", "--arch", "mixtral", "--experts", "4",
                                        "--top-k", "6", "--out", f"{w}/x", "-q"], 1, "top")
    check("gen-model shared on mixtral", [m, "gen-model", "--arch", "mixtral",
                                          "--shared-experts", "1", "--out", f"{w}/x", "-q"], 1,
          "shared")
    check("gen-model extra argument", [m, "gen-model", "--arch", "mixtral", "--out", f"{w}/x",
                                       "stray"], 2, "unexpected argument 'stray'")

    # a good model to break
    model = f"{w}/model"
    check("gen-model", [m, "gen-model", "--arch", "deepseek_v3", "--out", model, "-q"], 0,
          "wrote deepseek_v3", stream="stdout")
    check("inspect", [m, "inspect", "--model", model], 0, "deepseek_v3", stream="stdout")
    # a non-empty --out is refused without --force, as pack refuses it
    check("gen-model into a non-empty --out refused", [m, "gen-model", "--arch", "mixtral",
                                                       "--out", model, "-q"], 1, "--force")
    check("... and the checkpoint there left as it was", [m, "inspect", "--model", model], 0,
          "deepseek_v3", stream="stdout")
    check("gen-model --force into a non-empty --out", [m, "gen-model", "--arch", "deepseek_v3",
                                                       "--out", model, "--force", "-q"], 0,
          "wrote deepseek_v3", stream="stdout")
    os.makedirs(f"{w}/empty")
    check("gen-model into an empty directory", [m, "gen-model", "--arch", "olmoe", "--out",
                                                f"{w}/empty", "-q"], 0, "wrote olmoe",
          stream="stdout")
    gen_progress(m, w)
    p = subprocess.run([m, "gen-model", "--help"], capture_output=True, text=True)
    rows = {r[0]: r[1:] for r in (x.split() for x in p.stdout.splitlines()) if r
            and r[0] in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")}
    ok = (p.returncode == 0 and "layers experts top-k hidden  ffn shared" in p.stdout
          and rows.get("mixtral") == ["4", "8", "2", "256", "512", "0"] and len(rows) == 5)
    print(f"{'ok  ' if ok else 'FAIL'} gen-model --help shows the default sizes per family")
    if not ok:
        failures.append(f"gen-model --help: default sizes per family: {p.stdout}")
    check("inspect missing dir", [m, "inspect", "--model", f"{w}/nope"], 1, "config.json")
    check("inspect without --model", [m, "inspect"], 2, "--model")

    broken = f"{w}/broken"
    shutil.copytree(model, broken)
    st = f"{broken}/model.safetensors"
    with open(st, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    check("inspect header length past the end", [m, "inspect", "--model", broken], 1,
          "model.safetensors")
    shutil.rmtree(broken)
    shutil.copytree(model, broken)
    size = os.path.getsize(st)
    os.truncate(st, size - 1000)
    check("inspect truncated shard", [m, "inspect", "--model", broken], 1, "model.safetensors")
    with open(f"{broken}/config.json", "w") as f:
        f.write('{"model_type": "llama", "num_hidden_layers": 2}')
    check("inspect unsupported model_type", [m, "inspect", "--model", broken], 1, "llama")
    with open(f"{broken}/config.json", "w") as f:
        f.write('{"model_type": ')
    check("inspect bad config JSON", [m, "inspect", "--model", broken], 1, "config.json")

    # forward: bad hidden states and routing
    H = 256
    rng = np.random.default_rng(3)
    good = f"{w}/x.npy"
    np.save(good, rng.standard_normal((4, H), dtype=np.float32))
    fwd = [m, "forward", "--local", "--model", model, "--out", f"{w}/y.npy"]
    check("forward without --local goes to moed", [m, "forward", "--remote", "127.0.0.1:1",
                                                   "--model", "mix", "--layer", "1", "--in",
                                                   good, "--out", f"{w}/y.npy"], 1,
          "cannot reach moed")
    check("forward missing --in", fwd + ["--layer", "1"], 2, "--in")
    check("forward ok", fwd + ["--layer", "1", "--in", good], 0, "tokens", stream="stdout")
    check("forward dense layer", fwd + ["--layer", "0", "--in", good], 1, "dense")
    check("forward layer out of range", fwd + ["--layer", "99", "--in", good], 1, "out of range")
    check("forward missing input", fwd + ["--layer", "1", "--in", f"{w}/none.npy"], 1, "none.npy")
    bad = f"{w}/f64.npy"
    np.save(bad, rng.standard_normal((4, H)))
    check("forward float64 input", fwd + ["--layer", "1", "--in", bad], 1, "<f8")
    np.save(bad, rng.standard_normal((4, H + 1), dtype=np.float32))
    check("forward wrong width", fwd + ["--layer", "1", "--in", bad], 1, f"[tokens, {H}]")
    np.save(bad, rng.standard_normal((H,), dtype=np.float32))
    check("forward 1-D input", fwd + ["--layer", "1", "--in", bad], 1, f"[tokens, {H}]")
    x = rng.standard_normal((4, H), dtype=np.float32)
    x[2, 7] = np.nan
    np.save(bad, x)
    check("forward NaN input", fwd + ["--layer", "1", "--in", bad], 1, "token 2, element 7 is NaN")
    x[2, 7] = 1e38  # finite, but the layer's output overflows (issue 22, defect 5)
    np.save(bad, x)
    check("forward 1e38 input: NaN output refused", fwd + ["--layer", "1", "--in", bad], 1,
          "output row 2 is not finite")
    np.save(bad, np.asfortranarray(rng.standard_normal((4, H), dtype=np.float32)))
    check("forward fortran-order input", fwd + ["--layer", "1", "--in", bad], 1, "Fortran")
    with open(bad, "wb") as f:
        f.write(b"not an npy file at all")
    check("forward garbage input", fwd + ["--layer", "1", "--in", bad], 1, "f64.npy")

    k = 4  # deepseek_v3 default top-k
    rin = f"{w}/r.npz"
    ids = np.tile(np.arange(k, dtype=np.int32), (4, 1))
    wts = np.full((4, k), 0.25, dtype=np.float32)
    np.savez(rin, ids=ids, weights=wts)
    check("forward caller routing", fwd + ["--layer", "1", "--in", good, "--routing-in", rin], 0,
          "tokens", stream="stdout")
    bad_ids = ids.copy()
    bad_ids[1, 2] = 999
    np.savez(rin, ids=bad_ids, weights=wts)
    check("forward routing id out of range", fwd + ["--layer", "1", "--in", good, "--routing-in",
                                                    rin], 1, "999")
    bad_ids = ids.copy()
    bad_ids[3, 1] = bad_ids[3, 0]
    np.savez(rin, ids=bad_ids, weights=wts)
    check("forward routing duplicate id", fwd + ["--layer", "1", "--in", good, "--routing-in",
                                                 rin], 1, "token 3")
    np.savez(rin, ids=ids[:, :2], weights=wts[:, :2])
    check("forward routing wrong shape", fwd + ["--layer", "1", "--in", good, "--routing-in", rin],
          1, "ids")
    np.savez(rin, ids=ids)
    check("forward routing without weights", fwd + ["--layer", "1", "--in", good,
                                                    "--routing-in", rin], 1, "weights")
    np.savez_compressed(rin, ids=ids, weights=wts)
    check("forward compressed routing", fwd + ["--layer", "1", "--in", good, "--routing-in", rin],
          1, "compressed")

    # pack and verify: usage, a store of the model, damage, serving from it
    import json
    store = f"{w}/store"
    for sub in ("pack", "verify"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "usage", stream="stdout")
    check("pack without --out", [m, "pack", "--model", model], 2, "--model and --out")
    check("pack without --model", [m, "pack", "--out", store], 2, "--model and --out")
    check("pack extra argument", [m, "pack", "--model", model, "--out", store, "stray"], 2,
          "unexpected argument 'stray'")
    check("pack unknown option", [m, "pack", "--model", model, "--out", store, "--fast"], 2,
          "usage")
    check("verify without --pack", [m, "verify"], 2, "--pack")
    check("verify extra argument", [m, "verify", "--pack", store, "stray"], 2,
          "unexpected argument 'stray'")
    check("pack missing model", [m, "pack", "--model", f"{w}/nope", "--out", store, "-q"], 1,
          "config.json")
    check("pack into the model's directory", [m, "pack", "--model", model, "--out", model, "-q"],
          1, "is the directory of the model being packed")
    check("pack", [m, "pack", "--model", model, "--out", store, "-q"], 0, "MB/s", stream="stdout")
    check("pack over a store", [m, "pack", "--model", model, "--out", store, "-q"], 1,
          "already holds a packed store")
    check("pack --force", [m, "pack", "--model", model, "--out", store, "--force", "-q"], 0,
          "packed", stream="stdout")
    # On a terminal, the progress bar ends at 100% once
    import pty
    mfd, sfd = pty.openpty()
    p = subprocess.run([m, "pack", "--model", model, "--out", store, "--force"],
                       stdout=subprocess.PIPE, stderr=sfd, text=True)
    os.close(sfd)
    tty = b""
    while True:
        try:
            chunk = os.read(mfd, 65536)
        except OSError:
            break
        if not chunk:
            break
        tty += chunk
    os.close(mfd)
    full = tty.count(b"packing [" + b"#" * 30 + b"]")
    print(f"{'ok  ' if p.returncode == 0 and full == 1 else 'FAIL'} pack: the 100% bar once")
    if p.returncode != 0 or full != 1:
        failures.append(f"pack: the 100% bar drawn {full} times: {tty[-600:]!r}")
    check("verify", [m, "verify", "--pack", store, "-q"], 0, "all match", stream="stdout")
    check("verify against the checkpoint", [m, "verify", "--pack", store, "--model", model, "-q"],
          0, "byte for byte against", stream="stdout")
    check("verify a checkpoint", [m, "verify", "--pack", model, "-q"], 1, "not a packed store")
    check("inspect a store", [m, "inspect", "--model", store], 0, "deepseek_v3", stream="stdout")

    # Served from the store, every MoE layer gives the checkpoint's bytes.
    for layer in (1, 2, 3):
        outs = []
        for src, tag in ((model, "ck"), (store, "pk")):
            y, r = f"{w}/y-{tag}-{layer}.npy", f"{w}/r-{tag}-{layer}.npz"
            check(f"forward layer {layer} from the {'store' if tag == 'pk' else 'checkpoint'}",
                  [m, "forward", "--local", "--model", src, "--layer", str(layer), "--in", good,
                   "--out", y, "--routing-out", r], 0, "tokens", stream="stdout")
            outs.append(open(y, "rb").read() if os.path.exists(y) else b"")
        if not outs[0] or outs[0] != outs[1]:
            failures.append(f"forward layer {layer}: the store's output differs from the "
                            f"checkpoint's")
        print(f"{'ok  ' if outs[0] and outs[0] == outs[1] else 'FAIL'} forward layer {layer}: "
              f"store and checkpoint outputs byte-identical")

    bad_store = f"{w}/bad-store"
    shutil.copytree(store, bad_store)
    with open(f"{bad_store}/moe-pack.json") as f:
        ix = json.load(f)
    blob = next(e for e in ix["experts"] if e["layer"] == 2 and e["expert"] == 5)
    with open(f"{bad_store}/experts.bin", "r+b") as f:
        f.seek(blob["offset"] + blob["nbytes"] // 2)
        b = f.read(1)
        f.seek(blob["offset"] + blob["nbytes"] // 2)
        f.write(bytes([b[0] ^ 0x10]))
    check("verify a flipped byte", [m, "verify", "--pack", bad_store, "-q"], 1,
          "layer 2 expert 5: checksum mismatch: index says")
    check("verify a flipped byte against the checkpoint", [m, "verify", "--pack", bad_store,
                                                           "--model", model, "-q"], 1,
          "1 mismatch; first: layer 2 expert 5")
    os.truncate(f"{bad_store}/experts.bin", os.path.getsize(f"{bad_store}/experts.bin") - 4096)
    check("verify a truncated store", [m, "verify", "--pack", bad_store, "-q"], 1, "data_bytes")
    check("forward on a truncated store", fwd[:4] + [bad_store, "--layer", "1", "--in", good,
                                                     "--out", f"{w}/y.npy"], 1, "data_bytes")
    with open(f"{bad_store}/moe-pack.json", "w") as f:
        f.write('{"format": "moed-pack", "version": 9}')
    check("inspect a store of another version", [m, "inspect", "--model", bad_store], 1,
          "'version' is 9")

    # gpt-oss's MXFP4 release: packed as MXFP4 (gate and up rows taken apart), verified against
    # the checkpoint, served byte for byte as the checkpoint; --quantize of it refused
    mx, mx_store = f"{w}/mxfp4", f"{w}/mxfp4-store"
    check("gen-model gpt_oss mxfp4", [m, "gen-model", "--arch", "gpt_oss", "--dtype", "mxfp4",
                                      "--layers", "2", "--experts", "4", "--top-k", "2",
                                      "--hidden", "128", "--ffn", "64", "--out", mx, "-q"], 0,
          "wrote gpt_oss", stream="stdout")
    check("pack --quantize of MXFP4 refused", [m, "pack", "--model", mx, "--out",
                                               f"{w}/mxfp4-q8", "--quantize", "int8", "-q"], 1,
          f"{mx}: its experts are MXFP4 (gpt-oss as released), which --quantize")
    check("pack MXFP4", [m, "pack", "--model", mx, "--out", mx_store, "-q"], 0, "packed",
          stream="stdout")
    check("verify MXFP4 against the checkpoint", [m, "verify", "--pack", mx_store, "--model", mx,
                                                  "-q"], 0, "byte for byte against",
          stream="stdout")
    check("inspect an MXFP4 store", [m, "inspect", "--model", mx_store], 0, "mxfp4",
          stream="stdout")
    mxin = f"{w}/mx-x.npy"
    np.save(mxin, rng.standard_normal((5, 128), dtype=np.float32))
    for layer in (0, 1):
        outs = []
        for src, tag in ((mx, "ck"), (mx_store, "pk")):
            y = f"{w}/mx-y-{tag}-{layer}.npy"
            check(f"forward MXFP4 layer {layer} from the {'store' if tag == 'pk' else 'checkpoint'}",
                  [m, "forward", "--local", "--model", src, "--layer", str(layer), "--in", mxin,
                   "--out", y], 0, "tokens", stream="stdout")
            outs.append(open(y, "rb").read() if os.path.exists(y) else b"")
        if not outs[0] or outs[0] != outs[1]:
            failures.append(f"forward MXFP4 layer {layer}: the store's output differs from the "
                            f"checkpoint's")
        print(f"{'ok  ' if outs[0] and outs[0] == outs[1] else 'FAIL'} forward MXFP4 layer "
              f"{layer}: store and checkpoint outputs byte-identical")

    # gen-trace and cache-sim: usage, a trace of the model, each policy next to Belady
    import json as _json
    trace = f"{w}/t.trace"
    for sub in ("gen-trace", "cache-sim"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "usage", stream="stdout")
    gt = [m, "gen-trace", "--model", model]
    check("gen-trace without --out", gt + ["--tokens", "10"], 2, "--model, --tokens and --out")
    check("gen-trace without --tokens", gt + ["--out", trace], 2, "--model, --tokens and --out")
    check("gen-trace zero tokens", gt + ["--tokens", "0", "--out", trace], 2, "--tokens '0'")
    check("gen-trace bad batch", gt + ["--tokens", "10", "--batch", "0", "--out", trace], 2,
          "--batch '0'")
    check("gen-trace bad seed", gt + ["--tokens", "10", "--seed", "x", "--out", trace], 2,
          "--seed 'x'")
    check("gen-trace extra argument", gt + ["--tokens", "10", "--out", trace, "stray"], 2,
          "unexpected argument 'stray'")
    check("gen-trace missing model", [m, "gen-trace", "--model", f"{w}/nope", "--tokens", "10",
                                      "--out", trace], 1, "config.json")
    check("gen-trace unwritable output", gt + ["--tokens", "10", "--out", f"{w}/nope/t.trace"], 1,
          "cannot create")
    check("gen-trace", gt + ["--tokens", "300", "--out", trace], 0, "300 tokens", stream="stdout")
    check("gen-trace again", gt + ["--tokens", "300", "--out", f"{w}/t2.trace", "-q"], 0)
    check("gen-trace another seed", gt + ["--tokens", "300", "--seed", "9", "--out",
                                          f"{w}/t3.trace", "-q"], 0)
    check("gen-trace batched", gt + ["--tokens", "300", "--batch", "8", "--out", f"{w}/t4.trace",
                                     "-q"], 0)
    same = os.path.exists(f"{w}/t2.trace") and open(trace, "rb").read() == open(
        f"{w}/t2.trace", "rb").read()
    other = os.path.exists(f"{w}/t3.trace") and open(trace, "rb").read() != open(
        f"{w}/t3.trace", "rb").read()
    print(f"{'ok  ' if same and other else 'FAIL'} gen-trace: deterministic for a seed")
    if not (same and other):
        failures.append("gen-trace: the same seed must give the same trace, another seed another")

    cs = [m, "cache-sim", "--trace", trace]
    check("cache-sim without --capacity", cs, 2, "--trace and --capacity")
    check("cache-sim without --trace", [m, "cache-sim", "--capacity", "10"], 2,
          "--trace and --capacity")
    check("cache-sim bad policy", cs + ["--capacity", "10", "--policy", "mru"], 2,
          "--policy 'mru'")
    for bad in ("abc", "0%", "150%", "-3", "12Q"):
        check(f"cache-sim bad capacity {bad}", cs + ["--capacity", bad], 2, f"--capacity '{bad}'")
    check("cache-sim extra argument", cs + ["--capacity", "10", "stray"], 2,
          "unexpected argument 'stray'")
    check("cache-sim missing trace", [m, "cache-sim", "--trace", f"{w}/none.trace", "--capacity",
                                      "10"], 1, "none.trace")
    check("cache-sim not a trace", [m, "cache-sim", "--trace", good, "--capacity", "10"], 1,
          "bad magic")
    check("cache-sim capacity too small", cs + ["--capacity", "1"], 1, "needs at once; give at least")
    for pol in ("lru", "freq", "routing", "adaptive"):
        check(f"cache-sim {pol}", cs + ["--capacity", "50%", "--policy", pol], 0, "belady",
              stream="stdout")
        check(f"cache-sim {pol} with prefetch", cs + ["--capacity", "25%", "--policy", pol,
                                                     "--prefetch"], 0, "belady", stream="stdout")
    check("cache-sim all", cs + ["--capacity", "50%", "--prefetch"], 0, "routing+prefetch",
          stream="stdout")
    check("cache-sim bytes", cs + ["--capacity", "64M"], 0, "belady", stream="stdout")
    check("cache-sim batched trace", [m, "cache-sim", "--trace", f"{w}/t4.trace", "--capacity",
                                      "75%"], 0, "belady", stream="stdout")
    p = subprocess.run(cs + ["--capacity", "40%", "--prefetch", "--json"], capture_output=True,
                       text=True)
    try:
        js = _json.loads(p.stdout)
        ok = (p.returncode == 0 and len(js["runs"]) == 8 and 0 <= js["belady"]["hit_rate"] <= 1
              and all(r["accesses"] == js["belady"]["accesses"] for r in js["runs"])
              and all(r["hits"] <= js["belady"]["hits"] for r in js["runs"] if not r["prefetch"])
              and js["runs"][0]["gap_closed"] is None)
    except (ValueError, KeyError, TypeError):
        ok = False
    long_reals = [x for x in re.findall(r"\d+\.\d+", p.stdout)
                  if len(x.replace(".", "").lstrip("0")) > 7]
    ok = ok and not long_reals
    print(f"{'ok  ' if ok else 'FAIL'} cache-sim --json: eight runs, demand paging <= Belady, "
          f"reals with ~6 significant digits")
    if not ok:
        failures.append(f"cache-sim --json: exit {p.returncode}\nstdout: {p.stdout}\n"
                        f"stderr: {p.stderr}")
    # Time: the disk and compute flags; stall and bytes per token.
    for flag, bad in (("--disk-bw", "0"), ("--disk-bw", "fast"), ("--disk-latency", "-1ms"),
                      ("--compute", "2 parsecs"), ("--expert-bytes", "0"),
                      ("--prefetch-precision", "2")):
        check(f"cache-sim bad {flag} {bad}", cs + ["--capacity", "50%", flag, bad], 2,
              f"{flag} '{bad}'")
    p = subprocess.run(cs + ["--capacity", "50%", "--policy", "lru", "--json", "--disk-bw", "1G",
                             "--disk-latency", "0", "--compute", "1ms", "--expert-bytes", "1M"],
                       capture_output=True, text=True)
    try:
        js = _json.loads(p.stdout)
        r = js["runs"][0]
        misses = r["accesses"] - r["hits"]
        # Demand paging, no latency: each miss holds the disk 1 ms and stalls
        # its step; a step's stall is its misses' reads.
        ok = (p.returncode == 0 and r["bytes_read"] == misses * 2**20
              and abs(r["stall_s"] - misses * 2**20 / 1e9) < 1e-6
              and abs(r["compute_s"] - js["steps"] * 1e-3) < 1e-6
              and r["tokens"] == 300 and js["timing"]["disk_bw"] == 1e9)
    except (ValueError, KeyError, TypeError):
        ok = False
    print(f"{'ok  ' if ok else 'FAIL'} cache-sim timing: stall = misses x read time, bytes per "
          f"token")
    if not ok:
        failures.append(f"cache-sim timing: exit {p.returncode}\nstdout: {p.stdout}\n"
                        f"stderr: {p.stderr}")
    check("cache-sim stall column", cs + ["--capacity", "50%", "--policy", "lru"], 0, "stall/tok",
          stream="stdout")
    # trace import: csv and jsonl into a trace cache-sim replays; bad rows by line.
    ti = [m, "trace", "import"]
    with open(f"{w}/r.csv", "w") as f:
        f.write('layer,token,experts,weights\n0,0,"[1, 2]","0.6 0.4"\n1,0,3;0,0.5;0.5\n'
                '0,1,1 2\n1,1,3|0\n')
    with open(f"{w}/r.jsonl", "w") as f:
        f.write('{"layer": 0, "token": 0, "experts": [1, 2]}\n'
                '{"layer": 1, "token": 0, "experts": [3, 0], "weights": [0.5, 0.5]}\n')
    with open(f"{w}/bad.csv", "w") as f:
        f.write("0,0,1 2\n0,1,1 1\n")
    check("trace without subcommand", [m, "trace"], 2, "expected a subcommand: import")
    check("trace import without format", ti + ["--shape", "2,4,2", f"{w}/r.csv", f"{w}/i.trace"],
          2, "--format, one of --model and --shape")
    check("trace import bad format", ti + ["--format", "xml", "--shape", "2,4,2", f"{w}/r.csv",
                                           f"{w}/i.trace"], 2, "--format 'xml'")
    check("trace import bad shape", ti + ["--format", "csv", "--shape", "2,4,9", f"{w}/r.csv",
                                          f"{w}/i.trace"], 2, "--shape '2,4,9'")
    check("trace import csv", ti + ["--format", "csv", "--shape", "2,4,2,1M", f"{w}/r.csv",
                                    f"{w}/i.trace"], 0, "4 records", stream="stdout")
    check("trace import replays", [m, "cache-sim", "--trace", f"{w}/i.trace", "--capacity", "4",
                                   "--policy", "lru"], 0, "belady", stream="stdout")
    check("trace import jsonl", ti + ["--format", "jsonl", "--shape", "2,4,2", f"{w}/r.jsonl",
                                      f"{w}/j.trace", "-q"], 0)
    check("trace import bad row", ti + ["--format", "csv", "--shape", "2,4,2", f"{w}/bad.csv",
                                        f"{w}/b.trace"], 1, "bad.csv:2: expert 1 twice")
    check("trace import missing input", ti + ["--format", "csv", "--shape", "2,4,2",
                                              f"{w}/none.csv", f"{w}/b.trace"], 1, "none.csv")
    # The test model's layer 0 is dense: --model knows it.
    check("trace import model", ti + ["--format", "jsonl", "--model", model, f"{w}/r.jsonl",
                                      f"{w}/k.trace"], 1, "r.jsonl:1: layer 0 is a dense layer")
    # An unclosed trace (n_records 0) is read whole; a partial record is refused.
    raw = open(trace, "rb").read()
    with open(f"{w}/unclosed.trace", "wb") as f:
        f.write(raw[:40] + bytes(8) + raw[48:])
    check("cache-sim unclosed trace", [m, "cache-sim", "--trace", f"{w}/unclosed.trace",
                                       "--capacity", "50%", "--policy", "lru"], 0, "belady",
          stream="stdout")
    with open(f"{w}/unclosed.trace", "ab") as f:
        f.write(b"\1\2\3")
    check("cache-sim partial record", [m, "cache-sim", "--trace", f"{w}/unclosed.trace",
                                       "--capacity", "50%"], 1, "is incomplete")

    # remote commands: usage errors, and a daemon that is not there
    import socket
    remote_cmds = ("status", "models", "stats", "load", "unload", "pin", "unpin", "evict", "retry",
                   "drain", "resume")
    check("--help lists the remote options", [m, "--help"], 0, "--remote HOST:PORT",
          stream="stdout")
    for sub in remote_cmds:
        check(f"{sub} --help", [m, sub, "--help"], 0, "--remote HOST:PORT", stream="stdout")
    check("load without --dir", [m, "load"], 2, "--dir is required")
    check("load empty --name", [m, "load", "--dir", w, "--name", ""], 2, "--name ''")
    check("unload without NAME", [m, "unload"], 2, "expected NAME")
    check("pin without EXPERT", [m, "pin", "ds", "1"], 2, "expected MODEL LAYER EXPERT")
    check("pin bad layer", [m, "pin", "ds", "x", "3"], 2, "pin: LAYER 'x'")
    check("evict bad expert", [m, "evict", "ds", "1", "1.5"], 2, "evict: EXPERT '1.5'")
    check("--help lists retry", [m, "--help"], 0, "retry ", stream="stdout")
    check("retry without EXPERT", [m, "retry", "ds", "1"], 2, "expected MODEL LAYER EXPERT|all")
    check("retry bad layer", [m, "retry", "ds", "all", "3"], 2, "retry: LAYER 'all'")
    check("retry bad expert", [m, "retry", "ds", "1", "every"], 2,
          "retry: EXPERT (a number or all) 'every'")
    check("retry negative expert", [m, "retry", "ds", "1", "-1"], 2, "usage")
    check("retry extra argument", [m, "retry", "ds", "1", "all", "stray"], 2,
          "unexpected argument 'stray'")
    check("unpin extra argument", [m, "unpin", "ds", "1", "2", "stray"], 2,
          "unexpected argument 'stray'")
    check("status extra argument", [m, "status", "stray"], 2, "unexpected argument 'stray'")
    check("status unknown option", [m, "status", "--fast"], 2, "usage")
    check("stats extra argument", [m, "stats", "--experts", "stray"], 2,
          "unexpected argument 'stray'")
    check("drain bad --timeout-ms", [m, "drain", "--timeout-ms", "soon"], 2, "--timeout-ms 'soon'")
    # cluster commands: placement, peer add, peer remove
    for sub in ("placement", "peer"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "--remote HOST:PORT", stream="stdout")
        check(f"{sub} unknown option", [m, sub, "--fast"], 2, "usage")
    check("--help lists placement", [m, "--help"], 0, "placement", stream="stdout")
    check("--help lists peer", [m, "--help"], 0, "peer ", stream="stdout")
    check("placement without --model", [m, "placement"], 2, "--model is required")
    check("placement empty --model", [m, "placement", "--model", ""], 2, "--model ''")
    check("placement extra argument", [m, "placement", "--model", "ds", "stray"], 2,
          "unexpected argument 'stray'")
    check("peer without action", [m, "peer"], 2, "expected add NAME HOST:PORT or remove NAME")
    check("peer unknown action", [m, "peer", "join", "b"], 2, "unknown action 'join'")
    check("peer add without address", [m, "peer", "add", "b"], 2,
          "peer add: expected NAME HOST:PORT")
    check("peer add without port", [m, "peer", "add", "b", "10.0.0.2"], 2,
          "address '10.0.0.2': expected the peer's HOST:PORT")
    check("peer add bad port", [m, "peer", "add", "b", "10.0.0.2:70000"], 2,
          "address '10.0.0.2:70000'")
    check("peer add without host", [m, "peer", "add", "b", ":50051"], 2, "address ':50051'")
    check("peer add name with a space", [m, "peer", "add", "b c", "10.0.0.2:50051"], 2,
          "NAME 'b c': expected no spaces")
    check("peer add extra argument", [m, "peer", "add", "b", "10.0.0.2:50051", "stray"], 2,
          "unexpected argument 'stray'")
    check("peer remove without NAME", [m, "peer", "remove"], 2, "peer remove: expected NAME")
    check("peer remove extra argument", [m, "peer", "remove", "b", "stray"], 2,
          "unexpected argument 'stray'")
    check("peer add bad --remote", [m, "peer", "add", "b", "10.0.0.2:50051", "--remote",
                                    "localhost"], 2, "expected HOST:PORT")
    check("--timeout 0", [m, "status", "--timeout", "0"], 2, "--timeout '0'")
    check("--timeout not a number", [m, "models", "--timeout", "1x"], 2, "--timeout '1x'")
    check("--remote and --socket", [m, "status", "--remote", "127.0.0.1:1", "--socket",
                                    f"{w}/s"], 2, "give one")
    check("--remote without a port", [m, "status", "--remote", "localhost"], 2,
          "expected HOST:PORT")
    check("--remote bad port", [m, "status", "--remote", "127.0.0.1:99999"], 2,
          "expected HOST:PORT")
    check("MOED_ADDRESS without a port", [m, "status"], 2, "address 'nowhere'",
          env={"MOED_ADDRESS": "nowhere"})
    check("--tls-cert without --tls", [m, "status", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
          2, "need --tls")
    check("--tls-cert without --tls-key", [m, "status", "--tls", "--tls-cert", "c.pem"], 2,
          "both --tls-cert and --tls-key")
    # bench and top: usage errors
    for sub in ("bench", "top"):
        check(f"{sub} --help", [m, sub, "--help"], 0, "--remote HOST:PORT", stream="stdout")
        check(f"{sub} extra argument", [m, sub, "stray"], 2, "unexpected argument 'stray'")
        check(f"{sub} unknown option", [m, sub, "--fast"], 2, "usage")
    check("bench without --model", [m, "bench"], 2, "--model is required")
    check("bench --duration and --requests", [m, "bench", "--model", "x", "--duration", "1",
                                              "--requests", "5"], 2, "give one")
    check("bench bad --tokens", [m, "bench", "--model", "x", "--tokens", "0"], 2, "--tokens '0'")
    check("bench bad --callers", [m, "bench", "--model", "x", "--callers", "1000"], 2,
          "--callers '1000'")
    check("bench bad --duration", [m, "bench", "--model", "x", "--duration", "soon"], 2,
          "--duration 'soon'")
    check("bench bad --requests", [m, "bench", "--model", "x", "--requests", "-3"], 2,
          "--requests '-3'")
    check("bench bad --layers", [m, "bench", "--model", "x", "--layers", "1,,2"], 2,
          "--layers '1,,2'")
    check("bench bad --dtype", [m, "bench", "--model", "x", "--dtype", "f8"], 2, "--dtype 'f8'")
    check("bench bad --seed", [m, "bench", "--model", "x", "--seed", "many"], 2, "--seed 'many'")
    check("bench bad --remote", [m, "bench", "--model", "x", "--remote", "localhost"], 2,
          "expected HOST:PORT")
    check("top bad --interval", [m, "top", "--interval", "0"], 2, "--interval '0'")
    check("top bad --iterations", [m, "top", "--iterations", "none"], 2, "--iterations 'none'")
    check("top bad --layer", [m, "top", "--layer", "x"], 2, "--layer 'x'")
    check("top empty --model", [m, "top", "--model", ""], 2, "--model ''")
    # A port bound but not listening: connections to it are refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
        dead = {"status": [], "models": [], "stats": ["--experts"],
                "load": ["--dir", model], "unload": ["ds"], "pin": ["ds", "1", "2"],
                "unpin": ["ds", "1", "2"], "evict": ["ds", "1", "2"], "retry": ["ds", "1", "all"],
                "drain": [], "resume": []}
        for sub in remote_cmds:
            check(f"{sub} with no daemon", [m, sub, "--remote", addr] + dead[sub], 1,
                  f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("bench with no daemon", [m, "bench", "--model", "x", "--requests", "5", "-q",
                                       "--remote", addr], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("top with no daemon", [m, "top", "--iterations", "1", "--remote", addr], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("placement with no daemon", [m, "placement", "--model", "ds", "--remote", addr],
              1, f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("peer add with no daemon", [m, "peer", "add", "--remote", addr, "--token", "t",
                                          "b", "10.0.0.2:50051"], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("peer remove with no daemon", [m, "peer", "remove", "b", "--remote", addr], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("status --json with no daemon", [m, "status", "--json", "--remote", addr], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ")
        check("status with no daemon at MOED_ADDRESS", [m, "status"], 1,
              f"cannot reach moed at {addr}: UNAVAILABLE: ", env={"MOED_ADDRESS": addr})
        check("options before the arguments", [m, "pin", "--remote", addr, "--token", "t",
                                               "--timeout", "5", "ds", "1", "2"], 1,
              "cannot reach moed")
    # A relative --dir is resolved where moectl runs, before any call.
    check("load a relative --dir that is not here", [m, "load", "--dir", "no-such-dir-x",
                                                     "--remote", "127.0.0.1:1"], 1,
          "load: --dir 'no-such-dir-x': No such file or directory in ")
    check("status with no daemon on the socket", [m, "status", "--socket", f"{w}/none.sock"], 1,
          f"cannot reach moed at unix:{w}/none.sock: UNAVAILABLE: ")
    check("--tls with a missing CA file", [m, "status", "--tls", "--tls-ca", f"{w}/none.pem"], 1,
          "cannot open CA file")
    check("--tls with a CA file that is not PEM", [m, "status", "--tls", "--tls-ca", good], 1,
          "not a PEM file")

    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
