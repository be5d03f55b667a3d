/*
 * daemon/rpc.c: a server with test methods, driven by a client written
 * directly on the gRPC C core client API.
 */
#include "rpc.h"
#include "tests.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#define M_ECHO "/test.T/Echo"
#define M_UPPER "/test.T/Upper"
#define M_FAIL "/test.T/Fail"
#define M_REVERSE "/test.T/Reverse"
#define M_STREAM "/test.T/Stream"
#define TOKEN "s3cret"
#define MAX_MSG (1u << 20)

/* ---- server side ---- */

static void h_echo(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    (void)arg;
    moe_rpc_reply(call, req, len);
}

/* Handler threads of h_upper still running. */
static atomic_int delayed_running;

struct delayed {
    struct moe_rpc_call *call;
    int ms;
    size_t len;
    uint8_t msg[];
};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void *delayed_main(void *arg)
{
    struct delayed *d = arg;

    sleep_ms(d->ms);
    for (size_t i = 0; i < d->len; i++)
        d->msg[i] = (uint8_t)toupper(d->msg[i]);
    moe_rpc_reply(d->call, d->msg, d->len);
    free(d);
    atomic_fetch_sub(&delayed_running, 1);
    return NULL;
}

/* Answers upper-cased from another thread after 2 ms, or after N ms for a
 * request "slow:N". */
static void h_upper(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct delayed *d = malloc(sizeof(*d) + len);
    pthread_t t;

    (void)arg;
    ASSERT_TRUE(d);
    d->call = call;
    d->len = len;
    memcpy(d->msg, req, len);
    d->ms = 2;
    if (len > 5 && len < 16 && memcmp(req, "slow:", 5) == 0) {
        char num[16];

        memcpy(num, req + 5, len - 5);
        num[len - 5] = '\0';
        d->ms = atoi(num);
    }
    atomic_fetch_add(&delayed_running, 1);
    ASSERT_EQ(pthread_create(&t, NULL, delayed_main, d), 0);
    pthread_detach(t);
}

static void h_fail(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    (void)arg;
    moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "bad request '%.*s'", (int)len,
                 (const char *)req);
}

static void h_reverse(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    uint8_t buf[256];

    (void)arg;
    if (len > sizeof(buf)) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "too long");
        return;
    }
    for (size_t i = 0; i < len; i++)
        buf[i] = req[len - 1 - i];
    moe_rpc_reply(call, buf, len);
}

/* Echoes each message; "fail" ends the stream with FAILED_PRECONDITION. */
static void h_stream(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    (void)arg;
    if (len == 4 && memcmp(req, "fail", 4) == 0)
        moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION, "asked to fail");
    else
        moe_rpc_reply(call, req, len);
}

static const struct moe_rpc_method methods[] = {
    {M_ECHO, false, false, h_echo, NULL},    {M_UPPER, false, false, h_upper, NULL},
    {M_FAIL, false, false, h_fail, NULL},    {M_REVERSE, false, true, h_reverse, NULL},
    {M_STREAM, true, false, h_stream, NULL},
};

static struct moe_rpc_server *start(const char *listen, const char *unix_path)
{
    struct moe_rpc_config cfg = {
        .listen = listen,
        .unix_path = unix_path,
        .token = TOKEN,
        .max_message_bytes = MAX_MSG,
        .n_threads = 3,
    };
    struct moe_error err = {0};
    struct moe_rpc_server *s = NULL;
    int r = moe_rpc_server_start(&cfg, methods, (int)MOE_ARRAY_SIZE(methods), &s, &err);

    if (r < 0)
        FAIL("moe_rpc_server_start: %d %s", r, err.msg);
    return s;
}

static void wait_delayed_done(void)
{
    for (int i = 0; i < 500 && atomic_load(&delayed_running) > 0; i++)
        sleep_ms(10);
    ASSERT_EQ(atomic_load(&delayed_running), 0);
}

