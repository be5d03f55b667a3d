/*
 * moectl's gRPC client over the gRPC C core.
 *
 * Owns one channel (plaintext or TLS) and one completion queue.  Each call is
 * a single batch (send metadata, message and close; receive metadata, message
 * and status) plucked from the queue; the call's deadline bounds the wait, so
 * a call always ends.  Not thread-safe: one call at a time per client.
 *
 * grpc_init() is counted by the core: every open pairs with the
 * grpc_shutdown() of its close.
 */
#include "rpc_client.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Answers larger than this are refused by the core (RESOURCE_EXHAUSTED):
 * the daemon's own request cap is 64 MiB, outputs are as large as inputs. */
#define RPC_MAX_RECEIVE_BYTES (256 << 20)
/* PEM files larger than this are not certificates. */
#define RPC_MAX_PEM_BYTES (1 << 20)

struct moe_rpc_client {
    grpc_channel *channel;
    grpc_completion_queue *cq; /* pluck-only, one call at a time */
    char *auth;                /* "Bearer <token>", or NULL */
    int timeout_ms;            /* per call */
};

static void msgf(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void msgf(char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (!msg || !len)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
}

const char *moe_rpc_status_name(int status)
{
    static const char *const names[] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };

    if (status < 0 || (size_t)status >= sizeof(names) / sizeof(names[0]))
        return "UNKNOWN_STATUS";
    return names[status];
}

/* The gRPC core logs connection failures and the like on stderr; moectl
 * reports them once itself.  GRPC_VERBOSITY=debug|info|error brings the
 * core's own log back. */
static void quiet_log(gpr_log_func_args *args)
{
    (void)args;
}

/* Reads a whole PEM file into a NUL-terminated string (free it).  0, or
 * -errno with msg. */
static int read_pem(const char *what, const char *path, char **ret, char *msg, size_t msg_len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0;
    int r;

    if (!f) {
        r = -errno;
        msgf(msg, msg_len, "cannot open %s '%s': %s", what, path, strerror(errno));
        return r;
    }
    buf = malloc(RPC_MAX_PEM_BYTES + 1);
    if (!buf) {
        r = -ENOMEM;
        msgf(msg, msg_len, "out of memory reading %s '%s'", what, path);
        goto out;
    }
    n = fread(buf, 1, RPC_MAX_PEM_BYTES + 1, f);
    if (ferror(f)) {
        r = -EIO;
        msgf(msg, msg_len, "cannot read %s '%s': %s", what, path, strerror(errno));
        goto out;
    }
    if (n > RPC_MAX_PEM_BYTES) {
        r = -EFBIG;
        msgf(msg, msg_len, "%s '%s' is larger than %d bytes: not a PEM file", what, path,
             RPC_MAX_PEM_BYTES);
        goto out;
    }
    if (n == 0 || !memmem(buf, n, "-----BEGIN ", 11)) {
        r = -EINVAL;
        msgf(msg, msg_len, "%s '%s' is not a PEM file (no '-----BEGIN ' line)", what, path);
        goto out;
    }
    buf[n] = '\0';
    *ret = buf;
    buf = NULL;
    r = 0;
out:
    free(buf);
    fclose(f);
    return r;
}

static grpc_channel_credentials *tls_credentials(const struct moe_rpc_client_config *cfg, char *msg,
                                                 size_t msg_len, int *ret_r)
{
    grpc_channel_credentials *creds = NULL;
    grpc_ssl_pem_key_cert_pair pair;
    char *ca = NULL, *cert = NULL, *key = NULL;
    int r;

    if (!cfg->tls_cert != !cfg->tls_key) {
        msgf(msg, msg_len, "a client certificate needs both --tls-cert and --tls-key");
        *ret_r = -EINVAL;
        return NULL;
    }
    if (cfg->tls_ca && (r = read_pem("CA file", cfg->tls_ca, &ca, msg, msg_len)) < 0)
        goto out;
    if (cfg->tls_cert && (r = read_pem("certificate", cfg->tls_cert, &cert, msg, msg_len)) < 0)
        goto out;
    if (cfg->tls_key && (r = read_pem("key", cfg->tls_key, &key, msg, msg_len)) < 0)
        goto out;
    pair.private_key = key;
    pair.cert_chain = cert;
    creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
    r = 0;
    if (!creds) {
        r = -EINVAL;
        msgf(msg, msg_len, "cannot set up TLS with these files");
    }
out:
    /* The credentials keep their own copies. */
    free(ca);
    free(cert);
    free(key);
    *ret_r = r;
    return creds;
}

