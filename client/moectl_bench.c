/*
 * moectl bench and moectl top: load and a live view of a running moed.
 *
 * bench: N caller threads, each with its own gRPC client (one channel per
 * thread, proto/rpc_client.h, which is not thread-safe), send Forward
 * requests through a model's MoE layers in order, as an inference engine
 * does.  Each caller keeps T tokens of hidden state that drift slowly from
 * step to step (an AR(1) process), so the router sees a stream with temporal
 * locality.  A step starts the residual stream x from those states; for each
 * layer the caller sends RMSNorm(x) and adds the layer's output, x += y.
 * Callers own their counters and latency histogram; the main thread reads
 * them only after joining the threads.  Shared between the threads: the stop
 * flag, the request budget and the progress count (atomics, see below).
 *
 * top: Status and Stats (with experts) every interval; each frame shows the
 * deltas between the last two answers.
 *
 * Both take the remote options (moectl.h, REMOTE_OPTIONS).  Exit status: 0
 * done, 1 the daemon cannot be reached or (bench) every request failed, 2 bad
 * usage.
 */
#include "moectl.h"

#include "common.h"
#include "dtype.h"
#include "rpc_client.h"

#include "moe.pb-c.h"
#include "moe_client.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_CALLERS 256
#define MAX_TOKENS 65536
/* moed refuses requests above 64 MiB by default. */
#define MAX_REQUEST_BYTES ((size_t)60 << 20)
#define MAX_DURATION_S 86400.0
#define MAX_REQUESTS 1000000000L
#define DEFAULT_SEED 0x5eedu
/* Per step, a token's state keeps this much of itself (AR(1) coefficient). */
#define DRIFT_KEEP 0.98
/* A caller waits this long after a failed call, so a dead daemon is not
 * hammered in a tight loop. */
#define ERROR_BACKOFF_NS 10000000L

/* gRPC status codes 0..16, and one for answers that cannot be used. */
#define NSTATUS 18
#define STATUS_BAD_ANSWER 17

static const char forward_method[] = "/moe.v1.Experts/Forward";

/* Set by SIGINT/SIGTERM: bench stops early and reports, top exits. */
static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* Catches SIGINT and SIGTERM once; a second one kills as usual.  No
 * SA_RESTART, so a sleep returns early. */
static void catch_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static const char *status_name(int s)
{
    return s == STATUS_BAD_ANSWER ? "BAD_ANSWER" : moe_rpc_status_name(s);
}

static uint64_t delta(uint64_t cur, uint64_t prev)
{
    /* A counter that went back was reset (the model was reloaded). */
    return cur >= prev ? cur - prev : cur;
}

static double ratio(uint64_t a, uint64_t b)
{
    return b ? (double)a / (double)b : 0.0;
}

static const Moe__V1__CacheCounters zero_counters = MOE__V1__CACHE_COUNTERS__INIT;

static const Moe__V1__CacheCounters *counters_of(const Moe__V1__CacheCounters *c)
{
    return c ? c : &zero_counters;
}

/* Parses seconds in (0, max] for option opt; -1 after printing. */
static int parse_seconds(const char *opt, const char *s, double max, double *ret)
{
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || *end || !(v > 0) || v > max) {
        errorf("%s '%s': expected seconds, more than 0 and at most %.0f", opt, s, max);
        return -1;
    }
    *ret = v;
    return 0;
}

/* ---- latency histogram -------------------------------------------------- */

/* Log-linear: 32 buckets per power of two, values within 3.2%. */
#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

static size_t hist_index(uint64_t v)
{
    int e;

    if (v < HIST_SUB)
        return (size_t)v;
    e = 63 - __builtin_clzll(v);
    return (size_t)(e - HIST_SUB_BITS + 1) * HIST_SUB +
           (size_t)((v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1));
}

/* The middle of bucket i. */
static uint64_t hist_value(size_t i)
{
    size_t g = i / HIST_SUB, sub = i % HIST_SUB;
    int shift;

    if (g == 0)
        return sub;
    shift = (int)g - 1;
    return (((uint64_t)HIST_SUB + sub) << shift) + (((uint64_t)1 << shift) >> 1);
}

/* The q quantile of the n values in h. */
static uint64_t hist_quantile(const uint64_t *h, uint64_t n, double q)
{
    uint64_t rank = (uint64_t)ceil(q * (double)n), seen = 0;

    if (rank < 1)
        rank = 1;
    for (size_t i = 0; i < HIST_BUCKETS; i++) {
        seen += h[i];
        if (seen >= rank)
            return hist_value(i);
    }
    return 0;
}

/* ---- bench -------------------------------------------------------------- */

struct bench;

/* One caller thread's state.  Written only by its thread until joined. */
struct caller {
    struct bench *b;
    int id;
    pthread_t thread;
    bool started;                  /* thread created */
    struct moe_rpc_client *client; /* its own channel (gRPC) */
    struct moe_session *sess;      /* its own session (shm) */
    uint8_t *sin, *sout;           /* its input and output in the session's arena */
    uint64_t rng;                  /* xorshift64* state */
    float *state;                  /* [T, H] drifting hidden states */
    float *x;                      /* [T, H] residual stream of the step */
    float *h;                      /* [T, H] RMSNorm(x), sent */
    uint16_t *half;                /* [T, H] h as bf16/f16 */
    uint8_t *req_buf;              /* packed request */
    size_t req_cap;
    /* results */
    uint64_t requests; /* calls made */
    uint64_t ok;       /* calls answered OK with a usable output */
    uint64_t errors[NSTATUS];
    char first_error[NSTATUS][200]; /* the first message of each status */
    uint64_t hist[HIST_BUCKETS];    /* client-side latency, ns */
    uint64_t max_ns;
    uint64_t timed; /* answers with a timing */
    uint64_t queue_ns, route_ns, load_ns, compute_ns, total_ns, batch_requests;
    uint64_t cache_hits, cache_misses;
};