static void wait_in_flight(const struct moe_rpc_server *s, int n)
{
    for (int i = 0; i < 500 && moe_rpc_server_in_flight(s) != n; i++)
        sleep_ms(5);
    ASSERT_EQ(moe_rpc_server_in_flight(s), n);
}

/* ---- client side ---- */

struct ccall {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_byte_buffer *req;
    grpc_byte_buffer *resp;
    grpc_metadata md;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
};

struct result {
    int status;
    char details[256];
    char *data; /* NUL-terminated copy of the reply, or NULL */
    size_t len;
};

static gpr_timespec in_ms(int ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static grpc_channel *channel_new(const char *target)
{
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, NULL);

    grpc_channel_credentials_release(creds);
    return ch;
}

static grpc_byte_buffer *buffer_of(const void *p, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(p, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);

    grpc_slice_unref(s);
    return bb;
}

/* A NUL-terminated copy of bb (NULL for NULL); *len its length. */
static char *bytes_of(grpc_byte_buffer *bb, size_t *len)
{
    grpc_byte_buffer_reader r;
    grpc_slice s;
    char *p;

    *len = 0;
    if (!bb)
        return NULL;
    ASSERT_TRUE(grpc_byte_buffer_reader_init(&r, bb));
    s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *len = GRPC_SLICE_LENGTH(s);
    p = malloc(*len + 1);
    ASSERT_TRUE(p);
    memcpy(p, GRPC_SLICE_START_PTR(s), *len);
    p[*len] = '\0';
    grpc_slice_unref(s);
    return p;
}

/* Waits for the tags whose bits are in mask (tags are (void *)bit). */
static void wait_tags(grpc_completion_queue *cq, uintptr_t mask)
{
    while (mask) {
        grpc_event ev = grpc_completion_queue_next(cq, in_ms(10000), NULL);

        if (ev.type != GRPC_OP_COMPLETE)
            FAIL("no completion within 10 s (event type %d)", (int)ev.type);
        ASSERT_TRUE(mask & (uintptr_t)ev.tag);
        mask &= ~(uintptr_t)ev.tag;
    }
}

static void cq_free(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
}

/* Starts a unary call; finish it with ccall_finish. */
static void ccall_start(struct ccall *c, grpc_channel *ch, const char *method, const char *token,
                        const void *req, size_t len, int timeout_ms)
{
    grpc_op ops[6];
    char auth[128];

    memset(c, 0, sizeof(*c));
    c->cq = grpc_completion_queue_create_for_next(NULL);
    c->call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                       grpc_slice_from_static_string(method), NULL,
                                       in_ms(timeout_ms), NULL);
    ASSERT_TRUE(c->call);
    grpc_metadata_array_init(&c->init_md);
    grpc_metadata_array_init(&c->trail_md);
    c->req = buffer_of(req, len);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (token) {
        snprintf(auth, sizeof(auth), "Bearer %s", token);
        c->md.key = grpc_slice_from_static_string("authorization");
        c->md.value = grpc_slice_from_copied_string(auth);
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &c->md;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &c->resp;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &c->trail_md;
    ops[5].data.recv_status_on_client.status = &c->status;
    ops[5].data.recv_status_on_client.status_details = &c->details;
    ASSERT_EQ(grpc_call_start_batch(c->call, ops, 6, (void *)1, NULL), GRPC_CALL_OK);
}

static void ccall_finish(struct ccall *c, struct result *out)
{
    char *d;

    wait_tags(c->cq, 1);
    out->status = c->status;
    d = grpc_slice_to_c_string(c->details);
    snprintf(out->details, sizeof(out->details), "%s", d);
    gpr_free(d);
    out->data = bytes_of(c->resp, &out->len);
    if (c->resp)
        grpc_byte_buffer_destroy(c->resp);
    grpc_byte_buffer_destroy(c->req);
    grpc_slice_unref(c->details);
    grpc_slice_unref(c->md.value);
    grpc_metadata_array_destroy(&c->init_md);
    grpc_metadata_array_destroy(&c->trail_md);
    grpc_call_unref(c->call);
    cq_free(c->cq);
}

