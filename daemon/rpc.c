/*
 * A small gRPC server over the gRPC C core: see rpc.h for the contract.
 *
 * Threads: n_threads workers, all blocked in grpc_completion_queue_next on
 * one completion queue.  RPC_SLOTS_PER_METHOD
 * grpc_server_request_registered_call requests per worker are kept
 * outstanding for every method, and a slot is posted again as soon as it
 * matched a call.  One queue rather than one per worker: the thread whose
 * poll read a message is the one that finds its completion and runs the
 * handler (with a queue each, the core read on whichever thread polled and
 * then woke the queue's owner, one thread handoff more per call).  A call's
 * completions may therefore come on different threads; its state is under
 * its lock, and a stream has at most one read outstanding, so its messages
 * still reach the handler in order.
 *
 * Calls: struct moe_rpc_call, one per request slot and then per call.  Its
 * state (below) is guarded by call->lock.  Every grpc_call_start_batch on it
 * is made with call->lock held and only while !dead, so batches are
 * serialized as the core asks, and none is started once shutdown has marked
 * the call dead (the core aborts on a batch posted to a shut-down queue).
 * Replies come from any thread: moe_rpc_reply starts the SEND batch from the
 * replying thread, or queues the message when a send is still in flight (at
 * most one SEND_MESSAGE per call at a time).  A stream reads its next message
 * only once the reply to the previous one has been started, so at most one
 * message waits in the queue (and a slow client slows the stream down
 * instead of growing a queue).
 *
 * State machine, per call:
 *   requested --NEW--> reading (RECV_CLOSE_ON_SERVER outstanding until the end)
 *   reading --RECV msg--> in handler --reply--> sending (+ reading, streams)
 *   reading --RECV end of stream--> status OK sent once nothing is pending
 *   any --fail/unauthenticated--> status sent after the send in flight
 *   any --RECV_CLOSE--> dead: further replies are dropped
 *
 * Lifetime: call->refs counts one reference per batch outstanding in the core
 * (the NEW request, RECV_CLOSE, RECV_MESSAGE, SEND, status) and one while a
 * message is with the handler; the call is freed at zero, so a handler
 * answering a call the client has cancelled only drops its reference.  Every
 * call object holds a reference on the server (server->refs, plus one for
 * the owner), so a call outliving moe_rpc_server_free still finds its server.
 *
 * Calls to methods not registered are taken by grpc_server_request_call
 * slots (one per worker) and answered UNIMPLEMENTED; the core would
 * otherwise hold them until their deadline.
 *
 * Shutdown: stop posting requests, grpc_server_shutdown_and_notify, wait
 * for its tag until the deadline, then grpc_server_cancel_all_calls and wait
 * again; mark every call dead (under both locks), destroy the server, shut
 * the queue down and let the workers drain it, join.
 *
 * Socket activation: with cfg->has_listen_fd, an accept thread polls the
 * passed listening socket and a wakeup pipe; each connection (accept4,
 * non-blocking) goes to grpc_server_add_channel_from_fd, which owns it from
 * then on.  The thread reads s->server without the lock: it is set before
 * the thread starts, and shutdown joins the thread (stop_accepting) before
 * it shuts the server down or clears it.  The listening socket is never
 * shutdown(2): it is shared with systemd, which keeps it for the next start.
 *
 * Locks: server->lock, then call->lock; never the other way round.  Neither
 * is held while a handler runs.
 */
#include "rpc.h"

#include "log.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#define RPC_SLOTS_PER_METHOD 4
#define RPC_MAX_THREADS 64
#define RPC_DEFAULT_MAX_MESSAGE (64u << 20)
#define RPC_TLS_FILE_MAX (1u << 20)
#define RPC_STATUS_MSG_MAX 512
#define RPC_ACCEPT_BACKOFF_MS 100

/*
 * A tag handed to the core and returned by grpc_completion_queue_next
 * carries our writes to the thread that gets it, through the core's own
 * synchronization, which ThreadSanitizer does not see (the library is not
 * instrumented).  Tell it: release when posting a tag, acquire when a
 * completion returns it.
 */
#if defined(__SANITIZE_THREAD__)
#define RPC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RPC_TSAN 1
#endif
#endif
#ifdef RPC_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define tag_posted(t) __tsan_release(t)
#define tag_returned(t) __tsan_acquire(t)
#else
#define tag_posted(t) ((void)(t))
#define tag_returned(t) ((void)(t))
#endif

enum rpc_tag_kind {
    RPC_TAG_NEW,      /* request_registered_call matched a call */
    RPC_TAG_RECV,     /* RECV_MESSAGE */
    RPC_TAG_SEND,     /* SEND_MESSAGE (with the status for unary calls) */
    RPC_TAG_STATUS,   /* SEND_STATUS_FROM_SERVER alone */
    RPC_TAG_CLOSE,    /* RECV_CLOSE_ON_SERVER */
    RPC_TAG_SHUTDOWN, /* grpc_server_shutdown_and_notify */
};

/* What is passed to the core as a completion tag. */
struct rpc_tag {
    enum rpc_tag_kind kind;
    struct moe_rpc_call *call; /* NULL for RPC_TAG_SHUTDOWN */
};

struct rpc_method {
    struct moe_rpc_method m; /* m.path is ours (strdup) */
    void *handle;            /* from grpc_server_register_method */
};

/* Calls to methods not registered: answered UNIMPLEMENTED (without slots
 * for them, the core would keep such calls waiting forever). */
static const struct rpc_method unknown_method = {{"(unknown method)", false, false, NULL, NULL},
                                                 NULL};

struct rpc_worker {
    struct moe_rpc_server *s;
    int index;
    pthread_t thread;
    bool running; /* thread created (joined at shutdown) */
};