struct bench {
    struct moectl_remote r;
    const char *model;
    uint32_t *layers; /* the MoE layers run, in order */
    size_t n_layers;
    int64_t tokens, hidden;
    int callers;
    double duration_s;     /* 0 with --requests */
    uint64_t max_requests; /* 0 with --duration */
    enum moe_dtype dtype;
    uint64_t seed;
    bool quiet;
    bool shm;             /* the shared-memory transport (libmoe-client) */
    uint32_t model_id;    /* shm: the model's id */
    uint64_t deadline_ns; /* moe_now_ns() clock; 0 with --requests */
    /* Set by the main thread (deadline, Ctrl-C) or a caller that saw the
     * request budget spent.  Relaxed: a flag polled between calls, it
     * publishes no data; the results are read after pthread_join. */
    atomic_bool stop;
    /* Requests claimed against --requests.  Relaxed: only its own value
     * matters (fetch_add hands out each number once). */
    atomic_uint_fast64_t claimed;
    /* Calls finished, for the progress line.  Relaxed: a statistic. */
    atomic_uint_fast64_t done;
    struct caller *c;
};

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* A standard normal value (Box-Muller, one of the pair). */
static float rng_normal(uint64_t *s)
{
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;

    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

static Moe__V1__DType wire_dtype(enum moe_dtype t)
{
    switch (t) {
    case MOE_DTYPE_BF16:
        return MOE__V1__DTYPE__DTYPE_BF16;
    case MOE_DTYPE_F16:
        return MOE__V1__DTYPE__DTYPE_F16;
    default:
        return MOE__V1__DTYPE__DTYPE_F32;
    }
}

static void caller_fail(struct caller *c, int status, const char *msg)
{
    if (status < 0 || status >= NSTATUS)
        status = 2; /* UNKNOWN */
    if (c->errors[status]++ == 0)
        snprintf(c->first_error[status], sizeof(c->first_error[status]), "%.199s", msg);
}

/* Adds moed's output to the residual stream x; -1 with msg when it is not
 * [T, H] of a known type. */
static int add_output(struct caller *c, const Moe__V1__Tensor *o, char *msg, size_t len)
{
    const struct bench *b = c->b;
    size_t n = (size_t)b->tokens * (size_t)b->hidden, esz;

    if (!o || o->n_shape != 2 || o->shape[0] != b->tokens || o->shape[1] != b->hidden) {
        snprintf(msg, len, "an output of another shape than [%lld, %lld]", (long long)b->tokens,
                 (long long)b->hidden);
        return -1;
    }
    if (o->dtype == MOE__V1__DTYPE__DTYPE_F32)
        esz = 4;
    else if (o->dtype == MOE__V1__DTYPE__DTYPE_BF16 || o->dtype == MOE__V1__DTYPE__DTYPE_F16)
        esz = 2;
    else
        esz = 0;
    if (!esz || o->data.len != n * esz) {
        snprintf(msg, len, "an output of type %d and %zu bytes", (int)o->dtype, o->data.len);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        float y;

        if (esz == 4) {
            memcpy(&y, o->data.data + 4 * i, 4);
        } else {
            uint16_t v;

            memcpy(&v, o->data.data + 2 * i, 2);
            y = o->dtype == MOE__V1__DTYPE__DTYPE_BF16 ? moe_bf16_to_f32(v) : moe_f16_to_f32(v);
        }
        /* Synthetic weights can overflow; keep the stream finite. */
        if (isfinite(y))
            c->x[i] += y;
    }
    return 0;
}

/* h = RMSNorm(x) per token, the input of a MoE layer. */
static void rms_norm(const struct bench *b, const float *x, float *h)
{
    for (int64_t t = 0; t < b->tokens; t++) {
        const float *xr = x + t * b->hidden;
        float *hr = h + t * b->hidden;
        double ss = 0;

        for (int64_t i = 0; i < b->hidden; i++)
            ss += (double)xr[i] * xr[i];
        ss = 1.0 / sqrt(ss / (double)b->hidden + 1e-6);
        if (!isfinite(ss))
            ss = 1.0;
        for (int64_t i = 0; i < b->hidden; i++)
            hr[i] = (float)(xr[i] * ss);
    }
}

/* Claims the next request: false when the run is over. */
static bool claim(struct bench *b)
{
    if (atomic_load_explicit(&b->stop, memory_order_relaxed))
        return false;
    if (b->max_requests) {
        if (atomic_fetch_add_explicit(&b->claimed, 1, memory_order_relaxed) >= b->max_requests) {
            atomic_store_explicit(&b->stop, true, memory_order_relaxed);
            return false;
        }
    } else if (moe_now_ns() >= b->deadline_ns) {
        return false;
    }
    return true;
}

/* One Forward of layer through c's client; accounts for it. */
static void call_layer(struct caller *c, uint32_t layer)
{
    struct bench *b = c->b;
    Moe__V1__ForwardRequest req = MOE__V1__FORWARD_REQUEST__INIT;
    Moe__V1__Tensor hidden = MOE__V1__TENSOR__INIT;
    Moe__V1__ForwardResponse *resp;
    size_t n = (size_t)b->tokens * (size_t)b->hidden, len, resp_len;
    int64_t shape[2] = {b->tokens, b->hidden};
    uint8_t *out = NULL;
    char msg[512];
    uint64_t t0, ns;
    int status;

    rms_norm(b, c->x, c->h);
    hidden.n_shape = 2;
    hidden.shape = shape;
    hidden.dtype = wire_dtype(b->dtype);
    if (b->dtype == MOE_DTYPE_F32) {
        hidden.data.data = (uint8_t *)c->h;
        hidden.data.len = n * 4;
    } else {
        for (size_t i = 0; i < n; i++)
            c->half[i] =
                b->dtype == MOE_DTYPE_BF16 ? moe_f32_to_bf16(c->h[i]) : moe_f32_to_f16(c->h[i]);
        hidden.data.data = (uint8_t *)c->half;
        hidden.data.len = n * 2;
    }
    req.model = (char *)b->model;
    req.layer = layer;
    req.hidden = &hidden;
    req.tag = c->requests;
    len = moe__v1__forward_request__get_packed_size(&req);
    if (len > c->req_cap) {
        uint8_t *p = realloc(c->req_buf, len);

        if (!p) {
            c->requests++;
            caller_fail(c, 8 /* RESOURCE_EXHAUSTED */, "out of memory for a request");
            return;
        }
        c->req_buf = p;
        c->req_cap = len;
    }
    moe__v1__forward_request__pack(&req, c->req_buf);

    t0 = moe_now_ns();
    status = moe_rpc_client_call(c->client, forward_method, c->req_buf, len, &out, &resp_len, msg,
                                 sizeof(msg));
    ns = moe_now_ns() - t0;
    c->requests++;
    /* Relaxed: a count for the progress line only. */
    atomic_fetch_add_explicit(&b->done, 1, memory_order_relaxed);
    if (status != 0) {
        struct timespec ts = {0, ERROR_BACKOFF_NS};

        caller_fail(c, status, msg);
        nanosleep(&ts, NULL);
        return;
    }
    resp = moe__v1__forward_response__unpack(NULL, resp_len, out);
    free(out);
    if (!resp) {
        caller_fail(c, STATUS_BAD_ANSWER, "an answer that is not a ForwardResponse");
        return;
    }
    if (add_output(c, resp->output, msg, sizeof(msg)) < 0) {
        caller_fail(c, STATUS_BAD_ANSWER, msg);
        moe__v1__forward_response__free_unpacked(resp, NULL);
        return;
    }
    c->ok++;
    c->hist[hist_index(ns)]++;
    c->max_ns = MOE_MAX(c->max_ns, ns);
    if (resp->timing) {
        const Moe__V1__Timing *tm = resp->timing;

        c->timed++;
        c->queue_ns += tm->queue_ns;
        c->route_ns += tm->route_ns;
        c->load_ns += tm->load_ns;
        c->compute_ns += tm->compute_ns;
        c->total_ns += tm->total_ns;
        c->batch_requests += tm->batch_requests;
    }
    c->cache_hits += resp->cache_hits;
    c->cache_misses += resp->cache_misses;
    moe__v1__forward_response__free_unpacked(resp, NULL);
}

/* -errno of libmoe-client as the nearest gRPC status, for the report. */
static int shm_status(int e)
{
    switch (e) {
    case -EINVAL:
    case -ERANGE:
        return 3; /* INVALID_ARGUMENT */
    case -ENOENT:
        return 5; /* NOT_FOUND */
    case -ENOMEM:
    case -ENOSPC:
    case -EAGAIN:
        return 8; /* RESOURCE_EXHAUSTED */
    case -ESHUTDOWN:
    case -ECONNRESET:
    case -ECONNREFUSED:
        return 14; /* UNAVAILABLE */
    case -ETIMEDOUT:
        return 4; /* DEADLINE_EXCEEDED */
    default:
        return 13; /* INTERNAL */
    }
}

/* The same call through the caller's shared-memory session: the hidden
 * states go straight into the arena, the output is read from it. */
static void call_layer_shm(struct caller *c, uint32_t layer)
{
    struct bench *b = c->b;
    size_t n = (size_t)b->tokens * (size_t)b->hidden;
    struct moe_completion cq = {0};
    struct moe_request rq = {
        .op = MOE_OP_FORWARD,
        .model = b->model_id,
        .layer = (int)layer,
        .dtype = b->dtype == MOE_DTYPE_BF16  ? MOE_BF16
                 : b->dtype == MOE_DTYPE_F16 ? MOE_F16
                                             : MOE_F32,
        .n_tokens = (uint32_t)b->tokens,
        .input = c->sin,
        .output = c->sout,
        .tag = c->requests,
    };
    uint64_t t0, ns;
    int rc;

    rms_norm(b, c->x, c->h);
    if (b->dtype == MOE_DTYPE_F32) {
        memcpy(c->sin, c->h, n * 4);
    } else {
        uint16_t *half = (uint16_t *)c->sin;

        for (size_t i = 0; i < n; i++)
            half[i] =
                b->dtype == MOE_DTYPE_BF16 ? moe_f32_to_bf16(c->h[i]) : moe_f32_to_f16(c->h[i]);
    }
    t0 = moe_now_ns();
    rc = moe_forward(c->sess, &rq, &cq);
    ns = moe_now_ns() - t0;
    c->requests++;
    /* Relaxed: a count for the progress line only. */
    atomic_fetch_add_explicit(&b->done, 1, memory_order_relaxed);
    if (rc < 0) {
        struct timespec ts = {0, ERROR_BACKOFF_NS};

        caller_fail(c, shm_status(rc),
                    cq.status < 0 && cq.msg[0] ? cq.msg : moe_last_error(c->sess));
        if (rc == -ECONNRESET) /* the session is gone for good */
            atomic_store_explicit(&b->stop, true, memory_order_relaxed);
        nanosleep(&ts, NULL);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float y;

        if (b->dtype == MOE_DTYPE_F32) {
            memcpy(&y, c->sout + 4 * i, 4);
        } else {
            uint16_t v;

            memcpy(&v, c->sout + 2 * i, 2);
            y = b->dtype == MOE_DTYPE_BF16 ? moe_bf16_to_f32(v) : moe_f16_to_f32(v);
        }
        if (isfinite(y))
            c->x[i] += y;
    }
    c->ok++;
    c->hist[hist_index(ns)]++;
    c->max_ns = MOE_MAX(c->max_ns, ns);
    c->timed++;
    c->queue_ns += cq.queue_ns;
    c->compute_ns += cq.compute_ns;
    c->total_ns += cq.total_ns;
    c->batch_requests += cq.batch_requests;
    c->cache_hits += cq.hits;
    c->cache_misses += cq.misses;
}

static void *caller_main(void *arg)
{
    struct caller *c = arg;
    struct bench *b = c->b;
    size_t n = (size_t)b->tokens * (size_t)b->hidden;
    const float keep = (float)DRIFT_KEEP, fresh = (float)sqrt(1.0 - DRIFT_KEEP * DRIFT_KEEP);

    for (;;) {
        /* A step: one token position of T sequences through every layer. */
        memcpy(c->x, c->state, n * sizeof(*c->x));
        for (size_t l = 0; l < b->n_layers; l++) {
            if (!claim(b))
                return NULL;
            if (b->shm)
                call_layer_shm(c, b->layers[l]);
            else
                call_layer(c, b->layers[l]);
        }
        for (size_t i = 0; i < n; i++)
            c->state[i] = keep * c->state[i] + fresh * rng_normal(&c->rng);
    }
}

static void caller_free(struct caller *c)
{
    moe_rpc_client_close(c->client);
    moe_close(c->sess); /* and its arena buffers */
    free(c->state);
    free(c->x);
    free(c->h);
    free(c->half);
    free(c->req_buf);
}

static const char bench_text[] =
    "Loads moed with Forward requests and reports throughput, latency, moed's own\n"
    "timings and the cache hit rate.  N caller threads (--callers, default 4), each\n"
    "with its own connection, run T tokens (--tokens, default 1) of random hidden\n"
    "states through the model's MoE layers in order (--layers, default all), like an\n"
    "inference engine: a step starts the residual stream x from the caller's states,\n"
    "each layer gets RMSNorm(x) and its output is added back, x += y.  Between steps\n"
    "the states drift slowly (each keeps 98% of itself), so the cache sees a stream\n"
    "with temporal locality.  The model's hidden size and MoE layers come from moed.\n"
    "\n"
    "  --model NAME          a loaded model (required)\n"
    "  --layers all|L,L,...  the MoE layers to run, in this order (default all)\n"
    "  --tokens T            tokens per request (default 1)\n"
    "  --callers N           caller threads (default 4, at most 256)\n"
    "  --duration S          run S seconds (default 10)\n"
    "  --requests R          or make R requests in all\n"
    "  --dtype f32|bf16|f16  the hidden states' type on the wire (default f32)\n"
    "  --seed S              seed of the random states (default 0x5eed)\n"
    "  --transport grpc|shm  how to reach moed: gRPC (--remote or its gRPC --socket),\n"
    "                        or shared memory through libmoe-client (--socket naming\n"
    "                        moed's shm_socket; then each caller has its own session\n"
    "                        and the hit rate is that of the run's own requests).\n"
    "                        Default: shm when --socket is the shared-memory socket\n"
    "  -q, --quiet           no progress on stderr\n"
    "\n"
    "Progress goes to stderr (a bar on a terminal, a line a second otherwise).  At\n"
    "the end: requests (layer calls), token rows, errors by status, tokens/s through\n"
    "the layers run (token rows / layers), layer calls/s and token rows/s, client-side\n"
    "latency p50/p99/max, moed's mean queue/route/load/compute times and batch size,\n"
    "and the hit rate of cache tier 0 over the run (from Stats before and after; it\n"
    "counts every client of moed).  --json prints one JSON object.  Failed requests\n"
    "are counted; if all fail, the exit status is 1.  Ctrl-C stops early and reports.\n";

#define BENCH_SYNOPSIS                                                                             \
    "bench --model NAME [--layers all|L,L,...] [--tokens T] [--callers N]\n"                       \
    "                    [--duration S | --requests R] [--dtype f32|bf16|f16] [--seed S]\n"        \
    "                    [--transport grpc|shm] [-q]"

/* Parses --layers into *ret (malloc'd); -1 after printing. */
static int parse_layers(const char *s, uint32_t **ret, size_t *n_ret)
{
    size_t cap = 1, n = 0;
    uint32_t *v;
    const char *p = s;

    for (const char *q = s; *q; q++)
        cap += *q == ',';
    v = calloc(cap, sizeof(*v));
    if (!v) {
        errorf("bench: out of memory");
        return -1;
    }
    for (;;) {
        char *end;
        long l;

        errno = 0;
        l = strtol(p, &end, 10);
        if (errno || end == p || (*end && *end != ',') || l < 0 || l > INT32_MAX || *p == '-' ||
            *p == '+' || *p == ' ') {
            errorf("bench: --layers '%s': expected all or layer numbers separated by commas", s);
            free(v);
            return -1;
        }
        v[n++] = (uint32_t)l;
        if (!*end)
            break;
        p = end + 1;
    }
    *ret = v;
    *n_ret = n;
    return 0;
}

/* Looks the model up and checks the layers and tokens against it.  Returns
 * 0, 1 (failed, printed) or 2 (bad usage, printed). */
static int bench_model(struct bench *b, const char *layers_arg)
{
    Moe__V1__ListModelsRequest req = MOE__V1__LIST_MODELS_REQUEST__INIT;
    Moe__V1__ListModelsResponse *lm = NULL;
    const Moe__V1__ModelInfo *m = NULL;
    size_t esz = b->dtype == MOE_DTYPE_F32 ? 4 : 2;
    int ret;

    ret = remote_call(&b->r, "/moe.v1.Control/ListModels", &req.base,
                      &moe__v1__list_models_response__descriptor, (ProtobufCMessage **)&lm);
    if (ret)
        return ret;
    ret = 1;
    for (size_t i = 0; i < lm->n_models; i++)
        if (strcmp(lm->models[i]->name, b->model) == 0)
            m = lm->models[i];
    if (!m) {
        char names[512] = "";

        for (size_t i = 0; i < lm->n_models && strlen(names) + 80 < sizeof(names); i++)
            snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s", i ? ", " : "",
                     lm->models[i]->name);
        errorf("bench: moed at %s has no model '%s' (%s%s)", b->r.target, b->model,
               lm->n_models ? "it has " : "it has none; moectl load loads one", names);
        goto out;
    }
    if (m->hidden == 0 || m->n_moe_layer_ids == 0) {
        errorf("bench: model '%s' has %s; nothing to run", b->model,
               m->hidden ? "no MoE layers" : "hidden size 0");
        goto out;
    }
    b->hidden = m->hidden;
    if (!layers_arg || strcmp(layers_arg, "all") == 0) {
        b->layers = malloc(m->n_moe_layer_ids * sizeof(*b->layers));
        if (!b->layers) {
            errorf("bench: out of memory");
            goto out;
        }
        memcpy(b->layers, m->moe_layer_ids, m->n_moe_layer_ids * sizeof(*b->layers));
        b->n_layers = m->n_moe_layer_ids;
    } else {
        if (parse_layers(layers_arg, &b->layers, &b->n_layers) < 0) {
            ret = 2;
            goto out;
        }
        for (size_t i = 0; i < b->n_layers; i++) {
            bool found = false;

            for (size_t k = 0; k < m->n_moe_layer_ids; k++)
                found |= m->moe_layer_ids[k] == b->layers[i];
            if (!found) {
                errorf("bench: --layers: layer %u is not a MoE layer of '%s' (its MoE layers: "
                       "%u to %u; moectl models lists them)",
                       b->layers[i], b->model, m->moe_layer_ids[0],
                       m->moe_layer_ids[m->n_moe_layer_ids - 1]);
                ret = 2;
                goto out;
            }
        }
    }
    if ((size_t)b->tokens * (size_t)b->hidden * esz > MAX_REQUEST_BYTES) {
        errorf("bench: --tokens %lld: requests of %lld x %lld values are too large for moed "
               "(at most %zu MiB); use fewer tokens",
               (long long)b->tokens, (long long)b->tokens, (long long)b->hidden,
               MAX_REQUEST_BYTES >> 20);
        ret = 2;
        goto out;
    }
    ret = 0;
out:
    protobuf_c_message_free_unpacked(&lm->base, NULL);
    return ret;
}

