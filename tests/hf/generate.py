#!/usr/bin/env python3
"""Greedy generation by transformers models whose experts moed serves.

For each checkpoint given (saved by transformers' own save_pretrained): the
model loaded by transformers generates --new-tokens tokens greedily from a
fixed prompt, once alone and once with its sparse MoE blocks attached to a
running moed (moed.hf.attach_experts, over shared memory), and the two runs
are compared:

  float32:  the token ids must be identical, and the logits of every step
            within --f32-tol of that step's max |logit|;
  bfloat16: reported (first step where the ids differ, worst logit
            difference): moed keeps activations in fp32 where transformers
            rounds them to bf16, so the runs may part after a near-tie.

It also checks the attach API's refusals: a model attached twice, a model
whose sizes differ from the one moed serves (the message names the field),
and detach giving the model its own blocks back (same logits as before).

usage: generate.py --build BUILD --models DIR [DIR ...]
Exit 0 pass, 1 fail, 77 skip (torch or transformers missing).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError as e:
    print(f"SKIP: {e} (run with the interpreter scripts/hf-env.sh prints)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import moed  # noqa: E402
from moed.hf import AttachError, attach_experts, detach_experts, moe_blocks  # noqa: E402

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail else ''}", flush=True)
    if not ok:
        failures.append(f"{name}: {detail}")


def start_moed(build, models, workdir, threads):
    sock = os.path.join(workdir, "shm.sock")
    args = [os.path.join(build, "daemon", "moed"), "--listen", "127.0.0.1:0",
            "--shm-socket", sock, "--threads", str(threads)]
    for name, d in models.items():
        args += ["--model", f"{name}={d}"]
    log = open(os.path.join(workdir, "moed.log"), "w+")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if "shared memory on" in line:
            return p, sock
    p.kill()
    log.seek(0)
    raise RuntimeError(f"moed did not start: {log.read()[-2000:]}")


def generate(model, prompt, n):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    ids = out.sequences[0, prompt.shape[1]:].tolist()
    logits = torch.stack([l[0].float() for l in out.logits])
    return ids, logits


def compare(name, dtype, ref, got, tol):
    ref_ids, ref_logits = ref
    ids, logits = got
    steps = min(len(ids), len(ref_ids))
    first = next((i for i in range(steps) if ids[i] != ref_ids[i]), None)
    # Logits are comparable up to and including the first step that differs
    # (after it, the inputs differ).
    upto = steps if first is None else first + 1
    scale = ref_logits[:upto].abs().amax(dim=1).clamp_min(1e-30)
    err = float(((logits[:upto] - ref_logits[:upto]).abs().amax(dim=1) / scale).max())
    if dtype == torch.float32:
        check(f"{name}: {steps} greedy tokens identical with and without moed",
              first is None and len(ids) == len(ref_ids),
              "" if first is None else f"first differs at step {first}: {ids[first]} vs {ref_ids[first]}")
        check(f"{name}: logits within {tol:g} of max |logit| at every step", err <= tol,
              f"worst {err:.3g}")
    else:
        same = "identical" if first is None else f"identical up to step {first}"
        gap = ""
        if first is not None:
            # How close the two choices were in transformers' own logits:
            # a near-tie that bf16 rounding may tip either way.
            row = ref_logits[first]
            g = float((row[ref_ids[first]] - row[ids[first]]) / row.abs().max())
            gap = f" (there transformers' top two logits differ by {g:.3g} of max |logit|)"
        print(f"info {name}: bf16 tokens {same} of {steps}{gap}; worst logit difference "
              f"{err:.3g} of max |logit| up to there", flush=True)
    return err, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--models", nargs="+", required=True, help="checkpoint directories")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--f32-tol", type=float, default=1e-4)
    ap.add_argument("--other", help="a checkpoint of another family, served by moed only to "
                    "check that attaching the first model to it is refused")
    ap.add_argument("--threads", type=int, default=2, help="torch's and moed's threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MOED_CLIENT_LIB",
                          os.path.join(a.build, "client", "libmoe-client.so.1"))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")

    models = {os.path.basename(os.path.normpath(d)): d for d in a.models}
    served = dict(models)
    if a.other:
        served[os.path.basename(os.path.normpath(a.other))] = a.other
    workdir = tempfile.mkdtemp(prefix="moed-generate-")
    server, sock = start_moed(a.build, served, workdir, a.threads)
    rows = []
    try:
        with moed.connect(sock) as s:
            for name, d in models.items():
                cfg = json.load(open(os.path.join(d, "config.json")))
                dtype = torch.bfloat16 if cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" \
                    else torch.float32
                model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
                g = torch.Generator().manual_seed(11)
                prompt = torch.randint(3, model.config.vocab_size, (1, 8), generator=g)
                ref = generate(model, prompt, a.new_tokens)

                att = attach_experts(model, s, name)
                check(f"{name}: attached ({len(att.layers)} MoE layers, check error "
                      f"{att.check_error:.2g})", att.attached)
                try:
                    attach_experts(model, s, name)
                    check(f"{name}: a second attach is refused", False, "no error")
                except AttachError as e:
                    check(f"{name}: a second attach is refused", "already attached" in str(e), e)
                got = generate(model, prompt, a.new_tokens)
                calls = att.calls
                detach_experts(model)
                check(f"{name}: the MoE blocks ran in moed ({calls} calls)",
                      calls >= len(att.layers) * a.new_tokens)
                err, first = compare(name, dtype, ref, got, a.f32_tol)
                rows.append((name, str(dtype).split(".")[-1], err, first))

                again = generate(model, prompt, 2)
                check(f"{name}: detached, the model's own blocks give the same logits",
                      torch.equal(again[1], ref[1][:2]) and not att.attached)

                # Same family and sizes, other weights: only the numeric check
                # at attach can tell, and it must.
                block = dict(moe_blocks(model))[att.layers[-1]]
                with torch.no_grad():
                    block.experts.down_proj.mul_(1.5)
                try:
                    attach_experts(model, s, name)
                    check(f"{name}: other expert weights than moed's are refused", False,
                          "attached")
                except AttachError as e:
                    check(f"{name}: other expert weights than moed's are refused",
                          "not this checkpoint" in str(e), e)
                del model

            # Models moed serves that are not this one: one of another family
            # (the sizes differ: refused naming each field), and the same
            # family in the other precision (same sizes, other weights:
            # refused by the numeric check).
            names = list(served)
            if len(names) >= 2:
                m0 = AutoModelForCausalLM.from_pretrained(models[names[0]]).eval()

                def model_type(n):
                    return json.load(open(os.path.join(served[n], "config.json"))) \
                        .get("model_type")

                for other in names[1:]:
                    family = model_type(other) != m0.config.model_type
                    name = ("a model of another family is refused, naming what differs" if family
                            else f"the same family's {other} is refused by the numeric check")
                    try:
                        attach_experts(m0, s, other)
                        check(name, False, "attached")
                    except AttachError as e:
                        check(name, ("does not match moed's model" in str(e)
                                     and re.search(r": model .*, moed ", str(e)) is not None)
                              if family else "not this checkpoint" in str(e), e)
                try:
                    attach_experts(m0, s, "no-such-model")
                    check("an unknown model name is refused", False, "attached")
                except (AttachError, moed.MoedError) as e:
                    check("an unknown model name is refused", "no-such-model" in str(e), e)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"{'model':<32} {'dtype':<9} {'worst logit diff':>17}  tokens")
    for name, dt, err, first in rows:
        print(f"{name:<32} {dt:<9} {err:>17.3g}  "
              f"{'identical' if first is None else f'differ from step {first}'}")
    if failures:
        print(f"{len(failures)} failed:\n" + "\n".join(failures))
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
