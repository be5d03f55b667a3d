#!/usr/bin/python3
"""moed's systemd integration, end to end.

Checks:
  install      `cmake --install BUILD --prefix TMP` puts every file where
               systemd/CMakeLists.txt says (sbin/moed, bin/moectl, the units,
               sysusers.d, tmpfiles.d, the example configuration), and
               moed.service runs the installed moed;
  verify       `systemd-analyze verify` finds nothing to say about the
               installed units (skipped where systemd-analyze is missing or
               cannot run here: checked on a trivial unit first), and
               `systemd-analyze security --offline` rates them OK;
  sysusers     `systemd-sysusers --dry-run --root` parses moed.conf, and
               (as root) creates the user, then `systemd-tmpfiles --create
               --root` makes the directories with their modes and owner;
  activation   moed started by systemd-socket-activate (when installed) and
               by an emulation of it (LISTEN_FDS/LISTEN_PID, the socket as
               fd 3) serves the passed Unix socket: Health SERVING and a
               Forward from a client that connected before moed ran; the
               configured path is not bound nor removed; a passed descriptor
               that is not a listening socket is closed and the path bound;
  logs         one prefix on every line (a timestamp and moed[PID], or only
               the priority when JOURNAL_STREAM names stderr), log_format =
               json, sizes for people, one debug line per request;
  watchdog     with NOTIFY_SOCKET and WATCHDOG_USEC, READY=1 then WATCHDOG=1
               several times per interval, STOPPING=1 at SIGTERM; a batch
               longer than the interval withholds the pings (logged), which
               come back once it finishes.

Exit 0 pass, 1 fail, 77 skip (numpy or grpcio missing).
"""
import argparse
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

try:
    import numpy as np
    import grpc
    from moedtest import check, finish, stubs, tensor
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-numpy, python3-grpcio, "
          f"python3-grpc-tools)")
    sys.exit(77)

logdir = "."  # the workdir: logs stay there, sockets go to a short /tmp path


def skip(name, why):
    print(f"skip {name}: {why}")


def read(path):
    with open(path) as f:
        return f.read()