struct moe_rpc_server {
    grpc_server *server;       /* NULL once destroyed */
    grpc_completion_queue *cq; /* the workers'; shut down and destroyed by stop_workers */
    struct rpc_worker *workers;
    int n_workers;
    struct rpc_method *methods;
    int n_methods;
    char *auth;      /* "Bearer <token>", or NULL when no token */
    size_t auth_len; /* strlen(auth) */
    char *unix_path; /* the socket we bound, unlinked at shutdown; or NULL */
    int port;        /* bound TCP port, 0 without cfg->listen */
    /* Socket activation (see the top); all -1/NULL/false without it. */
    int listen_fd;                     /* passed listening socket, owned */
    int wake[2];                       /* pipe: a byte tells the accept thread to stop */
    grpc_server_credentials *fd_creds; /* insecure, for the accepted connections */
    pthread_t accept_thread;
    bool accepting; /* accept thread created (joined by stop_accepting) */
    bool grpc_inited;
    struct rpc_tag shutdown_tag;
    /* Owner's reference plus one per call object; acq_rel decrements. */
    atomic_int refs;
    /* Accepted calls not yet freed; relaxed, a statistic. */
    atomic_int in_flight;
    pthread_mutex_t lock;
    pthread_cond_t cond;        /* signals notified; CLOCK_MONOTONIC */
    bool stopping;              /* under lock: no new requests are posted */
    bool notified;              /* under lock: the shutdown tag came back */
    bool stopped;               /* under lock: shutdown finished */
    bool calls_dead;            /* under lock: calls may start no batch */
    struct moe_rpc_call *calls; /* under lock: accepted calls, a list */
};

struct moe_rpc_call {
    struct moe_rpc_server *s;
    struct rpc_worker *w;
    const struct rpc_method *m;
    /* Written by the core before RPC_TAG_NEW, then read-only. */
    grpc_call *gc;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* for unknown_method only */
    char *peer;                /* gpr_malloc'd by grpc_call_get_peer, or NULL */
    struct rpc_tag t_new, t_recv, t_send, t_status, t_close;
    /* Server's list of accepted calls; under s->lock. */
    struct moe_rpc_call *prev, *next;
    bool listed; /* under s->lock */

    pthread_mutex_t lock;
    /* Everything below is under lock. */
    int refs;
    grpc_byte_buffer *recv_buf;   /* RECV_MESSAGE target; a unary call's comes with NEW */
    grpc_byte_buffer *send_buf;   /* message of the SEND in flight */
    grpc_byte_buffer *queued_buf; /* reply waiting for the SEND in flight */
    int cancelled;                /* RECV_CLOSE_ON_SERVER result */
    bool md_sent;                 /* initial metadata sent (or in flight) */
    bool recv_in_flight;
    bool send_in_flight;
    bool handler_pending; /* a message is with the handler */
    bool half_closed;     /* no more messages to read */
    bool status_pending;  /* status decided, sent once the send is done */
    bool status_started;  /* SEND_STATUS_FROM_SERVER started */
    bool dead;            /* closed or shutting down: no more batches */
    int status_code;
    char *status_msg; /* or NULL */
};

static void server_put(struct moe_rpc_server *s);

/* ---- calls ---- */

static struct moe_rpc_call *call_new(struct rpc_worker *w, const struct rpc_method *m)
{
    struct moe_rpc_call *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->s = w->s;
    c->w = w;
    c->m = m;
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    c->t_new = (struct rpc_tag){RPC_TAG_NEW, c};
    c->t_recv = (struct rpc_tag){RPC_TAG_RECV, c};
    c->t_send = (struct rpc_tag){RPC_TAG_SEND, c};
    c->t_status = (struct rpc_tag){RPC_TAG_STATUS, c};
    c->t_close = (struct rpc_tag){RPC_TAG_CLOSE, c};
    pthread_mutex_init(&c->lock, NULL);
    c->refs = 1;
    /* Relaxed: the caller holds a reference, this only adds one. */
    atomic_fetch_add_explicit(&c->s->refs, 1, memory_order_relaxed);
    return c;
}

static void call_free(struct moe_rpc_call *c)
{
    struct moe_rpc_server *s = c->s;

    pthread_mutex_lock(&s->lock);
    if (c->listed) {
        if (c->prev)
            c->prev->next = c->next;
        else
            s->calls = c->next;
        if (c->next)
            c->next->prev = c->prev;
        atomic_fetch_sub_explicit(&s->in_flight, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&s->lock);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->gc)
        grpc_call_unref(c->gc);
    gpr_free(c->peer);
    if (c->recv_buf)
        grpc_byte_buffer_destroy(c->recv_buf);
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->queued_buf)
        grpc_byte_buffer_destroy(c->queued_buf);
    free(c->status_msg);
    pthread_mutex_destroy(&c->lock);
    free(c);
    server_put(s);
}

static void call_put(struct moe_rpc_call *c)
{
    int r;

    pthread_mutex_lock(&c->lock);
    r = --c->refs;
    pthread_mutex_unlock(&c->lock);
    if (r == 0)
        call_free(c);
}

/* Starts a batch; on success the batch holds a reference.  A refusal is
 * our bug (a batch the core does not accept in this state): log it and give
 * up on the call. */
static bool start_batch_locked(struct moe_rpc_call *c, const grpc_op *ops, size_t n,
                               struct rpc_tag *tag)
{
    grpc_call_error e;

    assert(!c->dead);
    tag_posted(tag);
    e = grpc_call_start_batch(c->gc, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        moe_log(MOE_LOG_ERROR, "rpc: %s: grpc_call_start_batch refused a batch (error %d)",
                c->m->m.path, (int)e);
        c->dead = true;
        grpc_call_cancel(c->gc, NULL);
        return false;
    }
    c->refs++;
    return true;
}

static void op_send_md(grpc_op *op)
{
    memset(op, 0, sizeof(*op));
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
}

static void start_recv_locked(struct moe_rpc_call *c)
{
    grpc_op op;

    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    if (start_batch_locked(c, &op, 1, &c->t_recv))
        c->recv_in_flight = true;
}

/* Reads the next message when the stream wants one. */
static void maybe_recv_locked(struct moe_rpc_call *c)
{
    if (c->dead || c->status_pending || c->status_started || c->half_closed || c->recv_in_flight ||
        c->handler_pending || c->queued_buf)
        return;
    start_recv_locked(c);
}