static void unary(grpc_channel *ch, const char *method, const char *token, const char *req,
                  struct result *out)
{
    struct ccall c;

    ccall_start(&c, ch, method, token, req, strlen(req), 5000);
    ccall_finish(&c, out);
}

/* A unary call expected to succeed with the reply want. */
static void expect_ok(grpc_channel *ch, const char *method, const char *token, const char *req,
                      const char *want)
{
    struct result r;

    unary(ch, method, token, req, &r);
    if (r.status != GRPC_STATUS_OK)
        FAIL("%s('%s'): status %d '%s'", method, req, r.status, r.details);
    ASSERT_STREQ(r.data, want);
    free(r.data);
}

static void expect_status(grpc_channel *ch, const char *method, const char *token, const char *req,
                          int status, const char *details)
{
    struct result r;

    unary(ch, method, token, req, &r);
    ASSERT_EQ(r.status, status);
    if (details)
        ASSERT_CONTAINS(r.details, details);
    ASSERT_TRUE(!r.data);
}

/* ---- tests ---- */

static void test_unary(grpc_channel *ch)
{
    expect_ok(ch, M_ECHO, NULL, "hello", "hello");
    expect_ok(ch, M_ECHO, NULL, "", "");
    expect_ok(ch, M_UPPER, NULL, "abc def", "ABC DEF");
    expect_ok(ch, M_UPPER, NULL, "slow:50", "SLOW:50");
    expect_status(ch, M_FAIL, NULL, "xyz", GRPC_STATUS_INVALID_ARGUMENT, "bad request 'xyz'");
    expect_status(ch, "/test.T/Nope", NULL, "x", GRPC_STATUS_UNIMPLEMENTED, NULL);
}

static void test_auth(grpc_channel *ch)
{
    /* A missing token is told from a wrong one; both name the metadata. */
    static const struct {
        const char *token;
        int status;
        const char *needle;
    } cases[] = {
        {NULL, GRPC_STATUS_UNAUTHENTICATED, "no token given"},
        {"wrong", GRPC_STATUS_UNAUTHENTICATED, "token refused"},
        {TOKEN "x", GRPC_STATUS_UNAUTHENTICATED, "token refused"},
        {"", GRPC_STATUS_UNAUTHENTICATED, "token refused"},
        {TOKEN, GRPC_STATUS_OK, NULL},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        if (cases[i].status == GRPC_STATUS_OK)
            expect_ok(ch, M_REVERSE, cases[i].token, "abc", "cba");
        else {
            expect_status(ch, M_REVERSE, cases[i].token, "abc", cases[i].status, "Bearer");
            expect_status(ch, M_REVERSE, cases[i].token, "abc", cases[i].status, cases[i].needle);
        }
    }
    /* Non-mutating methods need no token, and ignore a wrong one. */
    expect_ok(ch, M_ECHO, NULL, "x", "x");
    expect_ok(ch, M_ECHO, "wrong", "y", "y");
}

/* A bidi stream: n messages (msgs[i], or "msg-i"), each answered in turn;
 * returns the final status. */
