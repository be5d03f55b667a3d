/*
 * gRPC Forward latency and throughput against moed on loopback, next to a
 * plain TCP loopback round trip of the same bytes measured in the same run
 * (the floor).
 *
 * 1. Makes a Mixtral-shaped layer 4096 wide (8 experts, top-2, ffn 1024:
 *    small experts, so that the call's own cost is visible next to the
 *    compute) and starts moed on it (--listen 127.0.0.1:0, every expert
 *    resident after a warm-up, batch window 1 us so that a lone caller does
 *    not wait for company).
 * 2. For 1, 8 and 64 tokens: sequential Forward calls (f32), client-side
 *    latency p50/p99, and the time moed spent inside (timing.total_ns); the
 *    call's overhead is the median over the calls of the difference (each
 *    call's latency minus its own time inside: the compute's noise on a
 *    loaded machine cancels out).  Then 4 callers at once: calls/s and
 *    tokens/s.
 * 3. The floor: a TCP ping-pong on loopback (TCP_NODELAY) sending the
 *    request's bytes and answering with the response's, in the same run.
 *    Printed: overhead / floor (1.0 would be a bare socket).
 * 4. gRPC's own cost for the same bytes: an echo server in this process on
 *    moed's gRPC server code (daemon/rpc.c over the gRPC C core, 2 threads)
 *    whose one method answers every call at once with a message of the
 *    response's size, called through the same client; its p50 is what a
 *    call costs with no work inside moed at all.  Printed next to moed's
 *    overhead: overhead / gRPC echo (1.0: moed adds nothing to gRPC's own
 *    cost).
 *
 * usage: bench-grpc [--quick] [--calls N] [--dir DIR]
 * --quick: experts of ffn 256 and 8 calls; --calls: sequential calls per
 * size (up to 512).
 * MOED_BENCH_BIN=PATH runs that moed instead of the one built with the
 * bench (to compare two builds with the same client).
 */
#include "bench.h"
#include "bench_moed.h"
#include "common.h"
#include "genmodel.h"
#include "moe.pb-c.h"
#include "rpc.h"
#include "rpc_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define H 4096
#define MAX_CALLS 512

static int quick, n_calls; /* n_calls: --calls, 0 for the default */

static void die(const char *what)
{
    fprintf(stderr, "bench-grpc: %s\n", what);
    exit(1);
}

/* ---- calls --------------------------------------------------------------------------------- */

struct req_bytes {
    uint8_t *buf;
    size_t len;
};

static struct req_bytes make_request(int tokens, uint64_t *seed)
{
    Moe__V1__ForwardRequest q = MOE__V1__FORWARD_REQUEST__INIT;
    Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
    int64_t shape[2] = {tokens, H};
    float *x = malloc((size_t)tokens * H * sizeof(float));
    struct req_bytes r;

    for (size_t i = 0; i < (size_t)tokens * H; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(*seed >> 40) / (double)(1 << 24) - 0.5) * 2.0f;
    }
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = MOE__V1__DTYPE__DTYPE_F32;
    t.data.data = (uint8_t *)x;
    t.data.len = (size_t)tokens * H * sizeof(float);
    q.model = "bench";
    q.layer = 0;
    q.hidden = &t;
    r.len = moe__v1__forward_request__get_packed_size(&q);
    r.buf = malloc(r.len);
    moe__v1__forward_request__pack(&q, r.buf);
    free(x);
    return r;
}

/* One call; returns the client latency and sets *inside (moed's time). */
static double call(struct moe_rpc_client *c, const struct req_bytes *q, double *inside,
                   size_t *resp_len)
{
    uint8_t *resp = NULL;
    size_t len = 0;
    char msg[512];
    uint64_t t0 = moe_now_ns();
    int st = moe_rpc_client_call(c, "/moe.v1.Experts/Forward", q->buf, q->len, &resp, &len, msg,
                                 sizeof(msg));
    double dt = (double)(moe_now_ns() - t0) / 1e9;
    Moe__V1__ForwardResponse *r;

    if (st != 0) {
        fprintf(stderr, "bench-grpc: Forward: %s\n", msg);
        exit(1);
    }
    r = moe__v1__forward_response__unpack(NULL, len, resp);
    if (!r || !r->timing)
        die("bad ForwardResponse");
    *inside = (double)r->timing->total_ns / 1e9;
    *resp_len = len;
    moe__v1__forward_response__free_unpacked(r, NULL);
    free(resp);
    return dt;
}

struct par {
    const char *target;
    const struct req_bytes *q;
    int n;
};