class Moed:
    """moed (or a wrapper that execs it) with stderr in a file."""

    def __init__(self, argv, name, env=None, pass_fds=()):
        self.log_path = log = f"{logdir}/{name}.log"
        self.log = open(log, "w+")
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, env=env,
                                  pass_fds=pass_fds)

    def stderr(self):
        self.log.flush()
        return read(self.log_path)

    def wait_log(self, pattern, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.stderr()):
                return True
            if self.p.poll() is not None:
                return bool(re.search(pattern, self.stderr()))
            time.sleep(0.05)
        return False

    def stop(self, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return -9


def channel(path):
    return grpc.insecure_channel(f"unix:{path}",
                                 options=[("grpc.max_receive_message_length", 256 << 20),
                                          ("grpc.max_send_message_length", 256 << 20)])


# ---- install ----

def test_client_install(prefix, libdir, tmp):
    """A program built against the installed libmoe-client with pkg-config;
    the library needs nothing of the engine or gRPC."""
    readelf = shutil.which("readelf")
    if readelf:
        p = subprocess.run([readelf, "-d", f"{prefix}/{libdir}/libmoe-client.so.1"],
                           capture_output=True, text=True)
        needed = re.findall(r"\(NEEDED\).*\[(.*)\]", p.stdout)
        check("libmoe-client needs only libc (no engine, gRPC or protobuf)",
              needed and all(n.startswith(("libc.so", "ld-linux")) for n in needed), needed)
    pkg, cc, nm = shutil.which("pkg-config"), shutil.which("cc"), shutil.which("nm")
    if nm:
        p = subprocess.run([nm, "-D", "--undefined-only", f"{prefix}/{libdir}/libmoe-client.so.1"],
                           capture_output=True, text=True)
        if "__asan_init" in p.stdout:
            skip("building against the installed libmoe-client",
                 "a sanitizer build: the library needs the ASan runtime in the program")
            return
    if not pkg or not cc:
        skip("building against the installed libmoe-client", "pkg-config or cc missing")
        return
    src = f"{tmp}/app.c"
    with open(src, "w") as f:
        f.write('#include <moe_client.h>\n#include <stdio.h>\n'
                'int main(void) { struct moe_session *s;\n'
                '  int rc = moe_connect("/nonexistent/moed.sock", NULL, &s);\n'
                '  printf("%d %s\\n", rc, moe_connect_error()); return rc < 0 ? 0 : 1; }\n')
    env = dict(os.environ, PKG_CONFIG_PATH=f"{prefix}/{libdir}/pkgconfig")
    flags = subprocess.run([pkg, "--cflags", "--libs", "moe-client"], capture_output=True,
                           text=True, env=env)
    check("pkg-config knows moe-client", flags.returncode == 0, flags.stderr)
    if flags.returncode:
        return
    p = subprocess.run([cc, "-o", f"{tmp}/app", src] + flags.stdout.split(),
                       capture_output=True, text=True)
    check("a program builds against the installed library", p.returncode == 0, p.stderr)
    if p.returncode == 0:
        r = subprocess.run([f"{tmp}/app"], capture_output=True, text=True,
                           env=dict(os.environ, LD_LIBRARY_PATH=f"{prefix}/{libdir}"))
        check("it runs and says why it cannot connect",
              r.returncode == 0 and "/nonexistent/moed.sock" in r.stdout, r.stdout + r.stderr)

def test_install(a, tmp):
    prefix = f"{tmp}/prefix"
    p = subprocess.run([a.cmake, "--install", a.build, "--prefix", prefix],
                       capture_output=True, text=True)
    check("cmake --install", p.returncode == 0, p.stdout + p.stderr)
    if p.returncode != 0:
        return None
    want = {
        "sbin/moed": True, "bin/moectl": True,
        "lib/systemd/system/moed.service": False, "lib/systemd/system/moed.socket": False,
        "lib/sysusers.d/moed.conf": False, "lib/tmpfiles.d/moed.conf": False,
        "share/doc/moed/moed.conf.example": False, "share/doc/moed/README.systemd.md": False,
        "share/man/man8/moed.8": False, "share/man/man1/moectl.1": False,
        "share/man/man5/moed.conf.5": False, "share/bash-completion/completions/moectl": False,
    }
    for rel, exe in want.items():
        path = f"{prefix}/{rel}"
        ok = os.path.isfile(path) and (not exe or os.access(path, os.X_OK))
        check(f"installed {rel}", ok, "missing" if not os.path.exists(path) else "not executable")
    found = sorted(os.path.relpath(os.path.join(d, f), prefix)
                   for d, _, fs in os.walk(prefix) for f in fs)
    # libmoe-client: the libraries, its one header and its pkg-config file,
    # under the build's libdir (lib or lib/<multiarch>).
    pcs = [f for f in found if f.endswith("pkgconfig/moe-client.pc")]
    check("installed moe-client.pc", len(pcs) == 1, found)
    libdir = os.path.dirname(os.path.dirname(pcs[0])) if pcs else "lib"
    client = [f"{libdir}/libmoe-client.so", f"{libdir}/libmoe-client.so.1",
              f"{libdir}/libmoe-client.so.1.0.0", f"{libdir}/libmoe-client.a",
              f"{libdir}/pkgconfig/moe-client.pc", "include/moe_client.h"]
    for rel in client:
        check(f"installed {rel}", os.path.exists(f"{prefix}/{rel}"), "missing")
    extra = [f for f in found if f not in want and f not in client]
    check("nothing else installed", not extra, str(extra))
    test_client_install(prefix, libdir, tmp)
    unit = read(f"{prefix}/lib/systemd/system/moed.service")
    check("moed.service runs the installed moed",
          f"ExecStart={prefix}/sbin/moed --config /etc/moed/moed.conf\n" in unit,
          re.findall(r"ExecStart=.*", unit))
    check("moed.service has no @VARIABLE@ left", not re.search(r"@[A-Z_]+@", unit),
          re.findall(r"@[A-Z_]+@", unit))
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "User=moed",
                "RuntimeDirectory=moed", "LimitMEMLOCK=infinity", "DevicePolicy=closed",
                "SystemCallFilter=io_uring_setup io_uring_enter io_uring_register"):
        check(f"moed.service: {key}", re.search(rf"^{re.escape(key)}$", unit, re.M) is not None)
    check("moed.service: no PrivateDevices (it hides the GPUs)",
          not re.search(r"^PrivateDevices=", unit, re.M))
    sock = read(f"{prefix}/lib/systemd/system/moed.socket")
    check("moed.socket listens on /run/moed/moed.sock",
          "ListenStream=/run/moed/moed.sock\n" in sock and "SocketMode=0660\n" in sock)
    example = read(f"{prefix}/share/doc/moed/moed.conf.example")
    check("the example configuration names the socket moed.socket listens on",
          re.search(r"^socket = /run/moed/moed.sock$", example, re.M) is not None)
    test_docs(a, prefix)
    return prefix