static int stream(grpc_channel *ch, int n, const char *const *msgs, char *details, size_t dlen)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    grpc_call *call =
        grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                 grpc_slice_from_static_string(M_STREAM), NULL, in_ms(5000), NULL);
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice det;
    grpc_op op[3];
    bool got_md = false;
    char *d;

    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    memset(op, 0, sizeof(op));
    op[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ASSERT_EQ(grpc_call_start_batch(call, op, 1, (void *)1, NULL), GRPC_CALL_OK);
    wait_tags(cq, 1);
    for (int i = 0; i < n; i++) {
        char buf[32];
        const char *m = buf;
        grpc_byte_buffer *out, *in = NULL;
        char *got;
        size_t len;

        if (msgs)
            m = msgs[i];
        else
            snprintf(buf, sizeof(buf), "msg-%d", i);
        out = buffer_of(m, strlen(m));
        memset(op, 0, sizeof(op));
        op[0].op = GRPC_OP_SEND_MESSAGE;
        op[0].data.send_message.send_message = out;
        ASSERT_EQ(grpc_call_start_batch(call, op, 1, (void *)2, NULL), GRPC_CALL_OK);
        memset(op, 0, sizeof(op));
        op[0].op = GRPC_OP_RECV_MESSAGE;
        op[0].data.recv_message.recv_message = &in;
        op[1].op = GRPC_OP_RECV_INITIAL_METADATA;
        op[1].data.recv_initial_metadata.recv_initial_metadata = &init_md;
        ASSERT_EQ(grpc_call_start_batch(call, op, got_md ? 1 : 2, (void *)4, NULL), GRPC_CALL_OK);
        got_md = true;
        wait_tags(cq, 2 | 4);
        grpc_byte_buffer_destroy(out);
        got = bytes_of(in, &len);
        if (in)
            grpc_byte_buffer_destroy(in);
        if (!got)
            break; /* the server ended the stream */
        ASSERT_STREQ(got, m);
        free(got);
    }
    memset(op, 0, sizeof(op));
    op[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    op[1].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op[1].data.recv_status_on_client.trailing_metadata = &trail_md;
    op[1].data.recv_status_on_client.status = &status;
    op[1].data.recv_status_on_client.status_details = &det;
    /* The initial metadata must be received once, even without messages. */
    op[2].op = GRPC_OP_RECV_INITIAL_METADATA;
    op[2].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ASSERT_EQ(grpc_call_start_batch(call, op, got_md ? 2 : 3, (void *)8, NULL), GRPC_CALL_OK);
    wait_tags(cq, 8);
    d = grpc_slice_to_c_string(det);
    snprintf(details, dlen, "%s", d);
    gpr_free(d);
    grpc_slice_unref(det);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_call_unref(call);
    cq_free(cq);
    return status;
}

static void test_stream(grpc_channel *ch)
{
    static const char *const failing[] = {"a", "b", "fail", "never"};
    char details[256];

    ASSERT_EQ(stream(ch, 10, NULL, details, sizeof(details)), GRPC_STATUS_OK);
    ASSERT_EQ(stream(ch, 0, NULL, details, sizeof(details)), GRPC_STATUS_OK);
    ASSERT_EQ(stream(ch, 4, failing, details, sizeof(details)), GRPC_STATUS_FAILED_PRECONDITION);
    ASSERT_CONTAINS(details, "asked to fail");
}

struct worker_arg {
    grpc_channel *ch;
    int id;
};

static void *client_thread(void *p)
{
    struct worker_arg *a = p;

    for (int i = 0; i < 50; i++) {
        char req[64], want[64];

        snprintf(req, sizeof(req), "thread %d call %d", a->id, i);
        if (i % 3 == 1) {
            for (size_t k = 0; k <= strlen(req); k++)
                want[k] = (char)toupper(req[k]);
            expect_ok(a->ch, M_UPPER, NULL, req, want);
        } else if (i % 3 == 2) {
            char details[64];

            ASSERT_EQ(stream(a->ch, 3, NULL, details, sizeof(details)), GRPC_STATUS_OK);
        } else {
            expect_ok(a->ch, M_ECHO, NULL, req, req);
        }
    }
    return NULL;
}

static void test_concurrent(grpc_channel *ch, grpc_channel *ch_unix)
{
    pthread_t t[8];
    struct worker_arg a[8];

    for (int i = 0; i < 8; i++) {
        a[i] = (struct worker_arg){i % 2 ? ch : ch_unix, i};
        ASSERT_EQ(pthread_create(&t[i], NULL, client_thread, &a[i]), 0);
    }
    for (int i = 0; i < 8; i++)
        pthread_join(t[i], NULL);
}

static void test_too_large(grpc_channel *ch)
{
    size_t len = MAX_MSG + 1;
    char *big = malloc(len);
    struct ccall c;
    struct result r;

    ASSERT_TRUE(big);
    memset(big, 'x', len);
    ccall_start(&c, ch, M_ECHO, NULL, big, len, 5000);
    ccall_finish(&c, &r);
    ASSERT_EQ(r.status, GRPC_STATUS_RESOURCE_EXHAUSTED);
    free(r.data);
    /* Just under the limit (the framing is not counted) is fine. */
    ccall_start(&c, ch, M_ECHO, NULL, big, MAX_MSG, 5000);
    ccall_finish(&c, &r);
    ASSERT_EQ(r.status, GRPC_STATUS_OK);
    ASSERT_EQ(r.len, MAX_MSG);
    free(r.data);
    free(big);
    expect_ok(ch, M_ECHO, NULL, "still here", "still here");
}

/* The client cancels while the handler still holds the call: the reply is
 * dropped and the call freed. */
static void test_cancel(struct moe_rpc_server *s, grpc_channel *ch)
{
    struct ccall c;
    struct result r;

    ccall_start(&c, ch, M_UPPER, NULL, "slow:300", 8, 5000);
    for (int i = 0; i < 200 && atomic_load(&delayed_running) == 0; i++)
        sleep_ms(5);
    ASSERT_EQ(atomic_load(&delayed_running), 1);
    ASSERT_EQ(moe_rpc_server_in_flight(s), 1);
    grpc_call_cancel(c.call, NULL);
    ccall_finish(&c, &r);
    ASSERT_EQ(r.status, GRPC_STATUS_CANCELLED);
    ASSERT_EQ(moe_rpc_server_in_flight(s), 1); /* the handler still has it */
    wait_delayed_done();
    wait_in_flight(s, 0);

    /* Same with a deadline that expires on the server's side. */
    ccall_start(&c, ch, M_UPPER, NULL, "slow:200", 8, 50);
    ccall_finish(&c, &r);
    ASSERT_EQ(r.status, GRPC_STATUS_DEADLINE_EXCEEDED);
    wait_delayed_done();
    wait_in_flight(s, 0);
    expect_ok(ch, M_UPPER, NULL, "ok", "OK");
}

struct bg_call {
    grpc_channel *ch;
    const char *req;
    struct result r;
};

static void *bg_main(void *p)
{
    struct bg_call *b = p;

    unary(b->ch, M_UPPER, NULL, b->req, &b->r);
    return NULL;
}

/* Shutdown with a call in flight: graceful when the call ends before the
 * deadline, cancelled after it; the handler answering late is harmless,
 * even after moe_rpc_server_free. */
static void test_shutdown(void)
{
    static const struct {
        const char *req;
        int deadline_ms;
        bool finishes;
    } cases[] = {
        {"slow:200", 3000, true},
        {"slow:1500", 200, false},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        struct moe_rpc_server *s = start("127.0.0.1:0", NULL);
        char target[64];
        grpc_channel *ch;
        struct bg_call b = {.req = cases[i].req};
        pthread_t t;
        uint64_t t0, ms;

        snprintf(target, sizeof(target), "127.0.0.1:%d", moe_rpc_server_port(s));
        ch = channel_new(target);
        b.ch = ch;
        ASSERT_EQ(pthread_create(&t, NULL, bg_main, &b), 0);
        for (int k = 0; k < 400 && atomic_load(&delayed_running) == 0; k++)
            sleep_ms(5);
        ASSERT_EQ(atomic_load(&delayed_running), 1);
        t0 = now_ms();
        moe_rpc_server_shutdown(s, cases[i].deadline_ms);
        ms = now_ms() - t0;
        pthread_join(t, NULL);
        if (cases[i].finishes) {
            ASSERT_EQ(b.r.status, GRPC_STATUS_OK);
            ASSERT_STREQ(b.r.data, "SLOW:200");
            ASSERT_TRUE(ms < (uint64_t)cases[i].deadline_ms);
        } else {
            ASSERT_NE(b.r.status, GRPC_STATUS_OK);
            ASSERT_TRUE(ms >= (uint64_t)cases[i].deadline_ms - 5);
            ASSERT_TRUE(ms < (uint64_t)cases[i].deadline_ms + 1000);
        }
        free(b.r.data);
        /* Freed while the handler may still hold the call. */
        moe_rpc_server_free(s);
        wait_delayed_done();
        grpc_channel_destroy(ch);
    }
}

static void test_start_errors(const char *dir, int port)
{
    struct moe_rpc_config cfg = {0};
    struct moe_error err = {0};
    struct moe_rpc_server *s = NULL;
    char addr[64], path[512];
    FILE *f;

    /* Nothing to listen on; no methods. */
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -EINVAL);
    cfg.listen = "127.0.0.1:0";
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 0, &s, &err), -EINVAL);
    /* Address in use. */
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    cfg.listen = addr;
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -EADDRINUSE);
    ASSERT_CONTAINS(err.msg, addr);
    /* TCP bound, then the socket fails: a live socket, a plain file. */
    cfg.listen = "127.0.0.1:0";
    snprintf(path, sizeof(path), "%s/rpc.sock", dir);
    cfg.unix_path = path;
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -EADDRINUSE);
    ASSERT_CONTAINS(err.msg, "another process");
    snprintf(path, sizeof(path), "%s/plain", dir);
    f = fopen(path, "w");
    ASSERT_TRUE(f);
    fclose(f);
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -EEXIST);
    /* Missing and bad TLS files. */
    cfg.unix_path = NULL;
    cfg.tls_cert = "/nonexistent/cert.pem";
    cfg.tls_key = "/nonexistent/key.pem";
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -ENOENT);
    cfg.tls_cert = path;
    cfg.tls_key = path;
    ASSERT_EQ(moe_rpc_server_start(&cfg, methods, 1, &s, &err), -EINVAL);
    ASSERT_TRUE(!s);
}