static void *par_main(void *arg)
{
    struct par *p = arg;
    struct moe_rpc_client_config cc = {.target = p->target};
    struct moe_rpc_client *c;
    char msg[256];
    double in;
    size_t rl;

    if (moe_rpc_client_open(&cc, &c, msg, sizeof(msg)) < 0)
        die(msg);
    for (int i = 0; i < p->n; i++)
        call(c, p->q, &in, &rl);
    moe_rpc_client_close(c);
    return NULL;
}

/* ---- TCP floor ----------------------------------------------------------------------------- */

struct echo {
    int lfd;
    size_t in, out;
    int n;
};

static int read_all(int fd, void *b, size_t n)
{
    for (size_t got = 0; got < n;) {
        ssize_t r = read(fd, (char *)b + got, n - got);

        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *b, size_t n)
{
    for (size_t put = 0; put < n;) {
        ssize_t r = write(fd, (const char *)b + put, n - put);

        if (r <= 0)
            return -1;
        put += (size_t)r;
    }
    return 0;
}

static void *echo_main(void *arg)
{
    struct echo *e = arg;
    int fd = accept(e->lfd, NULL, NULL), one = 1;
    char *b = malloc(MOE_MAX(e->in, e->out));

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    for (int i = 0; i < e->n; i++)
        if (read_all(fd, b, e->in) < 0 || write_all(fd, b, e->out) < 0)
            break;
    close(fd);
    free(b);
    return NULL;
}

/* p50 of n round trips sending in bytes and receiving out bytes. */
static double tcp_floor(size_t in, size_t out, int n)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    struct echo e = {.in = in, .out = out, .n = n};
    double t[MAX_CALLS];
    pthread_t th;
    int fd, one = 1;
    char *b = calloc(1, MOE_MAX(in, out));

    e.lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(e.lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(e.lfd, 1) < 0 ||
        getsockname(e.lfd, (struct sockaddr *)&a, &al) < 0)
        die("tcp");
    pthread_create(&th, NULL, echo_main, &e);
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("connect");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    for (int i = 0; i < n; i++) {
        uint64_t t0 = moe_now_ns();

        if (write_all(fd, b, in) < 0 || read_all(fd, b, out) < 0)
            die("tcp round trip");
        t[i] = (double)(moe_now_ns() - t0) / 1e9;
    }
    close(fd);
    pthread_join(th, NULL);
    close(e.lfd);
    free(b);
    qsort(t, (size_t)n, sizeof(t[0]), bench_cmp_double);
    return t[n / 2];
}

/* ---- gRPC echo: gRPC's own cost for the same bytes ------------------------------------------ */

struct echo_reply {
    uint8_t *buf;
    size_t len;
};

static void echo_handler(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    const struct echo_reply *r = arg;

    (void)req;
    (void)len;
    moe_rpc_reply(call, r->buf, r->len);
}

/* p50 of n calls of in request bytes answered by out bytes, through
 * moed's gRPC server code in this process and the same client. */
static double grpc_echo(const struct req_bytes *q, size_t out, int n)
{
    static const char path[] = "/bench.Echo/Call";
    struct echo_reply r = {.buf = calloc(1, MOE_MAX(out, 1)), .len = out};
    struct moe_rpc_method m = {.path = path, .fn = echo_handler, .arg = &r};
    struct moe_rpc_config cfg = {.listen = "127.0.0.1:0", .max_message_bytes = 256u << 20};
    struct moe_rpc_client_config cc = {0};
    struct moe_rpc_server *srv;
    struct moe_rpc_client *c;
    struct moe_error err = {0};
    char target[64], msg[256];
    double t[MAX_CALLS];

    if (!r.buf || moe_rpc_server_start(&cfg, &m, 1, &srv, &err) < 0)
        die(err.msg[0] ? err.msg : "echo server");
    snprintf(target, sizeof(target), "127.0.0.1:%d", moe_rpc_server_port(srv));
    cc.target = target;
    if (moe_rpc_client_open(&cc, &c, msg, sizeof(msg)) < 0)
        die(msg);
    for (int i = -5; i < n; i++) { /* 5 calls of warm-up */
        uint8_t *resp = NULL;
        size_t len = 0;
        uint64_t t0 = moe_now_ns();

        if (moe_rpc_client_call(c, path, q->buf, q->len, &resp, &len, msg, sizeof(msg)) != 0 ||
            len != out)
            die("gRPC echo call");
        if (i >= 0)
            t[i] = (double)(moe_now_ns() - t0) / 1e9;
        free(resp);
    }
    moe_rpc_client_close(c);
    moe_rpc_server_free(srv);
    free(r.buf);
    qsort(t, (size_t)n, sizeof(t[0]), bench_cmp_double);
    return t[n / 2];
}