# ---- man pages, completion, --help ----

def man_text(path):
    """The page as groff renders it (plain text), and its warnings."""
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-cbou", path],
                       capture_output=True, text=True)
    return p.stdout.replace("\u2010", "-").replace("\u2212", "-"), p.stderr.strip(), p.returncode


def test_docs(a, prefix):
    """The man pages render without warnings and list every option and key
    that `moed --help` and `moectl COMMAND --help` give; the completion
    completes commands and each command's flags; moed --help is one column."""
    h = subprocess.run([a.moed, "--help"], capture_output=True, text=True).stdout
    opts = [x for x in h.splitlines() if re.match(r"^  -", x)]
    # an option and its description from column 31, or a long option alone
    bad = [x for x in opts if "  " in x[2:] and not (x[28:30] == "  " and x[30] != " ")]
    conts = [x for x in h[h.find("Options:"):].splitlines() if x.startswith("   ")]
    bad += [x for x in conts if not re.match(r"^ {30}\S", x)]
    check("moed --help: one column, every description at column 31",
          len(opts) > 40 and not bad, "\n".join(bad[:5]))
    check("moed --help: lines of at most 80 columns",
          all(len(x) <= 80 for x in h.splitlines()),
          [x for x in h.splitlines() if len(x) > 80][:3])
    flags = sorted(set(re.findall(r"^  (?:-h, )?(--[a-z0-9-]+)", h, re.M)))
    keys = [f[2:].replace("-", "_") for f in flags
            if f not in ("--config", "--check-config", "--model", "--peer", "--help",
                         "--version")]
    if not shutil.which("groff"):
        skip("man pages", "groff is not installed (scripts/deps.sh installs groff-base)")
        return
    pages = {}
    for rel in ("man8/moed.8", "man1/moectl.1", "man5/moed.conf.5"):
        text, warn, rc = man_text(f"{prefix}/share/man/{rel}")
        check(f"{rel}: groff renders it without warnings", rc == 0 and not warn and text, warn)
        pages[rel] = text
    miss = [f for f in flags if f not in pages["man8/moed.8"]]
    check("moed(8) lists every option of moed --help", not miss, miss)
    miss = [k for k in keys if not re.search(rf"^\s+{k} = ", pages["man5/moed.conf.5"], re.M)]
    check("moed.conf(5) lists every key", len(keys) > 40 and not miss, miss)
    m = subprocess.run([a.moectl, "--help"], capture_output=True, text=True).stdout
    cmds = re.findall(r"^  ([a-z][a-z-]+)  ", m, re.M)
    comp = f"{prefix}/share/bash-completion/completions/moectl"
    miss, fmiss = [], []
    for c in cmds:
        if not re.search(rf"^\s+{re.escape(c)}\b", pages["man1/moectl.1"], re.M):
            miss.append(c)
        ch = subprocess.run([a.moectl, c, "--help"], capture_output=True, text=True).stdout
        own = set(re.findall(r"^\s+(--[a-z][a-z0-9-]+)", ch, re.M))
        own |= set(re.findall(r"\[(--[a-z][a-z0-9-]+)", ch))
        p = subprocess.run(["bash", "-c", f"source {comp}; COMP_WORDS=(moectl {c} --); "
                            "COMP_CWORD=2; _moectl; echo ${COMPREPLY[@]}"],
                           capture_output=True, text=True)
        got = set(p.stdout.split())
        fmiss += [f"{c} {f}" for f in sorted(own - got)]
        for f in sorted(own):
            if f not in pages["man1/moectl.1"] and f != "--help":
                miss.append(f"{c} {f}")
    check("moectl(1) names every command and its flags", cmds and not miss, miss)
    check("the completion offers every flag of each command's --help", not fmiss, fmiss)
    for words, cword, want in ((["moectl", "st"], 1, {"stats", "status"}),
                               (["moectl", "gen-model", "--ar"], 2, {"--arch"}),
                               (["moectl", "gen-model", "--arch", "q"], 3,
                                {"qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe"}),
                               (["moectl", "peer", ""], 2, {"add", "remove"}),
                               (["moectl", "bench", "--transport", ""], 3, {"grpc", "shm"})):
        p = subprocess.run(["bash", "-c", f"source {comp}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
                            f"COMP_CWORD={cword}; _moectl; echo ${{COMPREPLY[@]}}"],
                           capture_output=True, text=True)
        check(f"completion: {' '.join(words)!r} -> {sorted(want)}",
              p.returncode == 0 and set(p.stdout.split()) == want, p.stdout + p.stderr)
    check("completion: registered for moectl", "complete -F _moectl moectl" in read(comp))


