"""moed: the Python client of moed, the daemon that serves the expert (MoE)
layers of Mixture-of-Experts models.

    import moed
    with moed.connect("/run/moed/shm.sock") as s:      # shared memory (libmoe-client)
        m = s.model()                                   # the only/first model
        y = s.forward(m, m.moe_layers[0], x)            # x: numpy or torch [..., hidden]
        p = s.submit(m, m.moe_layers[1], x2)            # returns at once
        y2 = p.wait()

    r = moed.connect_remote("10.0.0.5:50051")           # gRPC, the same calls

    moed.attach_experts(model, s)   # a transformers model's MoE blocks run in moed (moed.hf)

Errors are moed.MoedError subclasses carrying moed's message: ConnectionLost
(then reconnect()), SessionClosed, ModelNotFound, InvalidRequest, Timeout,
LibraryNotFound.  Importing moed needs numpy only: libmoe-client is loaded
by connect(), grpcio by connect_remote().
"""
from ._common import ModelInfo, PendingBase, Stats
from .errors import (ConnectionLost, InvalidRequest, LibraryNotFound, ModelNotFound, MoedError,
                     SessionClosed, Timeout)
from .hf import AttachError, attach_experts, detach_experts
from .remote import RemotePending, RemoteSession, connect_remote
from .session import Pending, Session, connect

__version__ = "0.1.0"

__all__ = [
    "connect", "connect_remote", "Session", "RemoteSession", "Pending", "RemotePending",
    "PendingBase", "ModelInfo", "Stats", "MoedError", "ConnectionLost", "SessionClosed",
    "ModelNotFound", "InvalidRequest", "Timeout", "LibraryNotFound", "attach_experts",
    "detach_experts", "AttachError", "__version__",
]