/* bench_model through a shared-memory session. */
static int bench_model_shm(struct bench *b, const char *layers_arg)
{
    struct moe_session *s;
    struct moe_model_info m;
    int ret = 1, k = 0;

    if (moe_connect(b->r.socket, NULL, &s) < 0) {
        errorf("bench: cannot reach moed at %s: %s", b->r.socket, moe_connect_error());
        return 1;
    }
    if (moe_model_find(s, b->model, &m) < 0) {
        errorf("bench: %s", moe_last_error(s));
        goto out;
    }
    b->hidden = m.hidden;
    b->model_id = m.id;
    if (!layers_arg || strcmp(layers_arg, "all") == 0) {
        b->layers = calloc((size_t)m.n_layers, sizeof(*b->layers));
        if (!b->layers) {
            errorf("bench: out of memory");
            goto out;
        }
        for (int l = 0; l < m.n_layers; l++)
            if (moe_model_is_moe_layer(&m, l))
                b->layers[k++] = (uint32_t)l;
        b->n_layers = (size_t)k;
        if (!k) {
            errorf("bench: model '%s' has no MoE layers; nothing to run", b->model);
            goto out;
        }
    } else {
        if (parse_layers(layers_arg, &b->layers, &b->n_layers) < 0) {
            ret = 2;
            goto out;
        }
        for (size_t i = 0; i < b->n_layers; i++)
            if (!moe_model_is_moe_layer(&m, (int)b->layers[i])) {
                errorf("bench: --layers: layer %u is not a MoE layer of '%s' (moectl models "
                       "lists them)",
                       b->layers[i], b->model);
                ret = 2;
                goto out;
            }
    }
    ret = 0;
out:
    moe_close(s);
    return ret;
}

/* Tier 0's counters now; false (and a warning) when Stats fails. */
static bool tier0_counters(struct bench *b, Moe__V1__CacheCounters *ret, char *name, size_t len)
{
    Moe__V1__StatsRequest req = MOE__V1__STATS_REQUEST__INIT;
    Moe__V1__StatsResponse *s = NULL;

    if (remote_call(&b->r, "/moe.v1.Control/Stats", &req.base, &moe__v1__stats_response__descriptor,
                    (ProtobufCMessage **)&s))
        return false;
    if (s->n_tiers == 0) {
        protobuf_c_message_free_unpacked(&s->base, NULL);
        return false;
    }
    *ret = *counters_of(s->tiers[0]->counters);
    snprintf(name, len, "%s", s->tiers[0]->name);
    protobuf_c_message_free_unpacked(&s->base, NULL);
    return true;
}