/* Sends bb (taken); unary calls send their status in the same batch. */
static void start_send_locked(struct moe_rpc_call *c, grpc_byte_buffer *bb)
{
    grpc_op ops[3];
    size_t n = 0;
    bool unary = !c->m->m.streaming;

    if (!c->md_sent)
        op_send_md(&ops[n++]);
    memset(&ops[n], 0, sizeof(ops[n]));
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = bb;
    if (unary) {
        memset(&ops[n], 0, sizeof(ops[n]));
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n++].data.send_status_from_server.status = GRPC_STATUS_OK;
    }
    if (!start_batch_locked(c, ops, n, &c->t_send)) {
        grpc_byte_buffer_destroy(bb);
        return;
    }
    c->md_sent = true;
    c->send_in_flight = true;
    c->send_buf = bb;
    if (unary)
        c->status_started = true;
}

static void start_status_locked(struct moe_rpc_call *c)
{
    grpc_op ops[2];
    size_t n = 0;
    grpc_slice details;

    if (!c->md_sent)
        op_send_md(&ops[n++]);
    memset(&ops[n], 0, sizeof(ops[n]));
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)c->status_code;
    if (c->status_msg) {
        details = grpc_slice_from_copied_string(c->status_msg);
        ops[n].data.send_status_from_server.status_details = &details;
    }
    n++;
    c->status_started = true;
    c->md_sent = true;
    start_batch_locked(c, ops, n, &c->t_status);
    /* The core copied the details in start_batch. */
    if (c->status_msg)
        grpc_slice_unref(details);
}

/* Moves the call on after any change: sends a queued reply, then the
 * status when one is due (a stream ends with OK once the client has
 * half-closed and every message was answered). */
static void progress_locked(struct moe_rpc_call *c)
{
    if (c->dead || c->status_started || c->send_in_flight)
        return;
    if (c->queued_buf) {
        grpc_byte_buffer *bb = c->queued_buf;

        c->queued_buf = NULL;
        start_send_locked(c, bb);
        maybe_recv_locked(c);
        return;
    }
    if (!c->status_pending && c->m->m.streaming && c->half_closed && !c->handler_pending &&
        !c->recv_in_flight) {
        c->status_pending = true;
        c->status_code = GRPC_STATUS_OK;
    }
    if (c->status_pending)
        start_status_locked(c);
}

/* Decides the status; sent after the send in flight, if any. */
static void finish_locked(struct moe_rpc_call *c, int code, const char *msg)
{
    if (c->status_pending || c->status_started)
        return;
    c->status_pending = true;
    c->status_code = code;
    free(c->status_msg);
    c->status_msg = msg ? strdup(msg) : NULL;
    progress_locked(c);
}

/*
 * gRPC core's own log lines (an internal error dump when a port is taken, say)
 * go through moed's log at debug level: moed reports what failed in its own
 * words.  The function is process-wide (cluster.c's channels use it too).
 */
static void grpc_log(gpr_log_func_args *a)
{
    moe_log(MOE_LOG_DEBUG, "grpc: %s (%s:%d)", a->message ? a->message : "",
            a->file ? a->file : "?", a->line);
}

/* What a call's bearer token is worth. */
enum auth_result {
    AUTH_OK,      /* no token needed, or the right one */
    AUTH_MISSING, /* needed, none given */
    AUTH_WRONG,   /* one given, not moed's */
};

static enum auth_result authorized(const struct moe_rpc_call *c)
{
    const struct moe_rpc_server *s = c->s;
    bool given = false;

    if (!s->auth || !c->m->m.mutating)
        return AUTH_OK;
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *md = &c->md.metadata[i];
        size_t len = GRPC_SLICE_LENGTH(md->value);
        const uint8_t *v = GRPC_SLICE_START_PTR(md->value);
        unsigned diff = 0;

        if (grpc_slice_str_cmp(md->key, "authorization") != 0)
            continue;
        given = true;
        if (len != s->auth_len)
            continue;
        /* Constant time over the length: no timing oracle on the token. */
        for (size_t k = 0; k < len; k++)
            diff |= (unsigned)(v[k] ^ (uint8_t)s->auth[k]);
        if (diff == 0)
            return AUTH_OK;
    }
    return given ? AUTH_WRONG : AUTH_MISSING;
}

/* ---- requests and completions (worker threads) ---- */

/* Posts one request slot for m on w; nothing once the server is stopping. */
static void post_request(struct rpc_worker *w, const struct rpc_method *m)
{
    struct moe_rpc_server *s = w->s;
    struct moe_rpc_call *c = call_new(w, m);
    grpc_call_error e = GRPC_CALL_ERROR;

    if (!c) {
        moe_log(MOE_LOG_ERROR,
                "rpc: %s: out of memory for a request slot; serving with one "
                "slot fewer",
                m->m.path);
        return;
    }
    /* Under s->lock: the server is not destroyed while we post. */
    tag_posted(&c->t_new);
    pthread_mutex_lock(&s->lock);
    if (!s->stopping && m == &unknown_method)
        e = grpc_server_request_call(s->server, &c->gc, &c->details, &c->md, s->cq, s->cq,
                                     &c->t_new);
    else if (!s->stopping)
        e = grpc_server_request_registered_call(s->server, m->handle, &c->gc, &c->deadline, &c->md,
                                                m->m.streaming ? NULL : &c->recv_buf, s->cq, s->cq,
                                                &c->t_new);
    pthread_mutex_unlock(&s->lock);
    if (e != GRPC_CALL_OK) {
        if (e != GRPC_CALL_ERROR)
            moe_log(MOE_LOG_ERROR, "rpc: %s: grpc_server_request_registered_call failed (%d)",
                    m->m.path, (int)e);
        call_put(c);
    }
}

static void on_recv(struct moe_rpc_call *c, bool ok);