def test_verify(prefix, tmp):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        skip("systemd-analyze verify", "systemd-analyze is not installed (package systemd)")
        return
    units = f"{prefix}/lib/systemd/system"
    # Can it run here at all?  A unit with nothing to say about.
    base = f"{tmp}/baseline"
    os.makedirs(base)
    with open(f"{base}/moed-baseline.service", "w") as f:
        f.write("[Unit]\nDescription=baseline\n[Service]\nExecStart=/bin/true\n")
    try:
        p = subprocess.run([analyze, "verify", f"{base}/moed-baseline.service"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        skip("systemd-analyze verify", "it did not finish on a trivial unit in 60 s")
        return
    if p.returncode != 0:
        skip("systemd-analyze verify",
             f"it cannot run here (a trivial unit fails: {(p.stdout + p.stderr).strip()})")
        return
    noise = set((p.stdout + p.stderr).splitlines())
    p = subprocess.run([analyze, "verify", f"{units}/moed.service", f"{units}/moed.socket"],
                       capture_output=True, text=True, timeout=120)
    said = [line for line in (p.stdout + p.stderr).splitlines() if line not in noise]
    check("systemd-analyze verify moed.service moed.socket", p.returncode == 0 and not said,
          f"rc {p.returncode}: " + "\n".join(said))
    # A check that it would notice: a unit that is wrong.
    with open(f"{units}/moed.service") as f:
        bad = f.read().replace("WatchdogSec=30", "WatchdogSec=thirty")
    with open(f"{base}/moed.service", "w") as f:
        f.write(bad)
    p = subprocess.run([analyze, "verify", f"{base}/moed.service"], capture_output=True,
                       text=True, timeout=120)
    check("systemd-analyze verify notices a bad value", "thirty" in p.stdout + p.stderr,
          p.stdout + p.stderr)
    # Exposure 0 (locked down) to 10 (unprotected); --threshold counts tenths.
    p = subprocess.run([analyze, "security", "--offline=yes", "--threshold=30",
                        f"{units}/moed.service"], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for moed.service: ([\d.]+)", p.stdout + p.stderr)
    if p.returncode != 0 and not m:
        skip("systemd-analyze security", (p.stdout + p.stderr).strip()[-300:])
    else:
        check("systemd-analyze security: exposure at most 3.0", p.returncode == 0,
              m.group(0) if m else p.stdout[-300:])


def test_sysusers(prefix, tmp):
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    conf_u = f"{prefix}/lib/sysusers.d/moed.conf"
    conf_t = f"{prefix}/lib/tmpfiles.d/moed.conf"
    if not sysusers:
        skip("systemd-sysusers", "not installed (package systemd)")
        return
    root = f"{tmp}/root"
    os.makedirs(f"{root}/etc")
    p = subprocess.run([sysusers, f"--root={root}", "--dry-run", conf_u], capture_output=True,
                       text=True, timeout=60)
    out = p.stdout + p.stderr
    check("systemd-sysusers --dry-run parses moed.conf",
          p.returncode == 0 and "Creating user 'moed'" in out and "Failed" not in out, out)
    if os.geteuid() != 0:
        skip("systemd-tmpfiles --create", "needs root to give the directories their owner")
        return
    p = subprocess.run([sysusers, f"--root={root}", conf_u], capture_output=True, text=True,
                       timeout=60)
    check("systemd-sysusers --root creates moed", p.returncode == 0, p.stdout + p.stderr)
    uid = gid = None
    for line in read(f"{root}/etc/passwd").splitlines():
        f = line.split(":")
        if f[0] == "moed":
            uid, gid = int(f[2]), int(f[3])
            check("moed: home /var/lib/moed, no login shell",
                  f[5] == "/var/lib/moed" and f[6].endswith("nologin"), line)
    check("moed in the passwd of the root", uid is not None)
    if not tmpfiles or uid is None:
        skip("systemd-tmpfiles", "not installed (package systemd)")
        return
    p = subprocess.run([tmpfiles, f"--root={root}", "--create", conf_t], capture_output=True,
                       text=True, timeout=60)
    check("systemd-tmpfiles --create parses and applies moed.conf",
          p.returncode == 0 and not p.stderr.strip(), p.stdout + p.stderr)
    for path, mode in (("/run/moed", 0o755), ("/var/lib/moed", 0o750),
                       ("/var/lib/moed/models", 0o750), ("/var/cache/moed", 0o750)):
        try:
            st = os.stat(root + path)
        except FileNotFoundError:
            check(f"tmpfiles: {path}", False, "missing")
            continue
        check(f"tmpfiles: {path} {mode:04o} moed:moed",
              stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
              and st.st_uid == uid and st.st_gid == gid,
              f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}")


# ---- socket activation ----

def serve_checks(name, pb, pbg, hpb, hpbg, path, d, early):
    """Health and Forward on the passed socket; `early` is a call made
    before moed ran (a thread with its result)."""
    early.join(120)
    check(f"{name}: a client that connected before moed ran is served",
          early.result == hpb.HealthCheckResponse.SERVING, str(early.result))
    ch = channel(path)
    try:
        h = hpbg.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=30)
        check(f"{name}: Health SERVING on the passed socket",
              h.status == hpb.HealthCheckResponse.SERVING, str(h))
        x = np.random.default_rng(1).standard_normal((3, 64)).astype("f4")
        r = pbg.ExpertsStub(ch).Forward(pb.ForwardRequest(model="mix", layer=0,
                                                          hidden=tensor(pb, x)), timeout=30)
        check(f"{name}: Forward on the passed socket", list(r.output.shape) == [3, 64],
              str(r.output.shape))
    except grpc.RpcError as e:
        check(f"{name}: calls on the passed socket", False, f"{e.code()} {e.details()}")
    finally:
        ch.close()
    log = d.stderr()
    check(f"{name}: moed says the socket came from systemd",
          re.search(r"socket activation: serving the Unix socket systemd passed \(fd 3\) instead "
                    rf"of binding '{re.escape(path)}'", log) is not None, log)
    check(f"{name}: moed did not bind the path itself", "no socket passed" not in log, log)
    rc = d.stop()
    check(f"{name}: SIGTERM exits 0", rc == 0, f"rc {rc}: {d.stderr()}")
    check(f"{name}: the socket file is left to its owner", os.path.exists(path))


class EarlyCall(threading.Thread):
    """Health Check with wait_for_ready, started before moed runs."""

    def __init__(self, hpb, hpbg, path):
        super().__init__(daemon=True)
        self.hpb, self.hpbg, self.path, self.result = hpb, hpbg, path, None

    def run(self):
        ch = channel(self.path)
        try:
            self.result = self.hpbg.HealthStub(ch).Check(self.hpb.HealthCheckRequest(),
                                                         wait_for_ready=True, timeout=90).status
        except grpc.RpcError as e:
            self.result = f"{e.code()} {e.details()}"
        finally:
            ch.close()


def activate(fd, moed):
    """argv that runs moed with fd as fd 3 and LISTEN_PID its own pid (sh
    execs it, so $$ is moed's pid)."""
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    return ["/bin/sh", "-c", move + 'LISTEN_PID=$$ exec "$0" "$@"', moed]


def test_activation(a, tmp, model, protos):
    pb, pbg, hpb, hpbg = protos
    args = ["--listen", "none", "--model", f"mix={model}", "--log-level", "info"]

    # By systemd-socket-activate: it listens, and execs moed on the first
    # connection (the early call).
    sa = shutil.which("systemd-socket-activate")
    if sa:
        path = f"{tmp}/sa.sock"
        d = Moed([sa, "-l", path, a.moed] + args + ["--socket", path], "sa")
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        early = EarlyCall(hpb, hpbg, path)
        early.start()
        serve_checks("systemd-socket-activate", pb, pbg, hpb, hpbg, path, d, early)
    else:
        skip("systemd-socket-activate", "not installed (package systemd); emulated below only")

    # Emulated: we listen, and exec moed with the socket as fd 3; LISTEN_PID
    # must be moed's own pid, hence the exec from sh.
    path = f"{tmp}/emu.sock"
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(16)
    early = EarlyCall(hpb, hpbg, path)
    early.start()
    time.sleep(0.5)  # let it connect into the backlog
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="moed.socket")
    fd = ls.fileno()
    d = Moed(activate(fd, a.moed) + args + ["--socket", path], "emu", env=env,
             pass_fds=(fd,))
    ls.close()
    serve_checks("emulated activation", pb, pbg, hpb, hpbg, path, d, early)

    # A passed descriptor that is not a listening socket: closed, ignored,
    # and the configured path bound instead.
    path = f"{tmp}/fallback.sock"
    with open(f"{tmp}/not-a-socket", "w") as f:
        fd = f.fileno()
        d = Moed(activate(fd, a.moed) + args + ["--socket", path], "fallback",
                 env=env, pass_fds=(fd,))
    ok = d.wait_log(r"moed \S+ serving")
    ch = channel(path)
    try:
        h = hpbg.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=30)
        st = h.status
    except grpc.RpcError as e:
        st = f"{e.code()} {e.details()}"
    ch.close()
    log = d.stderr()
    check("not a socket: ignored with a warning, the path bound and served",
          ok and st == hpb.HealthCheckResponse.SERVING
          and "fd 3 is not a listening Unix stream socket" in log
          and f"binding '{path}'" in log, f"{st} {log}")
    rc = d.stop()
    check("not a socket: SIGTERM exits 0 and removes the socket moed bound",
          rc == 0 and not os.path.exists(path), f"rc {rc}")