/* Prints progress on stderr: a bar on a terminal, a plain line otherwise. */
static void bench_progress(struct bench *b, uint64_t start, bool tty, bool last)
{
    /* Relaxed: a statistic (see struct bench). */
    uint64_t done = atomic_load_explicit(&b->done, memory_order_relaxed);
    double el = (double)(moe_now_ns() - start) / 1e9, frac;
    char what[64];
    int fill;

    if (b->max_requests) {
        frac = (double)done / (double)b->max_requests;
        snprintf(what, sizeof(what), "%llu/%llu requests", (unsigned long long)done,
                 (unsigned long long)b->max_requests);
    } else {
        frac = el / b->duration_s;
        snprintf(what, sizeof(what), "%.1f/%.1f s", MOE_MIN(el, b->duration_s), b->duration_s);
    }
    frac = frac < 0 ? 0 : frac > 1 ? 1 : frac;
    if (!tty) {
        fprintf(stderr, "bench: %s, %llu requests, %.1f requests/s\n", what,
                (unsigned long long)done, el > 0 ? (double)done / el : 0.0);
        return;
    }
    fill = (int)(frac * 30);
    fprintf(stderr, "\r[%.*s%*s] %s, %.1f requests/s\033[K", fill, "##############################",
            30 - fill, "", what, el > 0 ? (double)done / el : 0.0);
    if (last)
        fputs("\r\033[K", stderr);
    fflush(stderr);
}

/* Waits for the callers, showing progress and stopping them at the deadline
 * or on Ctrl-C. */
static void bench_wait(struct bench *b, uint64_t start)
{
    bool tty = isatty(STDERR_FILENO);
    uint64_t step = tty ? 200000000u : 1000000000u, next = start + step;

    for (;;) {
        struct timespec ts = {0, 20000000};
        uint64_t now;
        bool all_done;

        nanosleep(&ts, NULL);
        now = moe_now_ns();
        if (interrupted || (b->deadline_ns && now >= b->deadline_ns))
            atomic_store_explicit(&b->stop, true, memory_order_relaxed);
        /* Done once every caller has spent its budget: claimed counts past
         * max_requests, or the stop flag is up and the callers return. */
        all_done = atomic_load_explicit(&b->stop, memory_order_relaxed) ||
                   (b->max_requests &&
                    atomic_load_explicit(&b->done, memory_order_relaxed) >= b->max_requests);
        if (all_done)
            break;
        if (!b->quiet && now >= next) {
            bench_progress(b, start, tty, false);
            next += step;
        }
    }
    for (int i = 0; i < b->callers; i++)
        if (b->c[i].started)
            pthread_join(b->c[i].thread, NULL);
    if (!b->quiet && tty)
        bench_progress(b, start, tty, true);
}

static int bench_report(struct bench *b, double elapsed, bool have_cache,
                        const Moe__V1__CacheCounters *c0, const Moe__V1__CacheCounters *c1,
                        const char *tier)
{
    uint64_t requests = 0, ok = 0, errors[NSTATUS] = {0}, nerr = 0, max_ns = 0, timed = 0;
    uint64_t q = 0, ro = 0, lo = 0, co = 0, to = 0, br = 0, hits = 0, misses = 0, ph = 0;
    uint64_t shm_hits = 0, shm_misses = 0;
    uint64_t *hist = calloc(HIST_BUCKETS, sizeof(*hist));
    const char *first_error[NSTATUS] = {0};
    double rps, rows_ps, tps, p50, p99;
    uint64_t rows;
    int ret = 0;

    if (!hist) {
        errorf("bench: out of memory");
        return 1;
    }
    for (int i = 0; i < b->callers; i++) {
        const struct caller *c = &b->c[i];

        requests += c->requests;
        ok += c->ok;
        for (int s = 0; s < NSTATUS; s++) {
            errors[s] += c->errors[s];
            nerr += c->errors[s];
            if (c->errors[s] && !first_error[s])
                first_error[s] = c->first_error[s];
        }
        for (size_t k = 0; k < HIST_BUCKETS; k++)
            hist[k] += c->hist[k];
        max_ns = MOE_MAX(max_ns, c->max_ns);
        timed += c->timed;
        q += c->queue_ns;
        ro += c->route_ns;
        lo += c->load_ns;
        co += c->compute_ns;
        to += c->total_ns;
        br += c->batch_requests;
        shm_hits += c->cache_hits;
        shm_misses += c->cache_misses;
    }
    if (b->shm) {
        /* From the completions: this run's requests only. */
        have_cache = true;
        hits = shm_hits;
        misses = shm_misses;
        tier = "of the batches serving this run";
    } else if (have_cache) {
        hits = delta(c1->hits, c0->hits);
        misses = delta(c1->misses, c0->misses);
        ph = delta(c1->prefetch_hits, c0->prefetch_hits);
    }
    /* A request is one layer call of b->tokens token rows; a token through
     * the model takes one call per MoE layer run. */
    rps = elapsed > 0 ? (double)ok / elapsed : 0;
    rows = ok * (uint64_t)b->tokens;
    rows_ps = rps * (double)b->tokens;
    tps = rows_ps / (double)MOE_MAX(b->n_layers, (size_t)1);
    p50 = ok ? (double)hist_quantile(hist, ok, 0.50) / 1e6 : 0;
    p99 = ok ? (double)hist_quantile(hist, ok, 0.99) / 1e6 : 0;
    free(hist);

    if (b->r.json) {
        json_t *j = json_object(), *layers = json_array(), *ebs = json_object();

        for (size_t i = 0; i < b->n_layers; i++)
            json_array_append_new(layers, json_integer(b->layers[i]));
        for (int s = 0; s < NSTATUS; s++)
            if (errors[s])
                json_object_set_new(ebs, status_name(s), json_integer((json_int_t)errors[s]));
        json_object_set_new(j, "model", json_string(b->model));
        json_object_set_new(j, "transport", json_string(b->shm ? "shm" : "grpc"));
        json_object_set_new(j, "layers", layers);
        json_object_set_new(j, "callers", json_integer(b->callers));
        json_object_set_new(j, "tokens_per_request", json_integer(b->tokens));
        json_object_set_new(j, "dtype", json_string(moe_dtype_user_name(b->dtype)));
        json_object_set_new(j, "elapsed_s", json_real(elapsed));
        json_object_set_new(j, "requests", json_integer((json_int_t)requests));
        json_object_set_new(j, "ok", json_integer((json_int_t)ok));
        json_object_set_new(j, "token_rows", json_integer((json_int_t)rows));
        json_object_set_new(j, "model_tokens",
                            json_integer((json_int_t)(rows / MOE_MAX(b->n_layers, (size_t)1))));
        /* Deprecated: "tokens" and "tokens_per_s" are token rows (a token
         * once per layer); kept for the scripts that read them. */
        json_object_set_new(j, "tokens", json_integer((json_int_t)rows));
        json_object_set_new(j, "errors", json_integer((json_int_t)nerr));
        json_object_set_new(j, "errors_by_status", ebs);
        json_object_set_new(j, "requests_per_s", json_real(rps));
        json_object_set_new(j, "layer_calls_per_s", json_real(rps));
        json_object_set_new(j, "token_rows_per_s", json_real(rows_ps));
        json_object_set_new(j, "model_tokens_per_s", json_real(tps));
        json_object_set_new(j, "tokens_per_s", json_real(rows_ps));
        json_object_set_new(
            j, "latency_ms",
            json_pack("{sf sf sf}", "p50", p50, "p99", p99, "max", (double)max_ns / 1e6));
        json_object_set_new(j, "server_ms",
                            json_pack("{sf sf sf sf sf}", "queue", ratio(q, timed) / 1e6, "route",
                                      ratio(ro, timed) / 1e6, "load", ratio(lo, timed) / 1e6,
                                      "compute", ratio(co, timed) / 1e6, "total",
                                      ratio(to, timed) / 1e6));
        json_object_set_new(j, "mean_batch_requests", json_real(ratio(br, timed)));
        if (have_cache)
            json_object_set_new(j, "cache",
                                json_pack("{ss sI sI sf sI}", "tier", tier, "hits",
                                          (json_int_t)hits, "misses", (json_int_t)misses,
                                          "hit_rate", ratio(hits, hits + misses), "prefetch_hits",
                                          (json_int_t)ph));
        else
            json_object_set_new(j, "cache", json_null());
        ret = print_json(&b->r, j);
    } else {
        printf("bench %s at %s (%s): %d caller%s, %lld token%s per request, %zu MoE layer%s, "
               "%s, %.1f s\n",
               b->model, b->r.target, b->shm ? "shared memory" : "gRPC", b->callers,
               b->callers == 1 ? "" : "s", (long long)b->tokens, b->tokens == 1 ? "" : "s",
               b->n_layers, b->n_layers == 1 ? "" : "s", moe_dtype_user_name(b->dtype), elapsed);
        printf("  requests   %llu layer calls (%llu ok, %llu token rows)\n",
               (unsigned long long)requests, (unsigned long long)ok, (unsigned long long)rows);
        printf("  errors     %llu", (unsigned long long)nerr);
        for (int s = 0, k = 0; s < NSTATUS; s++)
            if (errors[s])
                printf("%s%s %llu", k++ ? ", " : ": ", status_name(s),
                       (unsigned long long)errors[s]);
        printf("\n  throughput %.1f tokens/s through the %zu MoE layer%s; %.1f layer calls/s "
               "(%.1f token rows/s)\n",
               tps, b->n_layers, b->n_layers == 1 ? "" : "s", rps, rows_ps);
        printf("  latency    p50 %.3f ms, p99 %.3f ms, max %.3f ms (client side)\n", p50, p99,
               (double)max_ns / 1e6);
        printf("  in moed    queue %.3f, route %.3f, load %.3f, compute %.3f, total %.3f ms "
               "(means)\n",
               ratio(q, timed) / 1e6, ratio(ro, timed) / 1e6, ratio(lo, timed) / 1e6,
               ratio(co, timed) / 1e6, ratio(to, timed) / 1e6);
        printf("  batches    %.2f requests per batch (mean, as moed reported)\n", ratio(br, timed));
        if (have_cache)
            printf("  cache      tier %s: hit rate %.1f%% (%llu hits, %llu misses), %llu "
                   "prefetch hits, over the run\n",
                   tier, 100.0 * ratio(hits, hits + misses), (unsigned long long)hits,
                   (unsigned long long)misses, (unsigned long long)ph);
        else
            printf("  cache      unknown (Stats failed)\n");
    }
    for (int s = 0; s < NSTATUS; s++)
        if (first_error[s])
            errorf("bench: %llu request%s failed with %s, the first: %s",
                   (unsigned long long)errors[s], errors[s] == 1 ? "" : "s", status_name(s),
                   first_error[s]);
    if (requests && !ok) {
        errorf("bench: every request failed");
        ret = 1;
    }
    return ret;
}

