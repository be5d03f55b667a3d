"""What the moed integration tests share: the check/failure bookkeeping,
Python stubs generated from proto/ by grpc_tools (a gRPC client that is not
ours), tensors to and from numpy, and a moed started on a free port
(Daemon).  Imported by daemon.py, metrics.py, memory.py, warm.py and
systemd.py (their directory is on sys.path when they run)."""
import os
import re
import signal
import subprocess
import sys

import numpy as np

failures = []


def check(name, ok, detail=""):
    """Prints one result; a failure is remembered for finish().  Returns ok."""
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail and not ok else ''}")
    if not ok:
        failures.append(f"{name}: {detail}")
    return ok


def finish():
    """The exit status: 0 when every check passed."""
    if failures:
        print(f"{len(failures)} failed:")
        print("\n".join(failures))
        return 1
    print("all passed")
    return 0


def stubs(source, workdir):
    """(moe_pb2, moe_pb2_grpc, health_pb2, health_pb2_grpc) generated from
    source/proto into workdir/gen, or None when protoc fails."""
    from grpc_tools import protoc

    gen = f"{workdir}/gen"
    os.makedirs(gen, exist_ok=True)
    if protoc.main(["protoc", f"-I{source}/proto", f"--python_out={gen}",
                    f"--grpc_python_out={gen}", "moe.proto", "health.proto"]) != 0:
        check("grpc_tools.protoc compiles proto/moe.proto", False)
        return None
    sys.path.insert(0, gen)
    import moe_pb2
    import moe_pb2_grpc
    import health_pb2
    import health_pb2_grpc
    return moe_pb2, moe_pb2_grpc, health_pb2, health_pb2_grpc


def tensor(pb, x, dtype="f32"):
    """A moe.v1.Tensor of x: f32, bf16 (rounded to nearest even) or f16."""
    t = pb.Tensor()
    t.shape.extend(x.shape)
    if dtype == "f32":
        t.dtype = pb.DTYPE_F32
        t.data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    elif dtype == "bf16":
        t.dtype = pb.DTYPE_BF16
        u = np.ascontiguousarray(x, dtype="<f4").view("<u4")
        t.data = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    else:
        t.dtype = pb.DTYPE_F16
        t.data = np.ascontiguousarray(x, dtype="<f2").tobytes()
    return t


def from_tensor(pb, t):
    """A moe.v1.Tensor as a float32 numpy array."""
    shape = tuple(t.shape)
    if t.dtype == pb.DTYPE_F32:
        return np.frombuffer(t.data, dtype="<f4").reshape(shape)
    if t.dtype == pb.DTYPE_BF16:
        u = np.frombuffer(t.data, dtype="<u2").astype("<u4") << 16
        return u.view("<f4").reshape(shape)
    return np.frombuffer(t.data, dtype="<f2").astype("f4").reshape(shape)


def code_of(fn):
    """(status code, details) of calling fn: OK when it raises nothing."""
    import grpc
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


class Daemon:
    """moed listening on 127.0.0.1:0 with args, its stderr in
    workdir/name.log: port, addr (moectl's --remote), channel (a gRPC channel
    taking messages up to max_message bytes); with metrics, the metrics
    endpoint on a free port too (metrics_port).  Raises RuntimeError with
    the log when moed does not start."""

    def __init__(self, moed, args, workdir, name, metrics=False, max_message=256 << 20):
        import grpc
        self.logpath = f"{workdir}/{name}.log"
        self.log = open(self.logpath, "w+")
        extra = ["--metrics", "127.0.0.1:0"] if metrics else []
        self.p = subprocess.Popen([moed, "--listen", "127.0.0.1:0"] + extra + list(args),
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = self._port(r"listening on port (\d+)")
        self.metrics_port = self._port(r"metrics on port (\d+)") if metrics else None
        self.addr = ["--remote", f"127.0.0.1:{self.port}"]
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", max_message),
                                               ("grpc.max_send_message_length", max_message)])

    def _port(self, pattern):
        line = self.p.stdout.readline()
        m = re.search(pattern, line)
        if not m:
            self.p.kill()
            self.p.wait()
            raise RuntimeError(f"moed did not start: expected /{pattern}/, got {line!r}: "
                               f"{self.stderr()}")
        return int(m.group(1))

    def stderr(self):
        """What moed has written to its log so far."""
        self.log.flush()
        with open(self.logpath) as f:
            return f.read()

    text = stderr

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Sends sig and waits: moed's exit status, or -9 when it had to be
        killed after timeout seconds."""
        self.channel.close()
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return -9