int moe_rpc_client_open(const struct moe_rpc_client_config *cfg, struct moe_rpc_client **ret,
                        char *msg, size_t msg_len)
{
    struct moe_rpc_client *c;
    grpc_channel_credentials *creds;
    grpc_arg args[1];
    grpc_channel_args cargs = {.num_args = 1, .args = args};
    int r = 0;

    if (!cfg->target || !*cfg->target) {
        msgf(msg, msg_len, "no address to connect to");
        return -EINVAL;
    }
    if (cfg->token && strpbrk(cfg->token, "\r\n")) {
        msgf(msg, msg_len, "the token holds a line break");
        return -EINVAL;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        msgf(msg, msg_len, "out of memory");
        return -ENOMEM;
    }
    c->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
    if (cfg->token && *cfg->token) {
        size_t n = strlen(cfg->token) + sizeof("Bearer ");

        c->auth = malloc(n);
        if (!c->auth) {
            free(c);
            msgf(msg, msg_len, "out of memory");
            return -ENOMEM;
        }
        snprintf(c->auth, n, "Bearer %s", cfg->token);
    }

    if (!getenv("GRPC_VERBOSITY"))
        gpr_set_log_function(quiet_log);
    grpc_init();
    if (cfg->tls)
        creds = tls_credentials(cfg, msg, msg_len, &r);
    else
        creds = grpc_insecure_credentials_create();
    if (!creds) {
        if (r == 0) {
            r = -ENOMEM;
            msgf(msg, msg_len, "cannot create channel credentials");
        }
        goto out_shutdown;
    }
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = RPC_MAX_RECEIVE_BYTES;
    c->channel = grpc_channel_create(cfg->target, creds, &cargs);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    if (!c->channel || !c->cq) {
        r = -ENOMEM;
        msgf(msg, msg_len, "cannot create a channel to '%s'", cfg->target);
        goto out_shutdown;
    }
    *ret = c;
    return 0;
out_shutdown:
    if (c->cq)
        grpc_completion_queue_destroy(c->cq);
    if (c->channel)
        grpc_channel_destroy(c->channel);
    grpc_shutdown();
    free(c->auth);
    free(c);
    return r;
}

void moe_rpc_client_close(struct moe_rpc_client *c)
{
    grpc_event ev;

    if (!c)
        return;
    grpc_completion_queue_shutdown(c->cq);
    /* A pluck queue's pending events are gone once every call ended; wait
     * for the shutdown event all the same. */
    do {
        ev = grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    } while (ev.type != GRPC_QUEUE_SHUTDOWN);
    grpc_completion_queue_destroy(c->cq);
    grpc_channel_destroy(c->channel);
    grpc_shutdown();
    free(c->auth);
    free(c);
}

/* Copies a received byte buffer into one malloc'd block: each slice once,
 * straight into it (readall would join the slices into a block of its own
 * first, a second copy of a large answer). */
