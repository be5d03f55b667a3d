#!/usr/bin/env python3
"""The Hugging Face tier by hand, outside ctest: makes the checkpoints
(make_models.py, reused when current) and checks every family
(check_layers.py) with the moectl and moed of a build tree.

usage: run.py [--build DIR] [--family F ...] [--transport local|grpc|shm ...]
Run it with the interpreter of scripts/hf-env.sh.  Exit 0 pass, 1 fail.
"""
import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(SOURCE, "build"))
    ap.add_argument("--family", action="append", default=[])
    ap.add_argument("--transport", action="append", default=[])
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    models = os.path.join(b, "tests", "hf-models")
    r = subprocess.run([sys.executable, os.path.join(HERE, "make_models.py"), "--workdir",
                        models])
    if r.returncode:
        return 1
    cmd = [sys.executable, os.path.join(HERE, "check_layers.py"), "--models", models,
           "--moectl", os.path.join(b, "client", "moectl"),
           "--moed", os.path.join(b, "daemon", "moed"), "--source", SOURCE,
           "--workdir", os.path.join(b, "tests", "hf-layers")]
    protoc = shutil.which("protoc")
    if protoc:
        cmd += ["--protoc", protoc]
    for f in a.family:
        cmd += ["--family", f]
    for t in a.transport:
        cmd += ["--transport", t]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