int moectl_bench(int argc, char **argv)
{
    enum { OPT_LAYERS = OPT_COMMAND, OPT_SEED, OPT_TRANSPORT };
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"model", required_argument, NULL, 'm'},
        {"layers", required_argument, NULL, OPT_LAYERS},
        {"tokens", required_argument, NULL, 't'},
        {"callers", required_argument, NULL, 'c'},
        {"duration", required_argument, NULL, 'd'},
        {"requests", required_argument, NULL, 'n'},
        {"dtype", required_argument, NULL, 'D'},
        {"seed", required_argument, NULL, OPT_SEED},
        {"transport", required_argument, NULL, OPT_TRANSPORT},
        {"quiet", no_argument, NULL, 'q'},
        {0},
    };
    struct bench b;
    Moe__V1__CacheCounters c0 = MOE__V1__CACHE_COUNTERS__INIT, c1 = MOE__V1__CACHE_COUNTERS__INIT;
    const char *layers_arg = NULL, *transport = NULL;
    bool remote_given = false, have_cache = false;
    char tier[64] = "", msg[1024];
    long v;
    int c, k, ret = 1;
    uint64_t start;
    size_t n;

    memset(&b, 0, sizeof(b));
    remote_init(&b.r, argv[0]);
    b.tokens = 1;
    b.callers = 4;
    b.dtype = MOE_DTYPE_F32;
    b.seed = DEFAULT_SEED;
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&b.r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'm':
            b.model = optarg;
            break;
        case OPT_LAYERS:
            layers_arg = optarg;
            break;
        case 't':
            if (parse_long("bench: --tokens", optarg, 1, MAX_TOKENS, &v) < 0)
                return 2;
            b.tokens = v;
            break;
        case 'c':
            if (parse_int("bench: --callers", optarg, 1, MAX_CALLERS, &b.callers) < 0)
                return 2;
            break;
        case 'd':
            if (parse_seconds("bench: --duration", optarg, MAX_DURATION_S, &b.duration_s) < 0)
                return 2;
            break;
        case 'n':
            if (parse_long("bench: --requests", optarg, 1, MAX_REQUESTS, &v) < 0)
                return 2;
            b.max_requests = (uint64_t)v;
            break;
        case 'D':
            if (moe_dtype_parse_user(optarg, &b.dtype) < 0 || !moe_dtype_is_compute(b.dtype)) {
                errorf("bench: --dtype '%s': expected f32, bf16 or f16", optarg);
                return 2;
            }
            break;
        case OPT_SEED:
            if (parse_u64("bench: --seed", optarg, &b.seed) < 0)
                return 2;
            break;
        case OPT_TRANSPORT:
            if (strcmp(optarg, "grpc") && strcmp(optarg, "shm")) {
                errorf("bench: --transport '%s': expected grpc or shm", optarg);
                return 2;
            }
            transport = optarg;
            break;
        case 'q':
            b.quiet = true;
            break;
        case 'h':
            remote_usage(stdout, BENCH_SYNOPSIS, bench_text);
            return 0;
        default:
            remote_usage(stderr, BENCH_SYNOPSIS, bench_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("bench: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!b.model || !*b.model) {
        errorf("bench: --model is required (moectl models lists them; see moectl bench --help)");
        return 2;
    }
    if (b.duration_s > 0 && b.max_requests) {
        errorf("bench: --duration and --requests both say when to stop; give one");
        return 2;
    }
    if (layers_arg && strcmp(layers_arg, "all") != 0) {
        uint32_t *l;

        if (parse_layers(layers_arg, &l, &n) < 0)
            return 2;
        free(l);
    }
    b.r.shm_ok = !transport || strcmp(transport, "shm") == 0;
    if (remote_check(&b.r, remote_given) < 0)
        return 2;
    if (transport && strcmp(transport, "shm") == 0 && !b.r.use_shm) {
        errorf("bench: --transport shm needs --socket naming moed's shared-memory socket "
               "(its shm_socket)%s",
               b.r.socket ? "; that one is not" : "");
        return 2;
    }
    b.shm = b.r.use_shm;
    if (!b.max_requests && !(b.duration_s > 0))
        b.duration_s = 10.0;

    ret = b.shm ? bench_model_shm(&b, layers_arg) : bench_model(&b, layers_arg);
    if (ret)
        goto out;
    ret = 1;
    n = (size_t)b.tokens * (size_t)b.hidden;
    b.c = calloc((size_t)b.callers, sizeof(*b.c));
    if (!b.c) {
        errorf("bench: out of memory for %d callers", b.callers);
        goto out;
    }
    for (int i = 0; i < b.callers; i++) {
        struct caller *cl = &b.c[i];

        cl->b = &b;
        cl->id = i;
        cl->rng = (b.seed + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 0xD1B54A32D192ED03ULL;
        if (!cl->rng)
            cl->rng = 1;
        cl->state = malloc(n * sizeof(float));
        cl->x = malloc(n * sizeof(float));
        cl->h = malloc(n * sizeof(float));
        cl->half = malloc(n * sizeof(uint16_t));
        if (!cl->state || !cl->x || !cl->h || !cl->half) {
            errorf("bench: out of memory for %d callers of %zu values", b.callers, n);
            goto out;
        }
        for (size_t j = 0; j < n; j++)
            cl->state[j] = rng_normal(&cl->rng);
        if (b.shm) {
            size_t esz = b.dtype == MOE_DTYPE_F32 ? 4 : 2;
            struct moe_session_opts so = {
                .sq_entries = 2,
                .arena_bytes = (2 * n * esz + 8192 + 4095) & ~(size_t)4095,
                .name = "moectl-bench",
            };

            if (moe_connect(b.r.socket, &so, &cl->sess) < 0) {
                errorf("bench: cannot reach moed at %s: %s", b.r.socket, moe_connect_error());
                goto out;
            }
            cl->sin = moe_alloc(cl->sess, n * esz);
            cl->sout = moe_alloc(cl->sess, n * esz);
            if (!cl->sin || !cl->sout) {
                errorf("bench: %s", moe_last_error(cl->sess));
                goto out;
            }
            continue;
        }
        if (moe_rpc_client_open(&b.r.cfg, &cl->client, msg, sizeof(msg)) < 0) {
            errorf("bench: cannot connect to moed at %s: %s", b.r.target, msg);
            goto out;
        }
    }
    /* Without Stats (remote_call said why) the report has no hit rate. */
    if (!b.shm)
        have_cache = tier0_counters(&b, &c0, tier, sizeof(tier));

    catch_signals();
    start = moe_now_ns();
    if (b.duration_s > 0)
        b.deadline_ns = start + (uint64_t)(b.duration_s * 1e9);
    for (int i = 0; i < b.callers; i++) {
        int r = pthread_create(&b.c[i].thread, NULL, caller_main, &b.c[i]);

        if (r) {
            errorf("bench: cannot start caller thread %d: %s; running with %d", i, strerror(r), i);
            if (i == 0)
                goto out;
            break;
        }
        b.c[i].started = true;
    }
    bench_wait(&b, start);
    {
        double elapsed = (double)(moe_now_ns() - start) / 1e9;

        if (have_cache)
            have_cache = tier0_counters(&b, &c1, tier, sizeof(tier));
        ret = bench_report(&b, elapsed, have_cache, &c0, &c1, tier);
    }
out:
    if (b.c)
        for (int i = 0; i < b.callers; i++)
            caller_free(&b.c[i]);
    free(b.c);
    free(b.layers);
    remote_close(&b.r);
    return ret;
}

/* ---- top ---------------------------------------------------------------- */

static const char top_text[] =
    "A live view of moed, refreshed every interval (--interval, default 1 s) from\n"
    "Status and Stats: layer calls/s (a request is one MoE layer's call), token\n"
    "rows/s (a token counts once per layer), batches/s and requests in flight; per\n"
    "model the tokens/s through its MoE layers (its token rows / its MoE layers);\n"
    "per cache tier the hit rate over the interval, resident experts, use of\n"
    "capacity, page-ins/s, bytes paged in per second and the page-in p50/p99 of the\n"
    "interval; per model and MoE layer the hit rate over the interval and a heat map\n"
    "of the load on each expert (hits + misses over the interval; one character per\n"
    "expert on the ramp ' .:-=+*#%@', scaled to the hottest expert shown; when the\n"
    "experts do not fit the terminal's width, a character shows the hottest of a\n"
    "group of experts).  (ALL) is the hit rate since moed started.\n"
    "On a terminal the view is redrawn in place, and says how many lines did not\n"
    "fit; otherwise, or with --iterations, frames are printed one after another.\n"
    "When moed stops answering (a restart, say), top says so and reconnects.\n"
    "Ctrl-C quits.\n"
    "\n"
    "  --interval S     seconds between frames (default 1)\n"
    "  --iterations N   print N frames and exit (default: until Ctrl-C)\n"
    "  --model NAME     only this model\n"
    "  --layer L        only MoE layer L (of each model shown)\n"
    "  --json           one JSON object per interval, one a line (JSON lines)\n";

#define TOP_SYNOPSIS "top [--interval S] [--iterations N] [--model NAME] [--layer L] [--json]"
#define MAX_INTERVAL_S 3600.0
static const char ramp[] = " .:-=+*#%@";

/* One Status and Stats answer, and when it came. */
struct snapshot {
    Moe__V1__StatusResponse *status;
    Moe__V1__StatsResponse *stats;
    uint64_t at_ns; /* moe_now_ns() */
};

static void snapshot_clear(struct snapshot *s)
{
    if (s->status)
        protobuf_c_message_free_unpacked(&s->status->base, NULL);
    if (s->stats)
        protobuf_c_message_free_unpacked(&s->stats->base, NULL);
    memset(s, 0, sizeof(*s));
}

static int snapshot_take(struct moectl_remote *r, struct snapshot *s)
{
    Moe__V1__StatusRequest sreq = MOE__V1__STATUS_REQUEST__INIT;
    Moe__V1__StatsRequest req = MOE__V1__STATS_REQUEST__INIT;
    int ret;

    req.experts = true;
    ret = remote_call(r, "/moe.v1.Control/Status", &sreq.base,
                      &moe__v1__status_response__descriptor, (ProtobufCMessage **)&s->status);
    if (ret)
        return ret;
    ret = remote_call(r, "/moe.v1.Control/Stats", &req.base, &moe__v1__stats_response__descriptor,
                      (ProtobufCMessage **)&s->stats);
    s->at_ns = moe_now_ns();
    return ret;
}

static const Moe__V1__TierStats *find_tier(const Moe__V1__StatsResponse *s, const char *name)
{
    for (size_t i = 0; s && i < s->n_tiers; i++)
        if (strcmp(s->tiers[i]->name, name) == 0)
            return s->tiers[i];
    return NULL;
}

static const Moe__V1__ModelStats *find_model(const Moe__V1__StatsResponse *s, const char *name)
{
    for (size_t i = 0; s && i < s->n_models; i++)
        if (strcmp(s->models[i]->name, name) == 0)
            return s->models[i];
    return NULL;
}

static const Moe__V1__CacheCounters *find_layer(const Moe__V1__ModelStats *m, uint32_t layer)
{
    for (size_t i = 0; m && i < m->n_layers; i++)
        if (m->layers[i]->layer == layer)
            return counters_of(m->layers[i]->counters);
    return &zero_counters;
}

/* Expert i of cur's model in the previous answer pm (same order, usually). */
static const Moe__V1__CacheCounters *find_expert(const Moe__V1__ModelStats *pm, size_t i,
                                                 const Moe__V1__ExpertStats *e)
{
    if (!pm)
        return &zero_counters;
    if (i < pm->n_experts && pm->experts[i]->layer == e->layer &&
        pm->experts[i]->expert == e->expert)
        return counters_of(pm->experts[i]->counters);
    for (size_t k = 0; k < pm->n_experts; k++)
        if (pm->experts[k]->layer == e->layer && pm->experts[k]->expert == e->expert)
            return counters_of(pm->experts[k]->counters);
    return &zero_counters;
}

/* The q quantile of the page-ins counted between two Latency answers, from
 * their buckets ([2^i, 2^(i+1)) ns, interpolated within one); 0 if none. */
static double latency_quantile(const Moe__V1__Latency *cur, const Moe__V1__Latency *prev, double q)
{
    uint64_t total = 0, seen = 0, rank;

    if (!cur)
        return 0;
    for (size_t i = 0; i < cur->n_buckets; i++)
        total += delta(cur->buckets[i], prev && i < prev->n_buckets ? prev->buckets[i] : 0);
    if (!total)
        return 0;
    rank = (uint64_t)ceil(q * (double)total);
    for (size_t i = 0; i < cur->n_buckets && i < 64; i++) {
        uint64_t d = delta(cur->buckets[i], prev && i < prev->n_buckets ? prev->buckets[i] : 0);

        if (d && seen + d >= rank) {
            double lo = ldexp(1.0, (int)i), f = (double)(rank - seen) / (double)d;

            return lo + f * lo;
        }
        seen += d;
    }
    return 0;
}

static const char *fmt_rate(uint64_t hits, uint64_t misses, char *buf, size_t len)
{
    if (hits + misses == 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f%%", 100.0 * ratio(hits, hits + misses));
    return buf;
}

/* The heat map rows and hit rates of model m. */
/* What top shows: --model, --layer. */
struct top_filter {
    const char *model; /* NULL: every model */
    long layer;        /* -1: every MoE layer */
};

static bool layer_shown(const struct top_filter *flt, uint32_t layer)
{
    return flt->layer < 0 || (uint32_t)flt->layer == layer;
}

static void top_model(FILE *f, const Moe__V1__ModelStats *m, const Moe__V1__ModelStats *pm,
                      double dt, int width, const struct top_filter *flt)
{
    size_t shown = 0;
    uint32_t max_expert = 0;
    uint64_t hottest = 0, *load;
    size_t ncols, group, row_len;
    char *row;
    int avail;

    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__CacheCounters *c = counters_of(m->experts[i]->counters);
        const Moe__V1__CacheCounters *p = find_expert(pm, i, m->experts[i]);
        uint64_t l = delta(c->hits, p->hits) + delta(c->misses, p->misses);

        if (layer_shown(flt, m->experts[i]->layer))
            hottest = MOE_MAX(hottest, l);
        max_expert = MOE_MAX(max_expert, m->experts[i]->expert);
    }
    /* "  LAYER  HIT RATE     (ALL)    LOADS  |" before, "|" after */
    avail = MOE_MAX(width - 41, 8);
    ncols = m->n_experts ? (size_t)max_expert + 1 : 0;
    group = ncols ? (ncols + (size_t)avail - 1) / (size_t)avail : 1;
    row_len = ncols ? (ncols + group - 1) / group : 0;
    /* A token through the model is one row in each MoE layer. */
    fprintf(f, "\nmodel %s: %.1f tokens/s through its %zu MoE layer%s\n  %zu experts per layer",
            m->name,
            (double)delta(m->token_rows, pm ? pm->token_rows : 0) / dt /
                (double)MOE_MAX(m->n_layers, (size_t)1),
            m->n_layers, m->n_layers == 1 ? "" : "s", ncols);
    if (group > 1)
        fprintf(f, ", %zu a column", group);
    fprintf(f, "; '%c' = %llu loads in the interval\n", ramp[sizeof(ramp) - 2],
            (unsigned long long)hottest);
    fprintf(f, "  %5s  %8s  %8s  %7s  %s\n", "LAYER", "HIT RATE", "(ALL)", "LOADS", "EXPERTS");
    load = calloc(row_len ? row_len : 1, sizeof(*load));
    row = malloc(row_len + 1);
    if (!load || !row) {
        fprintf(f, "  (out of memory)\n");
        goto out;
    }
    for (size_t li = 0; li < m->n_layers; li++) {
        uint32_t layer = m->layers[li]->layer;
        const Moe__V1__CacheCounters *c = counters_of(m->layers[li]->counters);
        const Moe__V1__CacheCounters *p = find_layer(pm, layer);
        uint64_t h = delta(c->hits, p->hits), mi = delta(c->misses, p->misses);
        char hr[16], all[16];

        if (!layer_shown(flt, layer))
            continue;
        shown++;
        memset(load, 0, row_len * sizeof(*load));
        for (size_t i = 0; i < m->n_experts; i++) {
            const Moe__V1__ExpertStats *e = m->experts[i];
            const Moe__V1__CacheCounters *ec, *ep;

            if (e->layer != layer)
                continue;
            ec = counters_of(e->counters);
            ep = find_expert(pm, i, e);
            load[e->expert / group] = MOE_MAX(
                load[e->expert / group], delta(ec->hits, ep->hits) + delta(ec->misses, ep->misses));
        }
        for (size_t k = 0; k < row_len; k++) {
            size_t lvl = 0;

            if (load[k] && hottest)
                lvl = (size_t)ceil((double)load[k] * (double)(sizeof(ramp) - 2) / (double)hottest);
            row[k] = ramp[MOE_MIN(lvl, sizeof(ramp) - 2)];
        }
        row[row_len] = 0;
        fprintf(f, "  %5u  %8s  %8s  %7llu  |%s|\n", layer, fmt_rate(h, mi, hr, sizeof(hr)),
                fmt_rate(c->hits, c->misses, all, sizeof(all)), (unsigned long long)(h + mi), row);
    }
    if (shown == 0)
        fprintf(f, "  no MoE layer %ld\n", flt->layer);
out:
    free(load);
    free(row);
}

/* "3.8M", "512K", "12G": bytes in at most 4 characters and a unit. */
static const char *short_bytes(uint64_t n, char *buf, size_t len)
{
    static const char units[] = "BKMGTP";
    double v = (double)n;
    size_t u = 0;

    while (v >= 1000.0 && u + 2 < sizeof(units)) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%lluB", (unsigned long long)n);
    else
        snprintf(buf, len, v < 10 ? "%.1f%c" : "%.0f%c", v, units[u]);
    return buf;
}

/* Writes one frame: the deltas from prev to cur. */
/* Seconds between two snapshots: moed's own clock when it moved, as it is
 * closer to the counters' interval. */
static double snapshot_dt(const struct snapshot *prev, const struct snapshot *cur)
{
    double dt = (double)(cur->at_ns - prev->at_ns) / 1e9;

    if (cur->stats->uptime_ns > prev->stats->uptime_ns)
        dt = (double)(cur->stats->uptime_ns - prev->stats->uptime_ns) / 1e9;
    return dt > 0 ? dt : 1e-9;
}

/* "no model called 'x' (loaded: a, b)" when --model names none of s's. */
static bool model_missing(FILE *f, const Moe__V1__StatsResponse *s, const struct top_filter *flt)
{
    if (!flt->model || find_model(s, flt->model))
        return false;
    fprintf(f, "\nno model called '%s' (loaded:", flt->model);
    for (size_t i = 0; i < s->n_models; i++)
        fprintf(f, "%s %s", i ? "," : "", s->models[i]->name);
    fprintf(f, "%s)\n", s->n_models ? "" : " none");
    return true;
}

static void top_frame(FILE *f, const struct moectl_remote *r, const struct snapshot *prev,
                      const struct snapshot *cur, int width, const struct top_filter *flt)
{
    const Moe__V1__StatsResponse *s = cur->stats, *ps = prev->stats;
    const Moe__V1__StatusResponse *st = cur->status;
    double dt = snapshot_dt(prev, cur);
    char b1[32], b2[32], b3[32];
    time_t now = time(NULL);
    struct tm tm;

    /* Each line fits 80 columns (but for a long address). */
    localtime_r(&now, &tm);
    fprintf(f, "moed %s at %s: %s  %02d:%02d:%02d\n", st->version, r->target, st->state, tm.tm_hour,
            tm.tm_min, tm.tm_sec);
    fprintf(f, "policy %s, prefetch %s; over the last %.1f s:\n", s->policy,
            s->prefetch ? "on" : "off", dt);
    /* A request is one layer call; tokens through each model are under it. */
    fprintf(f, "%.1f layer calls/s (%.1f token rows/s), %.1f batches/s, %u in flight\n\n",
            (double)delta(s->requests, ps->requests) / dt,
            (double)delta(s->tokens, ps->tokens) / dt, (double)delta(s->batches, ps->batches) / dt,
            st->in_flight);
    fprintf(f, "%-6s %8s %6s %8s %11s %9s %8s %8s %8s\n", "TIER", "HIT RATE", "(ALL)", "RESIDENT",
            "USED/CAP", "PAGE-IN/S", "BYTES/S", "P50", "P99");
    for (size_t i = 0; i < s->n_tiers; i++) {
        const Moe__V1__TierStats *t = s->tiers[i], *pt = find_tier(ps, t->name);
        const Moe__V1__CacheCounters *c = counters_of(t->counters);
        const Moe__V1__CacheCounters *p = counters_of(pt ? pt->counters : NULL);
        uint64_t pins = delta(c->page_ins, p->page_ins);
        double p50 = latency_quantile(t->page_in, pt ? pt->page_in : NULL, 0.5);
        double p99 = latency_quantile(t->page_in, pt ? pt->page_in : NULL, 0.99);
        char hr[16], all[16], used[80], bps[40], l50[24], l99[24];

        snprintf(used, sizeof(used), "%s/%s", short_bytes(t->used, b1, sizeof(b1)),
                 short_bytes(t->capacity, b2, sizeof(b2)));
        snprintf(bps, sizeof(bps), "%s/s",
                 short_bytes((uint64_t)((double)delta(c->bytes_paged, p->bytes_paged) / dt), b3,
                             sizeof(b3)));
        snprintf(l50, sizeof(l50), p50 > 0 ? "%.2f ms" : "-", p50 / 1e6);
        snprintf(l99, sizeof(l99), p99 > 0 ? "%.2f ms" : "-", p99 / 1e6);
        fprintf(f, "%-6s %8s %6s %8llu %11s %9.1f %8s %8s %8s\n", t->name,
                fmt_rate(delta(c->hits, p->hits), delta(c->misses, p->misses), hr, sizeof(hr)),
                fmt_rate(c->hits, c->misses, all, sizeof(all)), (unsigned long long)t->resident,
                used, (double)pins / dt, bps, l50, l99);
    }
    /* Prefetch precision, where a tier prefetched in the interval. */
    for (size_t i = 0; i < s->n_tiers; i++) {
        const Moe__V1__TierStats *t = s->tiers[i], *pt = find_tier(ps, t->name);
        const Moe__V1__CacheCounters *c = counters_of(t->counters);
        const Moe__V1__CacheCounters *p = counters_of(pt ? pt->counters : NULL);
        uint64_t used = delta(c->prefetch_hits, p->prefetch_hits);
        uint64_t wasted = delta(c->wasted_prefetches, p->wasted_prefetches);
        char pr[16];

        if (delta(c->prefetches, p->prefetches) == 0 && used + wasted == 0)
            continue;
        fprintf(f, "prefetch %s: %s precision (%llu used, %llu wasted, %s/s wasted)\n", t->name,
                fmt_rate(used, wasted, pr, sizeof(pr)), (unsigned long long)used,
                (unsigned long long)wasted,
                short_bytes((uint64_t)((double)delta(c->wasted_bytes, p->wasted_bytes) / dt), b1,
                            sizeof(b1)));
    }
    for (size_t i = 0; i < s->n_models; i++)
        if (!flt->model || strcmp(flt->model, s->models[i]->name) == 0)
            top_model(f, s->models[i], find_model(ps, s->models[i]->name), dt, width, flt);
    if (s->n_models == 0)
        fprintf(f, "\nno models loaded\n");
    else
        model_missing(f, s, flt);
}

static json_t *rate_json(uint64_t hits, uint64_t misses)
{
    return hits + misses ? json_real(ratio(hits, hits + misses)) : json_null();
}

/* One frame as a JSON object: the same deltas as top_frame.  NULL when out
 * of memory. */
static json_t *top_json(const struct moectl_remote *r, const struct snapshot *prev,
                        const struct snapshot *cur, const struct top_filter *flt)
{
    const Moe__V1__StatsResponse *s = cur->stats, *ps = prev->stats;
    const Moe__V1__StatusResponse *st = cur->status;
    double dt = snapshot_dt(prev, cur);
    json_t *j = json_object(), *tiers = json_array(), *models = json_array();

    if (!j || !tiers || !models) {
        json_decref(j);
        json_decref(tiers);
        json_decref(models);
        return NULL;
    }
    json_object_set_new(j, "time", json_integer((json_int_t)time(NULL)));
    json_object_set_new(j, "target", json_string(r->target));
    json_object_set_new(j, "version", json_string(st->version));
    json_object_set_new(j, "state", json_string(st->state));
    json_object_set_new(j, "policy", json_string(s->policy));
    json_object_set_new(j, "prefetch", json_boolean(s->prefetch));
    json_object_set_new(j, "interval_s", json_real(dt));
    json_object_set_new(j, "layer_calls_per_s",
                        json_real((double)delta(s->requests, ps->requests) / dt));
    json_object_set_new(j, "token_rows_per_s",
                        json_real((double)delta(s->tokens, ps->tokens) / dt));
    json_object_set_new(j, "batches_per_s", json_real((double)delta(s->batches, ps->batches) / dt));
    json_object_set_new(j, "in_flight", json_integer(st->in_flight));
    for (size_t i = 0; i < s->n_tiers; i++) {
        const Moe__V1__TierStats *t = s->tiers[i], *pt = find_tier(ps, t->name);
        const Moe__V1__CacheCounters *c = counters_of(t->counters);
        const Moe__V1__CacheCounters *p = counters_of(pt ? pt->counters : NULL);
        double p50 = latency_quantile(t->page_in, pt ? pt->page_in : NULL, 0.5);
        double p99 = latency_quantile(t->page_in, pt ? pt->page_in : NULL, 0.99);

        json_array_append_new(
            tiers, json_pack("{ss so so sI sI sI sf sf so so}", "name", t->name, "hit_rate",
                             rate_json(delta(c->hits, p->hits), delta(c->misses, p->misses)),
                             "hit_rate_all", rate_json(c->hits, c->misses), "resident",
                             (json_int_t)t->resident, "used", (json_int_t)t->used, "capacity",
                             (json_int_t)t->capacity, "page_ins_per_s",
                             (double)delta(c->page_ins, p->page_ins) / dt, "bytes_paged_per_s",
                             (double)delta(c->bytes_paged, p->bytes_paged) / dt, "page_in_p50_ms",
                             p50 > 0 ? json_real(p50 / 1e6) : json_null(), "page_in_p99_ms",
                             p99 > 0 ? json_real(p99 / 1e6) : json_null()));
        json_t *jt = json_array_get(tiers, json_array_size(tiers) - 1);

        if (jt) {
            uint64_t used = delta(c->prefetch_hits, p->prefetch_hits);
            uint64_t wasted = delta(c->wasted_prefetches, p->wasted_prefetches);

            json_object_set_new(jt, "prefetch_precision", rate_json(used, wasted));
            json_object_set_new(
                jt, "prefetched_bytes_per_s",
                json_real((double)delta(c->prefetched_bytes, p->prefetched_bytes) / dt));
            json_object_set_new(jt, "wasted_bytes_per_s",
                                json_real((double)delta(c->wasted_bytes, p->wasted_bytes) / dt));
            json_object_set_new(jt, "warm_hits", json_integer((json_int_t)c->warm_hits));
        }
    }
    for (size_t i = 0; i < s->n_models; i++) {
        const Moe__V1__ModelStats *m = s->models[i], *pm = find_model(ps, m->name);
        json_t *layers, *jm;

        if (flt->model && strcmp(flt->model, m->name) != 0)
            continue;
        layers = json_array();
        for (size_t li = 0; layers && li < m->n_layers; li++) {
            uint32_t layer = m->layers[li]->layer;
            const Moe__V1__CacheCounters *c = counters_of(m->layers[li]->counters);
            const Moe__V1__CacheCounters *p = find_layer(pm, layer);
            json_t *load = json_array();

            if (!layer_shown(flt, layer)) {
                json_decref(load);
                continue;
            }
            for (size_t k = 0; load && k < m->n_experts; k++) {
                const Moe__V1__ExpertStats *e = m->experts[k];
                const Moe__V1__CacheCounters *ec, *ep;

                if (e->layer != layer)
                    continue;
                ec = counters_of(e->counters);
                ep = find_expert(pm, k, e);
                json_array_append_new(load,
                                      json_integer((json_int_t)(delta(ec->hits, ep->hits) +
                                                                delta(ec->misses, ep->misses))));
            }
            json_array_append_new(
                layers,
                json_pack("{sI so so sI so}", "layer", (json_int_t)layer, "hit_rate",
                          rate_json(delta(c->hits, p->hits), delta(c->misses, p->misses)),
                          "hit_rate_all", rate_json(c->hits, c->misses), "loads",
                          (json_int_t)(delta(c->hits, p->hits) + delta(c->misses, p->misses)),
                          "expert_loads", load ? load : json_null()));
        }
        jm = json_pack("{ss sf sI so}", "name", m->name, "tokens_per_s",
                       (double)delta(m->token_rows, pm ? pm->token_rows : 0) / dt /
                           (double)MOE_MAX(m->n_layers, (size_t)1),
                       "moe_layers", (json_int_t)m->n_layers, "layers",
                       layers ? layers : json_null());
        json_array_append_new(models, jm);
    }
    json_object_set_new(j, "tiers", tiers);
    json_object_set_new(j, "models", models);
    return j;
}

/* Prints j (taking it) as one line; false when it could not be built. */
static bool json_line(json_t *j)
{
    int r = j ? json_dumpf(j, stdout, JSON_COMPACT | JSON_REAL_PRECISION(6)) : -1;

    json_decref(j);
    if (r < 0)
        return false;
    fputc('\n', stdout);
    fflush(stdout);
    return true;
}

/* Writes frame (len bytes) in place on a terminal: home, each line cut to
 * the width and cleared to its end, at most rows lines, the rest cleared. */
static void draw_in_place(const char *frame, size_t len, int width, int rows)
{
    const char *p = frame, *end = frame + len;
    int line = 0, total = 0, room = rows - 1;

    for (const char *q = frame; q < end; q++)
        total += *q == '\n';
    if (len && frame[len - 1] != '\n')
        total++;
    /* A last line says what did not fit, rather than losing it silently. */
    if (total > room)
        room--;
    fputs("\033[H", stdout);
    while (p < end && line < room) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);

        fwrite(p, 1, MOE_MIN(n, (size_t)width), stdout);
        fputs("\033[K\n", stdout);
        line++;
        p = nl ? nl + 1 : end;
    }
    if (total > line) {
        char more[128];
        int n = snprintf(more, sizeof(more),
                         "... %d more line%s cut: a taller terminal, --model or --layer",
                         total - line, total - line == 1 ? "" : "s");

        fwrite(more, 1, (size_t)MOE_MIN(n, width), stdout);
        fputs("\033[K\n", stdout);
    }
    fputs("\033[J", stdout);
    fflush(stdout);
}

