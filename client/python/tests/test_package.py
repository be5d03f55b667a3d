"""The package itself: the shipped proto, importing without libmoe-client,
the ctypes mirror of moe_client.h's structures."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from conftest import PKG, REPO


def test_proto_copy_is_current():
    """moed/proto/moe.proto is proto/moe.proto, byte for byte (cp proto/moe.proto
    client/python/moed/proto/ after changing the API)."""
    src = REPO / "proto" / "moe.proto"
    if not src.exists():
        pytest.skip("not in a source tree")
    assert (PKG / "moed" / "proto" / "moe.proto").read_bytes() == src.read_bytes(), \
        "client/python/moed/proto/moe.proto differs from proto/moe.proto: copy it over"


def test_import_without_library():
    """import moed needs no libmoe-client; connect() says how to point at it."""
    code = ("import moed\n"
            "try:\n    moed.connect('/nonexistent.sock')\n"
            "except moed.LibraryNotFound as e:\n    print('ERR', e)\n")
    env = dict(os.environ, MOED_CLIENT_LIB="/nonexistent/libmoe-client.so.1",
               PYTHONPATH=str(PKG))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "MOED_CLIENT_LIB" in r.stdout, r.stdout


def test_struct_layout():
    """Sizes and offsets of moe_client.h's structures on LP64 (as gcc lays them out)."""
    from moed import _lib
    assert ctypes.sizeof(_lib.SessionOpts) == 32
    assert ctypes.sizeof(_lib.ModelInfoC) == 160
    assert _lib.ModelInfoC.moe_layer.offset == 128
    assert ctypes.sizeof(_lib.Request) == 64
    assert _lib.Request.input.offset == 24 and _lib.Request.tag.offset == 56
    assert ctypes.sizeof(_lib.Completion) == 160
    assert _lib.Completion.queue_ns.offset == 32 and _lib.Completion.msg.offset == 56


def test_errors():
    import moed
    e = moed.InvalidRequest("bad", "EINVAL")
    assert isinstance(e, moed.MoedError) and isinstance(e, ValueError)
    assert (e.code, e.message) == ("EINVAL", "bad") and "bad" in str(e)
    assert issubclass(moed.ConnectionLost, ConnectionError)
    assert issubclass(moed.ModelNotFound, LookupError)
    assert issubclass(moed.Timeout, TimeoutError)


def test_descriptor_is_current():
    """moed/proto/moe.desc was made from the shipped moe.proto (python3 -m
    moed._proto --write regenerates it), and equals what protoc makes of it."""
    from moed import _proto
    assert _proto.DESC_HASH.read_text().split()[0] == _proto.proto_hash(), \
        "moe.desc is stale: run python3 -m moed._proto --write in client/python"
    fresh = _proto.compile_descriptor()
    if fresh is None:
        pytest.skip("grpc_tools not installed")
    from google.protobuf import descriptor_pb2
    parse = descriptor_pb2.FileDescriptorProto.FromString
    assert parse(fresh) == parse(_proto.DESC.read_bytes())


def test_messages_without_grpc_tools():
    """The remote session's messages come from the shipped descriptor where
    grpc_tools is missing."""
    pytest.importorskip("google.protobuf")
    code = ("import sys; sys.modules['grpc_tools'] = None\n"
            "from moed import _proto\n"
            "pb = _proto.messages()\n"
            "r = pb.ForwardRequest(model='m', layer=3)\n"
            "r.hidden.dtype = pb.DTYPE_BF16\n"
            "print(pb.ForwardRequest.FromString(r.SerializeToString()).layer, pb.DTYPE_BF16)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(PKG)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "2"]