static int copy_message(grpc_byte_buffer *bb, uint8_t **ret, size_t *ret_len)
{
    grpc_byte_buffer_reader reader;
    grpc_slice s;
    size_t n, at = 0;
    uint8_t *p;

    if (!grpc_byte_buffer_reader_init(&reader, bb))
        return -EINVAL;
    /* The decompressed length: the reader's slices add up to it. */
    n = grpc_byte_buffer_length(reader.buffer_out);
    p = malloc(n ? n : 1);
    if (!p) {
        grpc_byte_buffer_reader_destroy(&reader);
        return -ENOMEM;
    }
    while (grpc_byte_buffer_reader_next(&reader, &s)) {
        size_t k = GRPC_SLICE_LENGTH(s);

        if (k > n - at) {
            grpc_slice_unref(s);
            grpc_byte_buffer_reader_destroy(&reader);
            free(p);
            return -EINVAL;
        }
        memcpy(p + at, GRPC_SLICE_START_PTR(s), k);
        at += k;
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_reader_destroy(&reader);
    *ret = p;
    *ret_len = at;
    return 0;
}

int moe_rpc_client_call(struct moe_rpc_client *c, const char *method, const uint8_t *req,
                        size_t len, uint8_t **resp, size_t *resp_len, char *msg, size_t msg_len)
{
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata auth_md;
    grpc_byte_buffer *send = NULL, *recv = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_slice method_slice, body;
    grpc_call *call;
    grpc_op ops[6], *op = ops;
    grpc_call_error ce;
    grpc_event ev;
    gpr_timespec deadline;
    int tag, r;

    *resp = NULL;
    *resp_len = 0;
    if (msg && msg_len)
        msg[0] = '\0';
    deadline = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                            gpr_time_from_millis(c->timeout_ms, GPR_TIMESPAN));
    method_slice = grpc_slice_from_static_string(method);
    call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, method_slice,
                                    NULL, deadline, NULL);
    if (!call) {
        msgf(msg, msg_len, "INTERNAL: cannot create a call to %s", method);
        return GRPC_STATUS_INTERNAL;
    }
    body = grpc_slice_from_copied_buffer((const char *)req, len);
    send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    memset(ops, 0, sizeof(ops));
    memset(&auth_md, 0, sizeof(auth_md));

    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->auth) {
        auth_md.key = grpc_slice_from_static_string("authorization");
        auth_md.value = grpc_slice_from_static_string(c->auth);
        op->data.send_initial_metadata.count = 1;
        op->data.send_initial_metadata.metadata = &auth_md;
    }
    op++;
    op->op = GRPC_OP_SEND_MESSAGE;
    op->data.send_message.send_message = send;
    op++;
    op->op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    op++;
    op->op = GRPC_OP_RECV_INITIAL_METADATA;
    op->data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    op++;
    op->op = GRPC_OP_RECV_MESSAGE;
    op->data.recv_message.recv_message = &recv;
    op++;
    op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op->data.recv_status_on_client.trailing_metadata = &trailing_md;
    op->data.recv_status_on_client.status = &status;
    op->data.recv_status_on_client.status_details = &details;
    op->data.recv_status_on_client.error_string = &error_string;
    op++;

    ce = grpc_call_start_batch(call, ops, (size_t)(op - ops), &tag, NULL);
    if (ce != GRPC_CALL_OK) {
        msgf(msg, msg_len, "INTERNAL: cannot start the call to %s (call error %d)", method,
             (int)ce);
        status = GRPC_STATUS_INTERNAL;
        goto out;
    }
    /* The deadline ends the call, so this returns; the infinite wait here
     * only avoids racing it. */
    ev = grpc_completion_queue_pluck(c->cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE || !ev.success) {
        msgf(msg, msg_len, "INTERNAL: the call to %s did not complete", method);
        status = GRPC_STATUS_INTERNAL;
        goto out;
    }
    if (status != GRPC_STATUS_OK) {
        char *d = grpc_slice_to_c_string(details);

        msgf(msg, msg_len, "%s: %s", moe_rpc_status_name(status),
             d && *d ? d : (error_string ? error_string : "(no details)"));
        gpr_free(d);
        goto out;
    }
    if (!recv) {
        msgf(msg, msg_len, "INTERNAL: %s answered OK without a message", method);
        status = GRPC_STATUS_INTERNAL;
        goto out;
    }
    r = copy_message(recv, resp, resp_len);
    if (r < 0) {
        msgf(msg, msg_len, "RESOURCE_EXHAUSTED: cannot hold the answer of %s: %s", method,
             strerror(-r));
        status = GRPC_STATUS_RESOURCE_EXHAUSTED;
    }
out:
    if (recv)
        grpc_byte_buffer_destroy(recv);
    grpc_byte_buffer_destroy(send);
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    grpc_call_unref(call);
    return (int)status;
}