/* Sleeps until the monotonic time at (ns); false when interrupted. */
static bool sleep_until(uint64_t at)
{
    while (!interrupted) {
        uint64_t now = moe_now_ns();
        struct timespec ts;

        if (now >= at)
            return true;
        ts.tv_sec = (time_t)((at - now) / 1000000000u);
        ts.tv_nsec = (long)((at - now) % 1000000000u);
        nanosleep(&ts, NULL);
    }
    return false;
}

/* Shows one frame (live in place, or printed) of text. */
static void show(const char *frame, size_t len, bool live, int width, int rows)
{
    if (live) {
        draw_in_place(frame, len, width, rows);
    } else {
        fwrite(frame, 1, len, stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }
}

/* A frame that is one message (moed not answering, reconnected). */
static void show_note(const struct moectl_remote *r, bool live, bool json, int width, int rows,
                      const char *event, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static void show_note(const struct moectl_remote *r, bool live, bool json, int width, int rows,
                      const char *event, const char *fmt, ...)
{
    char msg[1536];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (json) {
        json_line(json_pack("{sI ss ss ss}", "time", (json_int_t)time(NULL), "target", r->target,
                            "event", event, "message", msg));
        return;
    }
    strncat(msg, "\n", sizeof(msg) - strlen(msg) - 1);
    show(msg, strlen(msg), live, width, rows);
}

int moectl_top(int argc, char **argv)
{
    enum { OPT_INTERVAL = OPT_COMMAND, OPT_ITERATIONS, OPT_MODEL, OPT_LAYER };
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"interval", required_argument, NULL, OPT_INTERVAL},
        {"iterations", required_argument, NULL, OPT_ITERATIONS},
        {"model", required_argument, NULL, OPT_MODEL},
        {"layer", required_argument, NULL, OPT_LAYER},
        {0},
    };
    struct snapshot prev = {0}, cur = {0};
    struct top_filter flt = {.model = NULL, .layer = -1};
    struct moectl_remote r;
    bool remote_given = false, live, down = false;
    double interval = 1.0;
    long iterations = 0;
    int c, k, ret = 1;
    uint64_t step, next;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case OPT_INTERVAL:
            if (parse_seconds("top: --interval", optarg, MAX_INTERVAL_S, &interval) < 0)
                return 2;
            if (interval < 0.05) {
                errorf("top: --interval '%s': at least 0.05 seconds", optarg);
                return 2;
            }
            break;
        case OPT_ITERATIONS:
            if (parse_long("top: --iterations", optarg, 1, LONG_MAX, &iterations) < 0)
                return 2;
            break;
        case OPT_MODEL:
            if (!*optarg) {
                errorf("top: --model '': expected a model's name");
                return 2;
            }
            flt.model = optarg;
            break;
        case OPT_LAYER:
            if (parse_long("top: --layer", optarg, 0, INT32_MAX, &flt.layer) < 0)
                return 2;
            break;
        case 'h':
            remote_usage(stdout, TOP_SYNOPSIS, top_text);
            return 0;
        default:
            remote_usage(stderr, TOP_SYNOPSIS, top_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("top: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;

    live = !r.json && isatty(STDOUT_FILENO) && iterations == 0;
    catch_signals();
    /* The first answer or an error: a moed that was never reached is not
     * waited for. */
    if (snapshot_take(&r, &prev))
        goto out;
    /* From now on a failed call is shown and retried. */
    r.quiet = true;
    if (live)
        fputs("\033[?25l\033[2J", stdout);
    step = (uint64_t)(interval * 1e9);
    next = prev.at_ns + step;
    for (long i = 0; iterations == 0 || i < iterations; i++) {
        struct winsize ws = {0};
        int width = 80, rows = 24;
        char *frame = NULL;
        size_t len = 0;
        FILE *f;

        if (!sleep_until(next))
            break;
        next += step;
        if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
            width = ws.ws_col;
            rows = ws.ws_row > 2 ? ws.ws_row : rows;
        }
        if (snapshot_take(&r, &cur)) {
            /* moed stopped or restarted: a fresh channel at the next try. */
            snapshot_clear(&cur);
            remote_close(&r);
            down = true;
            show_note(&r, live, r.json, width, rows, "unreachable",
                      "moed at %s is not answering (%s); retrying every %.1f s", r.target,
                      r.last_error, interval);
            continue;
        }
        if (down || cur.stats->uptime_ns < prev.stats->uptime_ns) {
            /* Counters start again: rates from the next interval. */
            show_note(&r, live, r.json, width, rows, "reconnected",
                      "reconnected to moed at %s (%s, up %.1f s); rates from the next interval",
                      r.target, cur.status->state, (double)cur.stats->uptime_ns / 1e9);
            down = false;
        } else if (r.json) {
            if (!json_line(top_json(&r, &prev, &cur, &flt))) {
                errorf("top: out of memory for a frame");
                snapshot_clear(&cur);
                goto out;
            }
        } else {
            f = open_memstream(&frame, &len);
            if (!f) {
                errorf("top: out of memory for a frame");
                snapshot_clear(&cur);
                goto out;
            }
            top_frame(f, &r, &prev, &cur, width, &flt);
            fclose(f);
            show(frame, len, live, width, rows);
            free(frame);
        }
        snapshot_clear(&prev);
        prev = cur;
        memset(&cur, 0, sizeof(cur));
    }
    ret = 0;
out:
    if (live)
        fputs("\033[?25h\n", stdout);
    fflush(stdout);
    snapshot_clear(&prev);
    remote_close(&r);
    return ret;
}