int main(int argc, char **argv)
{
    const char *dir = ".";
    struct moe_genmodel_opts g;
    struct moe_error err;
    struct moe_rpc_client_config cc = {0};
    struct moe_rpc_client *c;
    char model[4096], target[64], msg[256];
    static const int tokens[] = {1, 8, 64};
    uint64_t seed = 7;
    int port;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--calls") && i + 1 < argc &&
                 (n_calls = atoi(argv[i + 1]), i++, n_calls >= 1 && n_calls <= MAX_CALLS))
            continue;
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else {
            fprintf(stderr, "usage: bench-grpc [--quick] [--calls 1..%d] [--dir DIR]\n", MAX_CALLS);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    /* as moed does: reuse big buffers instead of fresh pages per call */
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    snprintf(model, sizeof(model), "%s/bench-grpc-model", dir);
    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &g);
    g.out_dir = model;
    g.n_layers = 1;
    g.n_experts = 8;
    g.top_k = 2;
    g.hidden = H;
    g.ffn = quick ? 256 : 1024;
    if (moe_genmodel_write(&g, &err) < 0)
        die(err.msg);
    port = bench_moed_start(
        "bench-grpc", getenv("MOED_BENCH_BIN") ? getenv("MOED_BENCH_BIN") : MOED_BIN, model, NULL);
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    cc.target = target;
    if (moe_rpc_client_open(&cc, &c, msg, sizeof(msg)) < 0)
        die(msg);
    printf("moed on %s: one Mixtral-shaped layer, hidden %d, 8 experts of ffn %d, top-2, f32 "
           "hidden states\n",
           target, H, g.ffn);
    printf("%6s %10s %10s %10s %10s %10s %10s %9s %10s %9s %10s %10s\n", "tokens", "req bytes",
           "p50 ms", "p99 ms", "moed ms", "overhead", "tcp floor", "ratio", "grpc echo", "ovh/echo",
           "calls/s", "tokens/s");
    for (size_t k = 0; k < MOE_ARRAY_SIZE(tokens); k++) {
        int T = tokens[k], n = n_calls ? n_calls : quick ? 8 : (T == 64 ? 60 : 200), callers = 4;
        struct req_bytes q = make_request(T, &seed);
        double lat[MAX_CALLS], in[MAX_CALLS], ovh[MAX_CALLS], p50, p99, ip50, op50, floor_s, inside,
            echo_s;
        size_t resp_len = 0;
        pthread_t th[4];
        struct par pa = {target, &q, quick ? 4 : n / 2};
        uint64_t t0;
        double par_s;

        for (int i = 0; i < 5; i++) /* warm-up: experts resident, channel up */
            call(c, &q, &inside, &resp_len);
        for (int i = 0; i < n; i++) {
            lat[i] = call(c, &q, &in[i], &resp_len);
            ovh[i] = lat[i] - in[i];
        }
        qsort(ovh, (size_t)n, sizeof(ovh[0]), bench_cmp_double);
        op50 = ovh[n / 2];
        qsort(lat, (size_t)n, sizeof(lat[0]), bench_cmp_double);
        qsort(in, (size_t)n, sizeof(in[0]), bench_cmp_double);
        p50 = lat[n / 2];
        p99 = lat[MOE_MIN(n - 1, (int)(0.99 * n))];
        ip50 = in[n / 2];
        floor_s = tcp_floor(q.len, resp_len, n);
        echo_s = grpc_echo(&q, resp_len, n);
        t0 = moe_now_ns();
        for (int i = 0; i < callers; i++)
            pthread_create(&th[i], NULL, par_main, &pa);
        for (int i = 0; i < callers; i++)
            pthread_join(th[i], NULL);
        par_s = (double)(moe_now_ns() - t0) / 1e9;
        printf("%6d %10zu %10.3f %10.3f %10.3f %10.3f %10.3f %9.2f %10.3f %9.2f %10.0f %10.0f\n", T,
               q.len, p50 * 1e3, p99 * 1e3, ip50 * 1e3, op50 * 1e3, floor_s * 1e3, op50 / floor_s,
               echo_s * 1e3, op50 / echo_s, callers * pa.n / par_s, callers * pa.n * T / par_s);
        free(q.buf);
    }
    printf("overhead = p50 over the calls of (client latency - time inside moed); ratio = overhead "
           "/ TCP round trip of the same bytes (the floor, same run); grpc echo = p50 of a call of "
           "the same bytes to a gRPC server (moed's rpc.c) that answers at once; calls/s and "
           "tokens/s with 4 callers at once\n");
    moe_rpc_client_close(c);
    bench_moed_stop();
    {
        char cmd[4200];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", model);
        if (!strchr(model, '\'') && system(cmd) != 0)
            fprintf(stderr, "bench-grpc: could not remove %s\n", model);
    }
    return 0;
}
