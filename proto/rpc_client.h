/*
 * The gRPC client over the gRPC C core, of moectl and of moed's calls to its
 * peers: one channel to a daemon, unary calls with raw protobuf-c bytes, a
 * deadline, and the bearer token in the metadata; and the names of the gRPC
 * status codes (the one table of them).
 */
#ifndef MOED_PROTO_RPC_CLIENT_H
#define MOED_PROTO_RPC_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct moe_rpc_client;

struct moe_rpc_client_config {
    const char *target; /* "HOST:PORT" or "unix:PATH" */
    bool tls;
    const char *tls_ca;   /* PEM roots; NULL: the system's */
    const char *tls_cert; /* client certificate and key, optional */
    const char *tls_key;
    const char *token; /* sent as "authorization: Bearer <token>" */
    int timeout_ms;    /* per call; 0: 30 s */
};

/* 0, or -errno with msg (msg_len bytes) saying why. */
int moe_rpc_client_open(const struct moe_rpc_client_config *cfg, struct moe_rpc_client **ret,
                        char *msg, size_t msg_len);
void moe_rpc_client_close(struct moe_rpc_client *c);

/*
 * Calls method ("/moe.v1.Control/Status") with req (len bytes).  Returns the
 * gRPC status code (0 OK); on OK *resp (malloc'd, free it) holds *resp_len
 * bytes; otherwise msg holds the status details ("UNAVAILABLE: failed to
 * connect to all addresses" ...).
 */
int moe_rpc_client_call(struct moe_rpc_client *c, const char *method, const uint8_t *req,
                        size_t len, uint8_t **resp, size_t *resp_len, char *msg, size_t msg_len);

/* "OK", "INVALID_ARGUMENT", ... */
const char *moe_rpc_status_name(int status);

#endif