# ---- logs ----

STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d moed\[\d+\] "
                     r"(error|warn|info|debug): ")
JOURNAL = re.compile(r"^<[3467]>(error|warn|info|debug): ")


def one_forward(pb, pbg, path):
    ch = channel(path)
    try:
        x = np.random.default_rng(2).standard_normal((3, 64)).astype("f4")
        pbg.ExpertsStub(ch).Forward(pb.ForwardRequest(model="mix", layer=0,
                                                      hidden=tensor(pb, x)), timeout=30)
        try:
            pbg.ExpertsStub(ch).Forward(pb.ForwardRequest(model="nope", layer=1,
                                                          hidden=tensor(pb, x)), timeout=30)
        except grpc.RpcError:
            pass
    finally:
        ch.close()


def test_logs(a, tmp, model, protos):
    """One prefix on every line: a timestamp and moed[PID] on a terminal or
    file, none but the priority under the journal (JOURNAL_STREAM naming
    stderr), JSON lines with log_format = json; sizes for people; at debug
    level one line per request."""
    import json
    pb, pbg = protos[0], protos[1]
    base = ["--listen", "none", "--model", f"mix={model}", "--host-cache-bytes", "12M",
            "--log-level", "debug"]

    p = subprocess.run([a.moed, "--frobnicate", "1"], capture_output=True, text=True)
    check("logs: a bad flag is logged with the prefix", p.returncode == 2
          and STAMPED.match(p.stderr) and "--frobnicate" in p.stderr, p.stderr)

    path = f"{tmp}/log-text.sock"
    d = Moed([a.moed] + base + ["--socket", path], "log-text")
    ok = d.wait_log(r"serving \d+ model")
    one_forward(pb, pbg, path)
    d.stop()
    lines = d.stderr().splitlines()
    bad = [x for x in lines if not STAMPED.match(x)]
    check("logs: every line has a timestamp and moed[PID]", ok and lines and not bad,
          "\n".join(bad[:5]))
    log = "\n".join(lines)
    check("logs: sizes for people (host cache 12 MiB)", "host cache 12 MiB" in log
          and not re.search(r"\d{5,} bytes", log), log[-1500:])
    req = [x for x in lines if "request:" in x]
    check("logs: at debug, one line per request: model, layer, tokens, transport, status, time",
          len(req) == 2 and re.search(r"request: model 'mix' layer 0, 3 tokens over grpc: OK in "
                                      r"\d+\.\d+ ms$", req[0])
          and "model (none loaded) layer 1, 0 tokens over grpc: NOT_FOUND" in req[1],
          "\n".join(req))

    # Under the journal: JOURNAL_STREAM names stderr's device and inode.
    name = "log-journal"
    open(f"{logdir}/{name}.log", "w").close()
    st = os.stat(f"{logdir}/{name}.log")
    path = f"{tmp}/log-j.sock"
    d = Moed([a.moed] + base + ["--socket", path], name,
             env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    ok = d.wait_log(r"serving \d+ model")
    d.stop()
    lines = d.stderr().splitlines()
    bad = [x for x in lines if not JOURNAL.match(x)]
    check("logs: under the journal, no timestamp: <priority>level: message",
          ok and lines and not bad and any(x.startswith("<6>info: moed ") for x in lines),
          "\n".join(bad[:5] or lines[:5]))
    # ... and not when stderr is not the stream JOURNAL_STREAM names
    d = Moed([a.moed] + base + ["--socket", path], "log-notjournal",
             env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev + 1}:{st.st_ino}"))
    ok = d.wait_log(r"serving \d+ model")
    d.stop()
    lines = d.stderr().splitlines()
    check("logs: JOURNAL_STREAM of another stream: timestamps",
          ok and lines and all(STAMPED.match(x) for x in lines), "\n".join(lines[:5]))

    # log_format = json, from the file
    conf = f"{logdir}/log-json.conf"
    with open(conf, "w") as f:
        f.write("[server]\nlog_format = json\n")
    path = f"{tmp}/log-json.sock"
    d = Moed([a.moed, "--config", conf] + base + ["--socket", path], "log-json")
    ok = d.wait_log(r"serving \d+ model")
    one_forward(pb, pbg, path)
    d.stop()
    objs, bad = [], []
    for x in d.stderr().splitlines():
        try:
            o = json.loads(x)
            objs.append(o)
            if not {"ts", "level", "msg"} <= set(o):
                bad.append(x)
        except ValueError:
            bad.append(x)
    check("logs: log_format = json: every line an object with ts, level, msg",
          ok and objs and not bad, "\n".join(bad[:5]))
    req = [o for o in objs if o.get("msg", "").startswith("request:")]
    check("logs: json request line has model, layer, tokens, transport, status, time_ms",
          len(req) == 2 and req[0].get("model") == "mix" and req[0].get("layer") == 0
          and req[0].get("tokens") == 3 and req[0].get("transport") == "grpc"
          and req[0].get("status") == "OK" and isinstance(req[0].get("time_ms"), float)
          and req[1].get("model") is None and req[1].get("status") == "NOT_FOUND",
          str(req))
    p = subprocess.run([a.moed, "--log-format", "xml"], capture_output=True, text=True)
    check("logs: --log-format xml refused", p.returncode == 2
          and "expected text or json" in p.stderr, p.stderr)


# ---- watchdog ----

def test_watchdog(a, tmp, model, big, protos):
    pb, pbg, hpb, hpbg = protos
    ns_path = f"{tmp}/notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(ns_path)
    msgs = []  # (monotonic time, message)
    stop = threading.Event()

    def reader():
        ns.settimeout(0.1)
        while not stop.is_set():
            try:
                m = ns.recv(4096).decode()
            except socket.timeout:
                continue
            msgs.append((time.monotonic(), m))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    usec = 100000
    env = dict(os.environ, NOTIFY_SOCKET=ns_path, WATCHDOG_USEC=str(usec))
    env.pop("WATCHDOG_PID", None)
    sock = f"{tmp}/wd.sock"
    d = Moed([a.moed, "--listen", "none", "--socket", sock, "--model", f"mix={model}",
              "--model", f"big={big}", "--threads", "1", "--workers", "1"],
             "watchdog", env=env)

    def texts():
        return [m for _, m in msgs]

    end = time.monotonic() + 60
    while time.monotonic() < end and not any("READY=1" in m for m in texts()):
        time.sleep(0.05)
    check("watchdog: READY=1", any("READY=1" in m for m in texts()), d.stderr())
    time.sleep(1.0)
    pings = [ts for ts, m in msgs if m == "WATCHDOG=1"]
    # Every half interval (50 ms), checked every quarter: about 20 in 1 s.
    check("watchdog: WATCHDOG=1 at least 10 times a second (WATCHDOG_USEC 100 ms)",
          len(pings) >= 10, f"{len(pings)} pings")

    # One batch much longer than the interval (one thread, one worker): the
    # scheduler makes no progress meanwhile, so the pings stop, then resume.
    ch = channel(sock)
    try:
        x = np.random.default_rng(2).standard_normal((4096, 512)).astype("f4")
        t0 = time.monotonic()
        pbg.ExpertsStub(ch).Forward(pb.ForwardRequest(model="big", layer=0,
                                                      hidden=tensor(pb, x)), timeout=300)
        t1 = time.monotonic()
    finally:
        ch.close()
    took = t1 - t0
    time.sleep(0.5)
    pings = [ts for ts, m in msgs if m == "WATCHDOG=1"]
    during = [b - a_ for a_, b in zip(pings, pings[1:]) if a_ >= t0 - 0.2 and b <= t1 + 0.3]
    log = d.stderr()
    if took < 0.5:
        skip("watchdog: stuck scheduler", f"the long batch took only {took:.2f} s here")
    else:
        check("watchdog: a batch longer than the interval withholds the ping (logged)",
              re.search(r"watchdog: the scheduler is stuck: \d+ requests pending and \d+ "
                        r"running, no batch finished for", log)
              and during and max(during) > 2 * usec / 1e6, f"batch {took:.2f} s, gaps "
              f"{[round(g, 2) for g in during]}; {log}")
        check("watchdog: pings resume once the batch is done",
              "watchdog: the scheduler moves again" in log
              and any(ts > t1 for ts in pings), log)
    rc = d.stop()
    time.sleep(0.2)
    stop.set()
    t.join()
    ns.close()
    check("watchdog: STOPPING=1 at SIGTERM, exit 0",
          rc == 0 and any("STOPPING=1" in m for m in texts()), f"rc {rc}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="the build directory to install from")
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--cmake", default="cmake")
    a = ap.parse_args()
    global logdir
    w = logdir = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    # Socket paths must fit in 108 bytes: keep them short, in /tmp.
    tmp = tempfile.mkdtemp(prefix="moed-sd-")
    try:
        prefix = test_install(a, w)
        if prefix:
            test_verify(prefix, w)
            test_sysusers(prefix, w)

        protos = stubs(a.source, w)
        if not protos:
            return finish()
        pb, pbg, hpb, hpbg = protos

        model, big = f"{w}/mix", f"{w}/big"
        subprocess.run([a.moectl, "gen-model", "--arch", "mixtral", "--layers", "1",
                        "--experts", "4", "--hidden", "64", "--ffn", "32", "--out", model, "-q"],
                       check=True)
        subprocess.run([a.moectl, "gen-model", "--arch", "mixtral", "--layers", "1",
                        "--experts", "4", "--hidden", "512", "--ffn", "2048", "--out", big,
                        "-q"], check=True)
        test_activation(a, tmp, model, protos)
        test_logs(a, tmp, model, protos)
        test_watchdog(a, tmp, model, big, protos)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finish()

if __name__ == "__main__":
    sys.exit(main())
