/*
 * A small gRPC server over the gRPC C core (grpc/grpc.h): a completion queue,
 * raw byte buffers in and out (the messages are protobuf-c, encoded and
 * decoded by the handlers), unary and bidirectional-streaming methods.
 *
 * Threads: cfg.n_threads threads share one completion queue (see rpc.c).
 * Handlers run on those threads and must not block for long: a handler that
 * has to wait (a forward waiting for its batch) keeps the call and answers
 * later, from any thread, with moe_rpc_reply / moe_rpc_fail.
 *
 * Unary methods: the handler is called once with the request; exactly one
 * of moe_rpc_reply (status OK) or moe_rpc_fail ends the call.
 * Streaming methods (bidi, e.g. ForwardStream): the handler is called for
 * each message the client sends, in order; every moe_rpc_reply sends one
 * message (in the order called); when the client has half-closed and every
 * message handed to the handler has been replied to, the call ends with OK.
 * moe_rpc_fail ends the stream at once with that status.  The next message
 * is read only after the previous one has been replied to (one in flight
 * per stream, so replies keep the request order).
 *
 * The call handed to a handler stays valid until the moe_rpc_reply or
 * moe_rpc_fail that answers that message (exactly one per message handed
 * over); do not touch it afterwards.  Answering a call the client has
 * cancelled, or one cut by moe_rpc_server_shutdown, is allowed: the answer
 * is dropped (also after moe_rpc_server_free, whose memory lives until the
 * last such answer).
 *
 * Auth: with cfg.token set, methods marked `mutating` need the metadata
 * "authorization: Bearer <token>", else UNAUTHENTICATED.  TLS from PEM
 * files (cfg.tls_*), client certificates optional or required; TLS is for
 * cfg.listen only: the Unix socket is plaintext, guarded by its mode 0660
 * (a stale socket file is replaced, a live one is an error, and the file is
 * removed at shutdown).  Methods not in the table get UNIMPLEMENTED.
 *
 * Socket activation: the core cannot adopt a listening socket, only
 * connected ones, so a thread accepts on cfg.listen_fd and hands every
 * connection to grpc_server_add_channel_from_fd (plaintext, like the
 * socket path).  It stops accepting when shutdown begins; connections that
 * arrive later wait in the backlog of the socket, which systemd keeps open
 * for the next start.
 *
 * Limits: requests larger than cfg.max_message_bytes are refused by the
 * core with RESOURCE_EXHAUSTED.
 */
#ifndef MOED_DAEMON_RPC_H
#define MOED_DAEMON_RPC_H

#include "common.h"

#include <stdarg.h>

struct moe_rpc_server;
struct moe_rpc_call;

/* req: the message bytes (valid during the call only).  arg: method's arg. */
typedef void (*moe_rpc_handler)(struct moe_rpc_call *call, const uint8_t *req, size_t len,
                                void *arg);

struct moe_rpc_method {
    const char *path; /* "/moe.v1.Experts/Forward" */
    bool streaming;   /* bidirectional stream */
    bool mutating;    /* needs the bearer token when one is configured */
    moe_rpc_handler fn;
    void *arg;
};

struct moe_rpc_config {
    const char *listen;    /* "127.0.0.1:50051", or NULL for none */
    const char *unix_path; /* a Unix socket path, or NULL for none */
    /* Socket activation: with has_listen_fd, listen_fd is a listening Unix
     * stream socket passed by systemd (sd_listen_fds), served instead of
     * binding unix_path.  The server takes it over in every case (closed by
     * moe_rpc_server_free, or by a failed start).  A flag rather than -1 for
     * none: fd 0 is a valid socket (StandardInput=socket passes it there) and
     * a zero-initialised config must pass nothing. */
    bool has_listen_fd;
    int listen_fd;
    const char *tls_cert; /* PEM files; all NULL: plaintext */
    const char *tls_key;
    const char *tls_client_ca; /* verify client certificates against it */
    bool require_client_cert;
    const char *token;        /* bearer token for mutating calls, or NULL */
    size_t max_message_bytes; /* 0: 64 MiB */
    int n_threads;            /* 0: 2 */
};

/* Binds and starts serving.  0, or -errno with err (address in use, bad
 * certificate files...). */
int moe_rpc_server_start(const struct moe_rpc_config *cfg, const struct moe_rpc_method *methods,
                         int n_methods, struct moe_rpc_server **ret, struct moe_error *err);
/* The port bound for cfg.listen (useful with port 0). */
int moe_rpc_server_port(const struct moe_rpc_server *s);

/* Answers one message: the call's (unary) or the next of the stream. */
void moe_rpc_reply(struct moe_rpc_call *call, const uint8_t *msg, size_t len);
/* The same for a message of len bytes that fill(buf, arg) writes straight
 * into the buffer handed to the core (no copy); fill runs before this
 * returns. */
void moe_rpc_reply_with(struct moe_rpc_call *call, size_t len,
                        void (*fill)(uint8_t *buf, void *arg), void *arg);
/* Ends the call with a gRPC status code (grpc_status_code values; OK is
 * turned into UNKNOWN) and a message for the caller. */
void moe_rpc_fail(struct moe_rpc_call *call, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The peer's address ("ipv4:127.0.0.1:5555", "unix:..."), for logs. */
const char *moe_rpc_peer(const struct moe_rpc_call *call);

/* Stops accepting new calls; calls in flight may finish for deadline_ms,
 * then are cancelled.  Returns when every call has ended on the wire (a
 * handler still holding one may answer it later: dropped). */
void moe_rpc_server_shutdown(struct moe_rpc_server *s, int deadline_ms);
/* Shuts down (0 ms) if not done, frees.  NULL is a no-op. */
void moe_rpc_server_free(struct moe_rpc_server *s);

/* Calls in flight now. */
int moe_rpc_server_in_flight(const struct moe_rpc_server *s);

#endif