/* ---- TLS ---- */

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf = calloc(1, 1 << 16);

    ASSERT_TRUE(f && buf);
    ASSERT_TRUE(fread(buf, 1, (1 << 16) - 1, f) > 0);
    fclose(f);
    return buf;
}

static grpc_channel *tls_channel(int port, const char *ca, const char *cert, const char *key)
{
    char target[64];
    char *root = slurp(ca), *c = NULL, *k = NULL;
    grpc_ssl_pem_key_cert_pair pair;
    grpc_channel_credentials *creds;
    grpc_arg arg = {.type = GRPC_ARG_STRING,
                    .key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
                    .value.string = (char *)"localhost"};
    grpc_channel_args args = {1, &arg};
    grpc_channel *ch;

    if (cert) {
        c = slurp(cert);
        k = slurp(key);
        pair.cert_chain = c;
        pair.private_key = k;
    }
    creds = grpc_ssl_credentials_create(root, cert ? &pair : NULL, NULL, NULL);
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    ch = grpc_channel_create(target, creds, &args);
    grpc_channel_credentials_release(creds);
    free(root);
    free(c);
    free(k);
    return ch;
}

static void test_tls(const char *dir)
{
    char cmd[2048], cert[512], key[512], ccert[512], ckey[512];
    struct moe_rpc_config cfg = {.listen = "127.0.0.1:0", .n_threads = 1};
    struct moe_error err = {0};
    struct moe_rpc_server *s;
    grpc_channel *ch;
    struct result r;

    if (system("command -v openssl >/dev/null 2>&1") != 0) {
        printf("TLS: skipped, no openssl to make a certificate\n");
        return;
    }
    snprintf(cert, sizeof(cert), "%s/cert.pem", dir);
    snprintf(key, sizeof(key), "%s/key.pem", dir);
    snprintf(ccert, sizeof(ccert), "%s/client.pem", dir);
    snprintf(ckey, sizeof(ckey), "%s/client-key.pem", dir);
    snprintf(cmd, sizeof(cmd),
             "cd '%s' && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
             "-nodes -keyout key.pem -out cert.pem -days 1 -subj /CN=localhost "
             "-addext subjectAltName=DNS:localhost >/dev/null 2>&1 && "
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout client-key.pem -out client.pem -days 1 -subj /CN=client >/dev/null 2>&1",
             dir);
    if (system(cmd) != 0) {
        printf("TLS: skipped, openssl could not make a certificate\n");
        return;
    }

    /* Server certificate only. */
    cfg.tls_cert = cert;
    cfg.tls_key = key;
    if (moe_rpc_server_start(&cfg, methods, (int)MOE_ARRAY_SIZE(methods), &s, &err) < 0)
        FAIL("TLS start: %s", err.msg);
    ch = tls_channel(moe_rpc_server_port(s), cert, NULL, NULL);
    expect_ok(ch, M_ECHO, NULL, "over tls", "over tls");
    grpc_channel_destroy(ch);
    moe_rpc_server_free(s);

    /* Client certificates required. */
    cfg.tls_client_ca = ccert;
    cfg.require_client_cert = true;
    if (moe_rpc_server_start(&cfg, methods, (int)MOE_ARRAY_SIZE(methods), &s, &err) < 0)
        FAIL("mTLS start: %s", err.msg);
    ch = tls_channel(moe_rpc_server_port(s), cert, ccert, ckey);
    expect_ok(ch, M_ECHO, NULL, "mutual", "mutual");
    grpc_channel_destroy(ch);
    ch = tls_channel(moe_rpc_server_port(s), cert, NULL, NULL);
    unary(ch, M_ECHO, NULL, "no client cert", &r);
    ASSERT_EQ(r.status, GRPC_STATUS_UNAVAILABLE);
    grpc_channel_destroy(ch);
    moe_rpc_server_free(s);
    printf("TLS: ok\n");
}

