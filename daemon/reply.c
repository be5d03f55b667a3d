/*
 * Answers on the gRPC wire shared by every handler (moed.h): the gRPC
 * status of an engine -errno, and a protobuf-c message packed into a reply.
 */
#include "moed.h"

#include <errno.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

int moed_grpc_status(int err)
{
    switch (err) {
    case 0:
        return GRPC_STATUS_OK;
    case -EINVAL:
    case -E2BIG:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case -ENOENT:
        return GRPC_STATUS_NOT_FOUND;
    case -EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case -EBUSY:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case -ENOSPC:
    case -ENOBUFS:
    case -ENOMEM:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case -ESHUTDOWN:
    case -EAGAIN:
        return GRPC_STATUS_UNAVAILABLE;
    case -EPERM:
    case -EACCES:
        return GRPC_STATUS_PERMISSION_DENIED;
    case -EIO:
    case -EBADMSG:
        return GRPC_STATUS_DATA_LOSS;
    case -ETIMEDOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case -ENOTRECOVERABLE: /* the device is lost (moed_fatal) */
        return GRPC_STATUS_INTERNAL;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* Packs any protobuf-c message and replies with it. */
static void pack_into(uint8_t *buf, void *m)
{
    protobuf_c_message_pack(m, buf);
}

void moed_reply_msg(struct moe_rpc_call *call, const ProtobufCMessage *m)
{
    /* Packed straight into the core's buffer: no copy of the tensors. */
    moe_rpc_reply_with(call, protobuf_c_message_get_packed_size(m), pack_into, (void *)m);
}
