"""The message classes of moed's gRPC API, built at run time from
proto/moe.proto.

The package ships a copy of proto/moe.proto (moed/proto/moe.proto) and the
FileDescriptorProto protoc makes of it (moed/proto/moe.desc, with the
SHA-256 of the .proto it was made from in moe.desc.sha256); tests check both
against the source tree.  At first use the descriptor is compiled afresh from
the shipped .proto with grpc_tools when that is installed (grpcio-tools on
PyPI, python3-grpc-tools in Debian), else the shipped one is used.  The
classes are then made by the installed protobuf runtime from the descriptor
(message_factory), in a private descriptor pool: nothing depends on which
protoc or protobuf version generated what, no file is written, and a
caller's own moe_pb2 does not clash with ours.  The two methods used are
called by path (channel.unary_unary), so no generated gRPC stubs are needed.

Regenerate moe.desc after copying a new proto/moe.proto over:
    python3 -m moed._proto --write
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

from .errors import MoedError

DIR = Path(__file__).resolve().parent / "proto"
PROTO = DIR / "moe.proto"
DESC = DIR / "moe.desc"
DESC_HASH = DIR / "moe.desc.sha256"
_lock = threading.Lock()
_mod: SimpleNamespace | None = None
MESSAGES = ["Tensor", "Routing", "ForwardRequest", "ForwardResponse", "Timing", "ModelInfo",
            "ListModelsRequest", "ListModelsResponse"]


def proto_hash() -> str:
    return hashlib.sha256(PROTO.read_bytes()).hexdigest()


def compile_descriptor(proto: Path = PROTO) -> bytes | None:
    """proto's FileDescriptorProto, serialized, by grpc_tools' protoc; None
    without grpc_tools."""
    try:
        from grpc_tools import protoc  # type: ignore
    except ImportError:
        return None
    from google.protobuf import descriptor_pb2
    with tempfile.TemporaryDirectory(prefix="moed-proto-") as d:
        out = os.path.join(d, "moe.desc")
        if protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}",
                        proto.name]) != 0:
            raise MoedError(f"grpc_tools.protoc could not compile {proto}", "EPROTO")
        fds = descriptor_pb2.FileDescriptorSet.FromString(Path(out).read_bytes())
    return fds.file[0].SerializeToString()


def _descriptor() -> bytes:
    data = compile_descriptor()
    if data is not None:
        return data
    if DESC.exists() and DESC_HASH.exists() and \
            DESC_HASH.read_text().split()[0] == proto_hash():
        return DESC.read_bytes()
    raise MoedError(
        f"{DESC} was not made from {PROTO}, and grpc_tools is not installed to compile it: "
        "pip install grpcio-tools (or apt-get install python3-grpc-tools)", "ENOPKG")


def messages() -> SimpleNamespace:
    """moe.v1's message classes (ForwardRequest, ...) and DType values
    (DTYPE_F32, ...), as attributes."""
    global _mod
    with _lock:
        if _mod is not None:
            return _mod
        try:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        except ImportError:
            raise MoedError("the remote session needs protobuf and grpcio: pip install grpcio "
                            "protobuf (or apt-get install python3-grpcio python3-protobuf)",
                            "ENOPKG") from None
        pool = descriptor_pool.DescriptorPool()
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(_descriptor()))
        ns = SimpleNamespace()
        for name in MESSAGES:
            d = pool.FindMessageTypeByName(f"moe.v1.{name}")
            if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
                cls = message_factory.GetMessageClass(d)
            else:
                cls = message_factory.MessageFactory(pool).GetPrototype(d)
            setattr(ns, name, cls)
        for v in pool.FindEnumTypeByName("moe.v1.DType").values:
            setattr(ns, v.name, v.number)
        _mod = ns
        return ns


def _write() -> int:
    data = compile_descriptor()
    if data is None:
        print("grpc_tools is not installed", file=sys.stderr)
        return 1
    DESC.write_bytes(data)
    DESC_HASH.write_text(f"{proto_hash()}  moe.proto\n")
    print(f"wrote {DESC} ({len(data)} bytes) and {DESC_HASH}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        print(__doc__.split("Regenerate")[1].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(_write())
