"""What the moed integration tests share: the check/failure bookkeeping,
Python stubs generated from proto/ by grpc_tools (a gRPC client that is not
ours), and tensors to and from numpy.  Imported by daemon.py, metrics.py and
systemd.py (their directory is on sys.path when they run)."""
import os
import sys

import numpy as np
from grpc_tools import protoc

failures = []


def check(name, ok, detail=""):
    """Prints one result; a failure is remembered for finish()."""
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail and not ok else ''}")
    if not ok:
        failures.append(f"{name}: {detail}")


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