int main(void)
{
    char *dir = test_tmpdir("rpc");
    char sock[512], target[600];
    struct moe_rpc_server *s;
    grpc_channel *ch, *ch_unix;
    struct stat st;
    uint64_t t0 = now_ms();

    grpc_init();
    snprintf(sock, sizeof(sock), "%s/rpc.sock", dir);
    s = start("127.0.0.1:0", sock);
    ASSERT_TRUE(moe_rpc_server_port(s) > 0);
    ASSERT_EQ(stat(sock, &st), 0);
    ASSERT_EQ(st.st_mode & 0777, 0660);
    snprintf(target, sizeof(target), "127.0.0.1:%d", moe_rpc_server_port(s));
    ch = channel_new(target);
    snprintf(target, sizeof(target), "unix:%s", sock);
    ch_unix = channel_new(target);

    test_unary(ch);
    test_unary(ch_unix);
    test_auth(ch);
    test_stream(ch);
    test_stream(ch_unix);
    test_concurrent(ch, ch_unix);
    test_too_large(ch);
    test_cancel(s, ch);
    test_start_errors(dir, moe_rpc_server_port(s));
    wait_in_flight(s, 0);

    moe_rpc_server_free(s);
    ASSERT_TRUE(access(sock, F_OK) < 0); /* the socket is removed */
    grpc_channel_destroy(ch);
    grpc_channel_destroy(ch_unix);

    test_shutdown();
    test_tls(dir);

    grpc_shutdown();
    test_rmtree(dir);
    free(dir);
    printf("test-rpc: ok in %" PRIu64 " ms\n", now_ms() - t0);
    return 0;
}