static void on_new(struct moe_rpc_call *c, bool ok)
{
    struct moe_rpc_server *s = c->s;
    enum auth_result auth;
    bool deliver = false;
    grpc_op op;

    if (!ok) {
        /* A slot failed by the shutdown: never matched a call. */
        call_put(c);
        return;
    }
    post_request(c->w, c->m);
    c->peer = grpc_call_get_peer(c->gc);
    pthread_mutex_lock(&s->lock);
    c->next = s->calls;
    if (s->calls)
        s->calls->prev = c;
    s->calls = c;
    c->listed = true;
    atomic_fetch_add_explicit(&s->in_flight, 1, memory_order_relaxed);
    pthread_mutex_lock(&c->lock);
    /* A call whose NEW event is handled after shutdown marked the calls
     * dead must not start batches either. */
    if (s->calls_dead)
        c->dead = true;
    pthread_mutex_unlock(&s->lock);

    if (!c->dead) {
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &c->cancelled;
        start_batch_locked(c, &op, 1, &c->t_close);
    }
    if (!c->dead) {
        if (c->m == &unknown_method) {
            char msg[RPC_STATUS_MSG_MAX];
            char *path = grpc_slice_to_c_string(c->details.method);

            snprintf(msg, sizeof(msg), "unknown method '%s'", path);
            moe_log(MOE_LOG_DEBUG, "rpc: %s from %s, refused", msg, c->peer ? c->peer : "?");
            gpr_free(path);
            finish_locked(c, GRPC_STATUS_UNIMPLEMENTED, msg);
        } else if ((auth = authorized(c)) != AUTH_OK) {
            moe_log(MOE_LOG_INFO, "rpc: %s from %s: %s, refused", c->m->m.path,
                    c->peer ? c->peer : "?",
                    auth == AUTH_MISSING ? "no bearer token" : "wrong bearer token");
            finish_locked(c, GRPC_STATUS_UNAUTHENTICATED,
                          auth == AUTH_MISSING
                              ? "no token given: this method needs the metadata "
                                "'authorization: Bearer <token>'"
                              : "token refused: the token given in 'authorization: Bearer "
                                "<token>' is not moed's");
        } else if (!c->m->m.streaming) {
            /* The message came with the call: handled as a read's. */
            deliver = true;
            c->recv_in_flight = true;
            c->refs++; /* on_recv's, as a read's batch holds one */
        } else {
            start_recv_locked(c);
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (deliver)
        on_recv(c, true);
    /* The request's reference; the batches hold their own. */
    call_put(c);
}

static void on_recv(struct moe_rpc_call *c, bool ok)
{
    grpc_byte_buffer *bb;
    grpc_byte_buffer_reader reader;
    grpc_slice slice;

    pthread_mutex_lock(&c->lock);
    c->recv_in_flight = false;
    bb = c->recv_buf;
    c->recv_buf = NULL;
    if (!bb && ok && grpc_call_failed_before_recv_message(c->gc))
        ok = false; /* an error, not the end of the stream */
    if (!ok || c->dead || c->status_pending || c->status_started) {
        /* Cancelled (or too large: the core has failed the call). */
        pthread_mutex_unlock(&c->lock);
        if (bb)
            grpc_byte_buffer_destroy(bb);
        call_put(c);
        return;
    }
    if (!bb) {
        if (c->m->m.streaming) {
            c->half_closed = true;
            progress_locked(c);
        } else {
            finish_locked(c, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
        }
        pthread_mutex_unlock(&c->lock);
        call_put(c);
        return;
    }
    if (!c->m->m.streaming)
        c->half_closed = true;
    c->handler_pending = true;
    c->refs++; /* the handler's */
    pthread_mutex_unlock(&c->lock);

    if (!grpc_byte_buffer_reader_init(&reader, bb)) {
        grpc_byte_buffer_destroy(bb);
        moe_rpc_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "could not decompress the message");
        call_put(c);
        return;
    }
    slice = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    grpc_byte_buffer_destroy(bb);
    c->m->m.fn(c, GRPC_SLICE_START_PTR(slice), GRPC_SLICE_LENGTH(slice), c->m->m.arg);
    grpc_slice_unref(slice);
    call_put(c);
}

static void on_send(struct moe_rpc_call *c, bool ok)
{
    grpc_byte_buffer *bb;

    pthread_mutex_lock(&c->lock);
    bb = c->send_buf;
    c->send_buf = NULL;
    c->send_in_flight = false;
    if (ok)
        progress_locked(c);
    pthread_mutex_unlock(&c->lock);
    if (bb)
        grpc_byte_buffer_destroy(bb);
    call_put(c);
}

static void on_close(struct moe_rpc_call *c)
{
    grpc_byte_buffer *queued;

    pthread_mutex_lock(&c->lock);
    /* The call is over on the core's side: status sent, or cancelled. */
    c->dead = true;
    queued = c->queued_buf;
    c->queued_buf = NULL;
    if (c->cancelled)
        moe_log(MOE_LOG_DEBUG, "rpc: %s from %s: cancelled%s", c->m->m.path,
                c->peer ? c->peer : "?", c->handler_pending ? " while in the handler" : "");
    pthread_mutex_unlock(&c->lock);
    if (queued)
        grpc_byte_buffer_destroy(queued);
    call_put(c);
}

static void *worker_main(void *arg)
{
    struct rpc_worker *w = arg;
    struct moe_rpc_server *s = w->s;

    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        struct rpc_tag *t;

        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        t = ev.tag;
        tag_returned(t);
        switch (t->kind) {
        case RPC_TAG_NEW:
            on_new(t->call, ev.success);
            break;
        case RPC_TAG_RECV:
            on_recv(t->call, ev.success);
            break;
        case RPC_TAG_SEND:
            on_send(t->call, ev.success);
            break;
        case RPC_TAG_STATUS:
            call_put(t->call);
            break;
        case RPC_TAG_CLOSE:
            on_close(t->call);
            break;
        case RPC_TAG_SHUTDOWN:
            pthread_mutex_lock(&s->lock);
            s->notified = true;
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
            break;
        }
    }
    return NULL;
}

/* ---- replies (any thread) ---- */

/* Takes the handler's message back; false (and the reference dropped)
 * when the call can take no more replies. */
static bool take_handler_locked(struct moe_rpc_call *c, const char *what)
{
    if (!c->handler_pending) {
        moe_log(MOE_LOG_ERROR, "rpc: %s: %s without a message to answer, ignoring (a bug)",
                c->m->m.path, what);
        return false;
    }
    c->handler_pending = false;
    return true;
}

static void reply_bb(struct moe_rpc_call *call, grpc_byte_buffer *bb);

void moe_rpc_reply(struct moe_rpc_call *call, const uint8_t *msg, size_t len)
{
    grpc_slice slice = grpc_slice_from_copied_buffer((const char *)msg, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);

    grpc_slice_unref(slice);
    reply_bb(call, bb);
}

void moe_rpc_reply_with(struct moe_rpc_call *call, size_t len,
                        void (*fill)(uint8_t *buf, void *arg), void *arg)
{
    /* The core's own buffer, filled in place: the message is written once. */
    grpc_slice slice = grpc_slice_malloc(len);
    grpc_byte_buffer *bb;

    fill(GRPC_SLICE_START_PTR(slice), arg);
    bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    reply_bb(call, bb);
}

/* Answers call with bb (taken). */
static void reply_bb(struct moe_rpc_call *call, grpc_byte_buffer *bb)
{
    pthread_mutex_lock(&call->lock);
    if (!take_handler_locked(call, "reply")) {
        pthread_mutex_unlock(&call->lock);
        grpc_byte_buffer_destroy(bb);
        return;
    }
    if (call->dead || call->status_pending || call->status_started) {
        /* Cancelled meanwhile, or ended by an earlier fail: dropped. */
        pthread_mutex_unlock(&call->lock);
        grpc_byte_buffer_destroy(bb);
        call_put(call);
        return;
    }
    assert(!call->queued_buf);
    call->queued_buf = bb;
    progress_locked(call);
    pthread_mutex_unlock(&call->lock);
    call_put(call);
}

void moe_rpc_fail(struct moe_rpc_call *call, int status, const char *fmt, ...)
{
    char msg[RPC_STATUS_MSG_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (status == GRPC_STATUS_OK)
        status = GRPC_STATUS_UNKNOWN; /* a failure is never OK */
    pthread_mutex_lock(&call->lock);
    if (!take_handler_locked(call, "fail")) {
        pthread_mutex_unlock(&call->lock);
        return;
    }
    if (!call->dead)
        finish_locked(call, status, msg);
    pthread_mutex_unlock(&call->lock);
    call_put(call);
}

const char *moe_rpc_peer(const struct moe_rpc_call *call)
{
    return call->peer ? call->peer : "unknown";
}

int moe_rpc_server_port(const struct moe_rpc_server *s)
{
    return s->port;
}

int moe_rpc_server_in_flight(const struct moe_rpc_server *s)
{
    /* Relaxed: a statistic, exact only when the server is quiet. */
    return atomic_load_explicit(&s->in_flight, memory_order_relaxed);
}

/* ---- socket activation ---- */

/* Waits for the stop byte up to ms; true when it came. */
static bool wait_wake(struct moe_rpc_server *s, int ms)
{
    struct pollfd p = {.fd = s->wake[0], .events = POLLIN};

    return poll(&p, 1, ms) > 0;
}

/* The accept thread: hands every connection on s->listen_fd to the core,
 * until the stop byte arrives on s->wake[0]. */
static void *accept_main(void *arg)
{
    struct moe_rpc_server *s = arg;
    struct pollfd p[2] = {{.fd = s->listen_fd, .events = POLLIN},
                          {.fd = s->wake[0], .events = POLLIN}};
    bool starved = false;

    for (;;) {
        int fd;

        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            moe_log(MOE_LOG_ERROR,
                    "rpc: poll on the socket passed by systemd: %s; no longer accepting "
                    "connections on it, restart moed",
                    strerror(errno));
            break;
        }
        if (p[1].revents)
            break;
        if (p[0].revents & (POLLERR | POLLNVAL)) {
            moe_log(MOE_LOG_ERROR,
                    "rpc: the socket passed by systemd (fd %d) failed; no longer accepting "
                    "connections on it, restart moed",
                    s->listen_fd);
            break;
        }
        fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* The connection stays in the backlog: retry a little later
                 * rather than spin on a socket that stays readable. */
                if (!starved)
                    moe_log(MOE_LOG_WARN,
                            "rpc: cannot accept a connection on the socket passed by systemd: "
                            "%s; retrying every %d ms (raise LimitNOFILE?)",
                            strerror(errno), RPC_ACCEPT_BACKOFF_MS);
                starved = true;
                if (wait_wake(s, RPC_ACCEPT_BACKOFF_MS))
                    break;
            } else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED &&
                       errno != EPROTO) {
                moe_log(MOE_LOG_ERROR,
                        "rpc: accept on the socket passed by systemd (fd %d): %s; no longer "
                        "accepting connections on it, restart moed",
                        s->listen_fd, strerror(errno));
                break;
            }
            continue;
        }
        starved = false;
        /* The core owns fd from here on (and closes it). */
        grpc_server_add_channel_from_fd(s->server, fd, s->fd_creds);
    }
    return NULL;
}

