"""Python message classes of moed's gRPC API, generated from the copy of
proto/moe.proto this package ships (moed/proto/moe.proto; a test checks it
equals the source tree's byte for byte).

They are generated on first use with grpc_tools (grpcio-tools on PyPI,
python3-grpc-tools in Debian), by the protoc that matches the installed
protobuf runtime, into a cache directory: ``$MOED_PROTO_CACHE``, else
``$XDG_CACHE_HOME/moed-client`` (``~/.cache/moed-client``), else a temporary
directory; keyed by the proto's hash and the protobuf version, so an upgrade
regenerates.  Only the messages are generated: the two methods used are
called by path (``channel.unary_unary``), which needs no generated stubs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from .errors import MoedError

PROTO = Path(__file__).resolve().parent / "proto" / "moe.proto"
_lock = threading.Lock()
_mod: ModuleType | None = None


def _cache_root() -> Path:
    env = os.environ.get("MOED_PROTO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "moed-client"


def _generate(dest: Path) -> None:
    try:
        from grpc_tools import protoc  # type: ignore
    except ImportError as e:
        raise MoedError(
            f"the remote session needs grpc_tools to generate its messages from moe.proto "
            f"({e}): pip install grpcio-tools (or apt-get install python3-grpc-tools)",
            "ENOPKG") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=dest.parent))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")  # protoc's own .proto files
    args = ["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={tmp}", PROTO.name]
    if protoc.main(args) != 0 or not (tmp / "moe_pb2.py").exists():
        raise MoedError(f"grpc_tools.protoc could not compile {PROTO}", "EPROTO")
    try:
        os.rename(tmp, dest)  # atomic: a concurrent generator's copy wins, same content
    except OSError:
        if not (dest / "moe_pb2.py").exists():
            raise


def messages() -> ModuleType:
    """The moe_pb2 module (moe.v1's message classes)."""
    global _mod
    with _lock:
        if _mod is not None:
            return _mod
        try:
            import google.protobuf as pb
            pbver = pb.__version__
        except ImportError:
            raise MoedError("the remote session needs protobuf and grpcio: pip install grpcio "
                            "protobuf (or apt-get install python3-grpcio python3-protobuf)",
                            "ENOPKG") from None
        key = hashlib.sha256(PROTO.read_bytes() + pbver.encode()).hexdigest()[:16]
        mod_file = None
        for root in (_cache_root(), Path(tempfile.gettempdir()) / f"moed-client-{os.getuid()}"):
            dest = root / f"pb-{key}"
            try:
                if not (dest / "moe_pb2.py").exists():
                    _generate(dest)
                mod_file = dest / "moe_pb2.py"
                break
            except OSError:
                continue  # read-only home: try the temporary directory
        if mod_file is None:
            raise MoedError("could not write the generated moe_pb2.py anywhere (set "
                            "MOED_PROTO_CACHE to a writable directory)", "EROFS")
        # A private module name: the caller's own moe_pb2 (tests, tools) may
        # be another generation of the same file, and both would register
        # moe.v1 in protobuf's default pool; the pool takes an identical file twice.
        spec = importlib.util.spec_from_file_location("moed._moe_pb2", mod_file)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["moed._moe_pb2"] = mod
        spec.loader.exec_module(mod)
        _mod = mod
        return mod