/* Stops the accept thread and closes what socket activation opened; the
 * listening socket stays open in systemd.  Idempotent. */
static void stop_accepting(struct moe_rpc_server *s)
{
    if (s->accepting) {
        ssize_t n;

        do
            n = write(s->wake[1], "", 1);
        while (n < 0 && errno == EINTR);
        pthread_join(s->accept_thread, NULL);
        s->accepting = false;
    }
    for (int i = 0; i < 2; i++) {
        if (s->wake[i] >= 0)
            close(s->wake[i]);
        s->wake[i] = -1;
    }
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    s->listen_fd = -1;
    if (s->fd_creds)
        grpc_server_credentials_release(s->fd_creds);
    s->fd_creds = NULL;
}

/* Checks that the passed s->listen_fd is a listening Unix stream socket and
 * prepares to accept on it.  Non-blocking: another process sharing the
 * socket may take a connection between our poll and our accept. */
static int adopt_listen_fd(struct moe_rpc_server *s, struct moe_error *err)
{
    struct sockaddr_un sa = {0};
    socklen_t len = sizeof(int), sa_len = sizeof(sa);
    int domain = 0, type = 0, listening = 0, fl;

    if (getsockopt(s->listen_fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 ||
        getsockopt(s->listen_fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
        getsockopt(s->listen_fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0)
        return moe_error_set(err, -errno, "the socket passed by systemd (fd %d): %s", s->listen_fd,
                             strerror(errno));
    if (domain != AF_UNIX || type != SOCK_STREAM || !listening)
        return moe_error_set(err, -ENOTSOCK,
                             "the socket passed by systemd (fd %d) is not a listening Unix "
                             "stream socket; check ListenStream= in moed.socket",
                             s->listen_fd);
    fl = fcntl(s->listen_fd, F_GETFL);
    if (fl < 0 || fcntl(s->listen_fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return moe_error_set(err, -errno,
                             "cannot make the socket passed by systemd non-blocking: %s",
                             strerror(errno));
    if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        s->wake[0] = s->wake[1] = -1;
        return moe_error_set(err, -errno, "pipe: %s", strerror(errno));
    }
    /* Plaintext, like the socket path: the socket's mode guards it. */
    s->fd_creds = grpc_insecure_server_credentials_create();
    if (getsockname(s->listen_fd, (struct sockaddr *)&sa, &sa_len) == 0 && sa.sun_path[0])
        moe_log(MOE_LOG_INFO, "rpc: serving the Unix socket passed by systemd: fd %d, '%.*s'",
                s->listen_fd, (int)sizeof(sa.sun_path), sa.sun_path);
    else
        moe_log(MOE_LOG_INFO, "rpc: serving the Unix socket passed by systemd: fd %d",
                s->listen_fd);
    return 0;
}

/* ---- start and stop ---- */

static void server_destroy(struct moe_rpc_server *s)
{
    stop_accepting(s);
    for (int i = 0; i < s->n_methods; i++)
        free((char *)s->methods[i].m.path);
    free(s->methods);
    free(s->workers);
    free(s->auth);
    free(s->unix_path);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    if (s->grpc_inited)
        grpc_shutdown();
    free(s);
}

static void server_put(struct moe_rpc_server *s)
{
    /* acq_rel: the last put sees the writes made before every other put. */
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1)
        server_destroy(s);
}

/* Shuts the completion queue down, drains it (in the workers, or here
 * when none runs), joins and destroys.  The grpc server is gone. */
static void stop_workers(struct moe_rpc_server *s)
{
    bool drained = false;

    if (!s->cq)
        return;
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->n_workers; i++) {
        struct rpc_worker *w = &s->workers[i];

        if (w->running) {
            pthread_join(w->thread, NULL);
            w->running = false;
            drained = true;
        }
    }
    if (!drained)
        worker_main(&s->workers[0]);
    grpc_completion_queue_destroy(s->cq);
    s->cq = NULL;
}

/* Waits for the shutdown tag, until deadline (CLOCK_MONOTONIC) or forever
 * when deadline is NULL; under s->lock.  Without workers, reads the queue. */
static bool wait_notified_locked(struct moe_rpc_server *s, const struct timespec *deadline)
{
    while (!s->notified) {
        if (!s->workers[0].running) {
            grpc_event ev;

            pthread_mutex_unlock(&s->lock);
            ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            pthread_mutex_lock(&s->lock);
            if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->shutdown_tag) {
                tag_returned(ev.tag);
                s->notified = true;
            }
            continue;
        }
        if (deadline) {
            if (pthread_cond_timedwait(&s->cond, &s->lock, deadline) == ETIMEDOUT)
                return s->notified;
        } else {
            pthread_cond_wait(&s->cond, &s->lock);
        }
    }
    return true;
}

void moe_rpc_server_shutdown(struct moe_rpc_server *s, int deadline_ms)
{
    struct timespec deadline;
    int cancelled = 0;

    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    if (s->stopped || !s->server) {
        pthread_mutex_unlock(&s->lock);
        return;
    }
    s->stopping = true;
    pthread_mutex_unlock(&s->lock);

    /* Before the core shuts down: adding a connection races with it.
     * Connections arriving from now on wait in systemd's backlog. */
    stop_accepting(s);
    tag_posted(&s->shutdown_tag);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (deadline_ms > 0) {
        deadline.tv_sec += deadline_ms / 1000;
        deadline.tv_nsec += (long)(deadline_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&s->lock);
    if (!wait_notified_locked(s, &deadline)) {
        for (struct moe_rpc_call *c = s->calls; c; c = c->next)
            cancelled++;
        pthread_mutex_unlock(&s->lock);
        if (cancelled)
            moe_log(MOE_LOG_INFO, "rpc: cancelling %d calls still in flight after %d ms", cancelled,
                    deadline_ms);
        grpc_server_cancel_all_calls(s->server);
        pthread_mutex_lock(&s->lock);
        wait_notified_locked(s, NULL);
    }
    /* No call may start a batch from here on: the queue is about to shut
     * down.  Calls still with a handler are freed when it answers. */
    s->calls_dead = true;
    for (struct moe_rpc_call *c = s->calls; c; c = c->next) {
        pthread_mutex_lock(&c->lock);
        c->dead = true;
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_unlock(&s->lock);

    grpc_server_destroy(s->server);
    stop_workers(s);
    if (s->unix_path && unlink(s->unix_path) < 0 && errno != ENOENT)
        moe_log(MOE_LOG_WARN, "rpc: could not remove the socket '%s': %s, ignoring", s->unix_path,
                strerror(errno));
    pthread_mutex_lock(&s->lock);
    s->server = NULL;
    s->stopped = true;
    pthread_mutex_unlock(&s->lock);
}

void moe_rpc_server_free(struct moe_rpc_server *s)
{
    if (!s)
        return;
    moe_rpc_server_shutdown(s, 0);
    server_put(s);
}

/* Reads a PEM file whole, NUL-terminated; the caller frees. */
static int read_pem(const char *path, const char *what, char **ret, struct moe_error *err)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = fopen(path, "re");
    int r;

    if (!f)
        return moe_error_set(err, -errno, "cannot open the TLS %s '%s': %s", what, path,
                             strerror(errno));
    buf = malloc(RPC_TLS_FILE_MAX + 1);
    if (!buf) {
        fclose(f);
        return moe_error_set(err, -ENOMEM, "out of memory reading '%s'", path);
    }
    len = fread(buf, 1, RPC_TLS_FILE_MAX + 1, f);
    if (ferror(f)) {
        r = moe_error_set(err, -EIO, "cannot read the TLS %s '%s'", what, path);
        goto out_free;
    }
    if (len > RPC_TLS_FILE_MAX) {
        r = moe_error_set(err, -EFBIG, "the TLS %s '%s' is larger than %u bytes", what, path,
                          RPC_TLS_FILE_MAX);
        goto out_free;
    }
    buf[len] = '\0';
    if (!strstr(buf, "-----BEGIN ")) {
        r = moe_error_set(err, -EINVAL, "the TLS %s '%s' is not PEM (no '-----BEGIN' line)", what,
                          path);
        goto out_free;
    }
    fclose(f);
    *ret = buf;
    return 0;
out_free:
    fclose(f);
    free(buf);
    return r;
}

static int make_creds(const struct moe_rpc_config *cfg, grpc_server_credentials **ret,
                      struct moe_error *err)
{
    char *cert = NULL, *key = NULL, *ca = NULL;
    grpc_ssl_pem_key_cert_pair pair;
    grpc_ssl_client_certificate_request_type req = GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    int r;

    if (!cfg->tls_cert && !cfg->tls_key && !cfg->tls_client_ca) {
        *ret = grpc_insecure_server_credentials_create();
        return 0;
    }
    if (!cfg->tls_cert || !cfg->tls_key)
        return moe_error_set(err, -EINVAL, "TLS needs both a certificate and a key file");
    r = read_pem(cfg->tls_cert, "certificate", &cert, err);
    if (r < 0)
        return r;
    r = read_pem(cfg->tls_key, "key", &key, err);
    if (r < 0)
        goto out;
    if (cfg->tls_client_ca) {
        r = read_pem(cfg->tls_client_ca, "client CA", &ca, err);
        if (r < 0)
            goto out;
        req = cfg->require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                       : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
    } else if (cfg->require_client_cert) {
        r = moe_error_set(err, -EINVAL, "requiring client certificates needs a client CA file");
        goto out;
    }
    pair.private_key = key;
    pair.cert_chain = cert;
    /* The core copies the PEM strings. */
    *ret = grpc_ssl_server_credentials_create_ex(ca, &pair, 1, req, NULL);
    r = *ret ? 0 : moe_error_set(err, -EINVAL, "bad TLS certificate, key or client CA");
out:
    free(cert);
    free(key);
    free(ca);
    return r;
}

/* Removes a stale socket at path; refuses a live one or another file. */
static int prepare_unix_path(const char *path, struct moe_error *err)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, r;

    if (strlen(path) >= sizeof(sa.sun_path))
        return moe_error_set(err, -ENAMETOOLONG, "the socket path '%s' is longer than %zu bytes",
                             path, sizeof(sa.sun_path) - 1);
    if (lstat(path, &st) < 0)
        return errno == ENOENT
                   ? 0
                   : moe_error_set(err, -errno, "cannot stat '%s': %s", path, strerror(errno));
    if (!S_ISSOCK(st.st_mode))
        return moe_error_set(err, -EEXIST, "'%s' exists and is not a socket; remove it", path);
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return moe_error_set(err, -errno, "socket: %s", strerror(errno));
    r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    close(fd);
    if (r == 0)
        return moe_error_set(err, -EADDRINUSE,
                             "another process listens on '%s'; stop it or use another path", path);
    if (unlink(path) < 0 && errno != ENOENT)
        return moe_error_set(err, -errno, "cannot remove the stale socket '%s': %s", path,
                             strerror(errno));
    return 0;
}

static int add_ports(struct moe_rpc_server *s, const struct moe_rpc_config *cfg,
                     struct moe_error *err)
{
    grpc_server_credentials *creds = NULL;
    char *addr;
    int r;

    if (cfg->listen) {
        r = make_creds(cfg, &creds, err);
        if (r < 0)
            return r;
        s->port = grpc_server_add_http2_port(s->server, cfg->listen, creds);
        grpc_server_credentials_release(creds);
        if (s->port <= 0)
            return moe_error_set(err, -EADDRINUSE,
                                 "cannot listen on '%s': address in use or invalid%s", cfg->listen,
                                 cfg->tls_cert ? ", or bad TLS files" : "");
    }
    if (s->listen_fd >= 0) {
        r = adopt_listen_fd(s, err);
        if (r < 0)
            return r;
    } else if (cfg->unix_path) {
        r = prepare_unix_path(cfg->unix_path, err);
        if (r < 0)
            return r;
        if (asprintf(&addr, "unix:%s", cfg->unix_path) < 0)
            return moe_error_set(err, -ENOMEM, "out of memory");
        /* Plaintext: the socket's mode guards it. */
        creds = grpc_insecure_server_credentials_create();
        r = grpc_server_add_http2_port(s->server, addr, creds);
        grpc_server_credentials_release(creds);
        free(addr);
        if (r <= 0)
            return moe_error_set(err, -EADDRINUSE, "cannot listen on the socket '%s'",
                                 cfg->unix_path);
        s->unix_path = strdup(cfg->unix_path);
        if (!s->unix_path)
            return moe_error_set(err, -ENOMEM, "out of memory");
        if (chmod(cfg->unix_path, 0660) < 0)
            return moe_error_set(err, -errno, "cannot chmod 0660 the socket '%s': %s",
                                 cfg->unix_path, strerror(errno));
    }
    return 0;
}

static int check_config(const struct moe_rpc_config *cfg, const struct moe_rpc_method *methods,
                        int n_methods, struct moe_error *err)
{
    if (!cfg->listen && !cfg->unix_path && !cfg->has_listen_fd)
        return moe_error_set(err, -EINVAL, "nothing to listen on: no address and no socket");
    if (cfg->n_threads < 0 || cfg->n_threads > RPC_MAX_THREADS)
        return moe_error_set(err, -EINVAL, "%d RPC threads: expected 1 to %d", cfg->n_threads,
                             RPC_MAX_THREADS);
    if (n_methods <= 0)
        return moe_error_set(err, -EINVAL, "no RPC methods");
    for (int i = 0; i < n_methods; i++)
        if (!methods[i].path || methods[i].path[0] != '/' || !methods[i].fn)
            return moe_error_set(err, -EINVAL,
                                 "RPC method %d: needs a path '/pkg.Service/Method' "
                                 "and a handler",
                                 i);
    return 0;
}

int moe_rpc_server_start(const struct moe_rpc_config *cfg, const struct moe_rpc_method *methods,
                         int n_methods, struct moe_rpc_server **ret, struct moe_error *err)
{
    struct moe_rpc_server *s;
    pthread_condattr_t ca;
    grpc_arg arg[2];
    grpc_channel_args args;
    size_t max_msg = cfg->max_message_bytes ? cfg->max_message_bytes : RPC_DEFAULT_MAX_MESSAGE;
    int r;

    r = check_config(cfg, methods, n_methods, err);
    if (r >= 0) {
        s = calloc(1, sizeof(*s));
        if (!s)
            r = moe_error_set(err, -ENOMEM, "out of memory");
    }
    if (r < 0) {
        /* Ours in every case, also on failure. */
        if (cfg->has_listen_fd && cfg->listen_fd >= 0)
            close(cfg->listen_fd);
        return r;
    }
    s->listen_fd = cfg->has_listen_fd ? cfg->listen_fd : -1;
    s->wake[0] = s->wake[1] = -1;
    atomic_init(&s->refs, 1);
    atomic_init(&s->in_flight, 0);
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    s->shutdown_tag.kind = RPC_TAG_SHUTDOWN;
    s->n_workers = cfg->n_threads ? cfg->n_threads : 2;
    s->workers = calloc((size_t)s->n_workers, sizeof(*s->workers));
    s->methods = calloc((size_t)n_methods, sizeof(*s->methods));
    if (!s->workers || !s->methods) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out_free;
    }
    if (cfg->token) {
        if (asprintf(&s->auth, "Bearer %s", cfg->token) < 0) {
            s->auth = NULL;
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out_free;
        }
        s->auth_len = strlen(s->auth);
    }
    /* Before grpc_init: nothing of gRPC's reaches stderr on its own. */
    gpr_set_log_function(grpc_log);
    grpc_init();
    s->grpc_inited = true;

    arg[0].type = GRPC_ARG_INTEGER;
    arg[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    arg[0].value.integer = max_msg > INT_MAX ? INT_MAX : (int)max_msg;
    /* No SO_REUSEPORT: a second daemon on our port is an error, not a
     * silent sharing of the connections. */
    arg[1].type = GRPC_ARG_INTEGER;
    arg[1].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    arg[1].value.integer = 0;
    args.num_args = MOE_ARRAY_SIZE(arg);
    args.args = arg;
    s->server = grpc_server_create(&args, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    for (int i = 0; i < s->n_workers; i++) {
        s->workers[i].s = s;
        s->workers[i].index = i;
    }
    for (int i = 0; i < n_methods; i++) {
        struct rpc_method *m = &s->methods[i];

        m->m = methods[i];
        m->m.path = strdup(methods[i].path);
        s->n_methods = i + 1;
        if (!m->m.path) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out_stop;
        }
        m->handle =
            /* A unary call's message comes with the call itself: no batch
             * and no completion of its own to read it. */
            grpc_server_register_method(s->server, m->m.path, NULL,
                                        m->m.streaming ? GRPC_SRM_PAYLOAD_NONE
                                                       : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
                                        0);
        if (!m->handle) {
            r = moe_error_set(err, -EINVAL, "cannot register the RPC method '%s' (twice?)",
                              m->m.path);
            goto out_stop;
        }
    }
    r = add_ports(s, cfg, err);
    if (r < 0)
        goto out_stop;
    grpc_server_start(s->server);
    for (int i = 0; i < s->n_workers; i++) {
        struct rpc_worker *w = &s->workers[i];

        r = -pthread_create(&w->thread, NULL, worker_main, w);
        if (r < 0) {
            moe_error_set(err, r, "cannot start an RPC thread: %s", strerror(-r));
            goto out_stop;
        }
        w->running = true;
        pthread_setname_np(w->thread, "moe-rpc");
    }
    for (int i = 0; i < s->n_workers; i++)
        for (int k = 0; k < s->n_methods; k++)
            for (int j = 0; j < RPC_SLOTS_PER_METHOD; j++)
                post_request(&s->workers[i], &s->methods[k]);
    for (int i = 0; i < s->n_workers; i++)
        post_request(&s->workers[i], &unknown_method);
    /* Connections are added only to a started server. */
    if (s->listen_fd >= 0) {
        r = -pthread_create(&s->accept_thread, NULL, accept_main, s);
        if (r < 0) {
            moe_error_set(err, r, "cannot start the accept thread: %s", strerror(-r));
            goto out_stop;
        }
        s->accepting = true;
        pthread_setname_np(s->accept_thread, "moe-rpc-accept");
    }
    moe_log(MOE_LOG_INFO, "rpc: serving %d methods on %s%s%s%s with %d threads", n_methods,
            cfg->listen ? cfg->listen : "",
            cfg->listen && (s->unix_path || s->accepting) ? " and " : "",
            s->unix_path ? "unix:" : "",
            s->unix_path   ? s->unix_path
            : s->accepting ? "the socket passed by systemd"
                           : "",
            s->n_workers);
    *ret = s;
    return 0;
out_stop:
    /* shutdown_and_notify also works on a server never started. */
    moe_rpc_server_shutdown(s, 0);
out_free:
    server_put(s);
    return r;
}
