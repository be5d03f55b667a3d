/*
 * libmoe-client against a real moed: the rings' round trip next to the
 * floors of inter-process signalling, and forward throughput of many client
 * processes over shared memory next to gRPC, all measured in the same run.
 *
 * 1. IPC overhead: an empty request (MOE_OP_NOP, answered by moed's session
 *    thread at once) through the submission and completion rings, with a
 *    polling client (MOE_SESSION_POLL) and with the default client, which
 *    sleeps on the completion ring's futex (after a short spin, as the
 *    rings do, ipc/ring.c).  The floors, in the same run: two processes
 *    (fork) ping-ponging through a shared anonymous mapping, each side
 *    FUTEX_WAKE the other then FUTEX_WAIT (shared futexes, as across
 *    processes), and the same ping-pong spinning on a shared atomic.
 *    Printed: p50/p99 of each, polling client p50 / spin floor p50 (target
 *    <= 2) and futex client p50 / futex floor p50 (target <= 1.5).
 *    On a machine with few cores (the CI one has 2) spinning sides compete
 *    for them: the spin floor is only a floor while each side has a core of
 *    its own, and a polling client spins against moed's session thread,
 *    which spins too before it sleeps.  What is printed is what was
 *    measured; the core count is printed with it.
 * 2. Forward throughput: one Mixtral-shaped layer (hidden 1024, 8 experts,
 *    top-2, ffn 1024; every expert resident after a warm-up), 1, 4 and 16
 *    client processes (fork), each with its own session (or its own gRPC
 *    channel), sending decode-style requests (1 and 8 tokens, f32) back to
 *    back for a fixed time after a common start.  Printed: requests/s,
 *    tokens/s and p50 latency of each transport, and shm / gRPC.
 *
 * --quick (ctest's smoke test): short runs, 1 and 2 processes only.
 * Exits 0, 1 on a failed request (or anything else going wrong), 77 when
 * moed was not built.
 *
 * usage: bench-shm [--quick] [--dir DIR]
 */
#include "bench.h"
#include "bench_moed.h"
#include "common.h"
#include "genmodel.h"
#include "moe.pb-c.h"
#include "moe_client.h"
#include "ring.h"
#include "rpc_client.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MOED_BIN
#define MOED_BIN "" /* moed not built: skipped */
#endif

#define H 1024
#define MAX_PROCS 16
#define MAX_SAMPLES (1 << 20) /* latencies one client process keeps */

static int quick;

static void die(const char *what)
{
    fprintf(stderr, "bench-shm: %s\n", what);
    exit(1);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/* Sorts v and returns its p-th quantile (0 <= p < 1). */
static uint32_t quantile(uint32_t *v, size_t n, double p)
{
    qsort(v, n, sizeof(*v), cmp_u32);
    return v[MOE_MIN(n - 1, (size_t)(p * (double)n))];
}

/* ---- floors: two processes ping-ponging through a shared mapping -------------------------- */

static long futex(_Atomic uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, NULL, NULL, 0);
}

/* The two words, one a cache line, each written by one side only. */
struct pingpong {
    _Alignas(64) _Atomic uint32_t ping; /* round i: i + 1 from the parent */
    _Alignas(64) _Atomic uint32_t pong; /* round i: i + 1 from the child */
};

/* Waits until *w == want: spinning, or sleeping on the futex (FUTEX_WAIT
 * returns at once when *w has already changed from the value seen). */
static void await(_Atomic uint32_t *w, uint32_t want, int spin)
{
    uint32_t v;

    /* Acquire pairs with the other side's release store of w. */
    while ((v = atomic_load_explicit(w, memory_order_acquire)) != want) {
        if (spin)
            moe_ring_relax();
        else
            futex(w, FUTEX_WAIT, v);
    }
}

static void post(_Atomic uint32_t *w, uint32_t v, int spin)
{
    /* Release pairs with await's acquire on the other side. */
    atomic_store_explicit(w, v, memory_order_release);
    if (!spin)
        futex(w, FUTEX_WAKE, INT_MAX);
}

static int floor_child_cpu = -1; /* where the ping-pong's child runs; -1: anywhere */
static void pin(pid_t pid, int cpu);

/* n round trips between this process and a child; lat[i] in ns. */
static void floor_pingpong(int spin, uint32_t *lat, int n)
{
    struct pingpong *pp =
        mmap(NULL, sizeof(*pp), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int st;
    pid_t pid;

    if (pp == MAP_FAILED)
        die("mmap");
    pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        if (floor_child_cpu >= 0)
            pin(0, floor_child_cpu);
        for (int i = 0; i < n; i++) {
            await(&pp->ping, (uint32_t)i + 1, spin);
            post(&pp->pong, (uint32_t)i + 1, spin);
        }
        _exit(0);
    }
    for (int i = 0; i < n; i++) {
        uint64_t t0 = moe_now_ns();

        post(&pp->ping, (uint32_t)i + 1, spin);
        await(&pp->pong, (uint32_t)i + 1, spin);
        lat[i] = (uint32_t)MOE_MIN(moe_now_ns() - t0, UINT32_MAX);
    }
    if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die("ping-pong child failed");
    munmap(pp, sizeof(*pp));
}

/* n empty requests through the rings, one at a time; lat[i] in ns. */
static void shm_nops(const char *sock, unsigned flags, uint32_t *lat, int n)
{
    struct moe_session_opts o = {.arena_bytes = 1 << 20, .flags = flags, .name = "bench-shm"};
    struct moe_request r = {.op = MOE_OP_NOP};
    struct moe_completion c;
    struct moe_session *s;
    char msg[512];

    if (moe_connect(sock, &o, &s) < 0) {
        fprintf(stderr, "bench-shm: moe_connect %s: %s\n", sock, moe_connect_error());
        exit(1);
    }
    for (int i = -n / 10; i < n; i++) { /* a tenth more first: warm-up */
        uint64_t t0 = moe_now_ns();
        int rc;

        r.tag = (uint64_t)i;
        rc = moe_forward(s, &r, &c);
        if (rc < 0 || c.tag != (uint64_t)i) {
            snprintf(msg, sizeof(msg), "NOP: %s", rc < 0 ? moe_last_error(s) : "wrong tag");
            die(msg);
        }
        if (i >= 0)
            lat[i] = (uint32_t)MOE_MIN(moe_now_ns() - t0, UINT32_MAX);
    }
    moe_close(s);
}

/* ---- placement: which core each side runs on -------------------------------------------- */

static cpu_set_t all_cpus; /* this process's affinity at the start */

/* Pins every thread of pid (0: this process) to cpu, or back to all_cpus
 * when cpu < 0.  Threads created later inherit their creator's mask: moed's
 * session threads are started by its (pinned) poll thread. */
static void pin(pid_t pid, int cpu)
{
    cpu_set_t one;
    char path[64];
    struct dirent *e;
    DIR *d;

    CPU_ZERO(&one);
    if (cpu >= 0)
        CPU_SET(cpu, &one);
    if (pid == 0) {
        sched_setaffinity(0, sizeof(cpu_set_t), cpu >= 0 ? &one : &all_cpus);
        return;
    }
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    d = opendir(path);
    if (!d)
        die("cannot list moed's threads");
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            sched_setaffinity(atoi(e->d_name), sizeof(cpu_set_t), cpu >= 0 ? &one : &all_cpus);
    closedir(d);
}

enum { SPIN_FLOOR, FUTEX_FLOOR, POLL_CLIENT, FUTEX_CLIENT, N_IPC };

/*
 * Two placements.  Pinned: this process (the client, the floor's parent) on
 * the last core, moed (every thread) and the floor's child on the first, so
 * that the two sides never share a core: the condition under which the spin
 * floor is a floor at all.  Unpinned: wherever the scheduler puts them; on 2
 * cores a spinning client then often shares a core with moed's session
 * thread (or with someone else's work), and each round trip waits for a
 * context switch.  Both are printed; neither hides the other.
 */
static void bench_ipc(const char *sock)
{
    static const char *const names[N_IPC] = {"spin ping-pong (floor)", "futex ping-pong (floor)",
                                             "NOP, polling client", "NOP, futex client"};
    int n = quick ? 2000 : 20000, passes = quick ? 1 : 3;
    int last = -1, placements = 1;
    uint32_t *lat = malloc((size_t)n * sizeof(*lat));

    if (!lat)
        die("out of memory");
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &all_cpus))
            last = c;
    if (CPU_COUNT(&all_cpus) >= 2 && CPU_ISSET(0, &all_cpus))
        placements = 2;
    printf("\n1. IPC overhead: round trip of an empty request through the rings, median of %d "
           "passes of %d\n",
           passes, n);
    printf("%-26s %-9s %9s %9s %-24s %9s %7s %7s\n", "figure", "placement", "p50 us", "p99 us",
           "limit", "limit us", "ratio", "target");
    for (int pl = 0; pl < placements; pl++) {
        /* pl 0: pinned (when there are 2 cores), the last: unpinned */
        bool pinned = placements == 2 && pl == 0;
        double p50[N_IPC][BENCH_MAX_PASSES], p99[N_IPC][BENCH_MAX_PASSES], m50[N_IPC], m99[N_IPC];

        floor_child_cpu = pinned ? 0 : -1;
        pin(0, pinned ? last : -1);
        pin(bench_moed_pid, pinned ? 0 : -1);
        /* Passes interleave the four so that a slow moment of the machine
         * touches all of them; each figure is the median of its passes. */
        for (int p = 0; p < passes; p++) {
            for (int k = 0; k < N_IPC; k++) {
                if (k == SPIN_FLOOR || k == FUTEX_FLOOR)
                    floor_pingpong(k == SPIN_FLOOR, lat, n);
                else
                    shm_nops(sock, k == POLL_CLIENT ? MOE_SESSION_POLL : 0, lat, n);
                p99[k][p] = quantile(lat, (size_t)n, 0.99) / 1e3;
                p50[k][p] = quantile(lat, (size_t)n, 0.5) / 1e3;
            }
        }
        pin(0, -1);
        pin(bench_moed_pid, -1);
        for (int k = 0; k < N_IPC; k++) {
            m50[k] = bench_median(p50[k], passes);
            m99[k] = bench_median(p99[k], passes);
        }
        for (int k = 0; k < N_IPC; k++) {
            int floor = k == POLL_CLIENT ? SPIN_FLOOR : k == FUTEX_CLIENT ? FUTEX_FLOOR : -1;
            double limit = k == POLL_CLIENT ? 2.0 : 1.5;

            printf("%-26s %-9s %9.2f %9.2f", names[k], pinned ? "pinned" : "unpinned", m50[k],
                   m99[k]);
            if (floor >= 0)
                printf(" %-24s %9.2f %7.2f %7s %s", names[floor], m50[floor], m50[k] / m50[floor],
                       k == POLL_CLIENT ? "<= 2" : "<= 1.5",
                       m50[k] / m50[floor] <= limit ? "met" : "MISSED");
            printf("\n");
        }
    }
    printf("ratio = client p50 / floor p50 (same run, same placement); pinned: client on cpu %d, "
           "moed and the floor's other side on cpu 0; the futex client spins %d us before it "
           "sleeps (ipc/ring.c), as moed's session thread does\n",
           last, MOE_RING_SPIN_NS / 1000);
    free(lat);
}

/* ---- throughput: client processes sending back to back -------------------------------------- */

enum transport { SHM, GRPC };

/* What the parent and the clients of one run share. */
struct start {
    _Atomic int ready;         /* clients connected and warmed up */
    _Atomic uint64_t start_ns; /* 0 until the parent says go */
    uint64_t run_ns;           /* how long each client sends */
};

/* What a client process writes to the pipe (well under PIPE_BUF: atomic). */
struct result {
    uint64_t n;          /* requests completed */
    uint64_t elapsed_ns; /* from the start to its last completion */
    uint32_t p50_ns, p99_ns;
    int32_t err; /* non-zero: a request failed (said on stderr) */
};

struct client_cfg {
    enum transport tr;
    const char *sock, *target;
    int tokens;
};

static void fill(float *x, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(seed >> 40) / (double)(1 << 24) - 0.5) * 2.0f;
    }
}

/* One request's way through either transport: 0, or -1 with msg set. */
struct conn {
    const struct client_cfg *cfg;
    struct moe_session *s;
    struct moe_request r;
    struct moe_rpc_client *rpc;
    uint8_t *req;
    size_t req_len;
};

static int conn_open(struct conn *c, const struct client_cfg *cfg, uint64_t seed, char *msg,
                     size_t len)
{
    size_t bytes = (size_t)cfg->tokens * H * sizeof(float);

    memset(c, 0, sizeof(*c));
    c->cfg = cfg;
    if (cfg->tr == SHM) {
        struct moe_session_opts o = {.arena_bytes = 4 << 20, .name = "bench-shm"};
        struct moe_model_info m;
        float *in, *out;

        if (moe_connect(cfg->sock, &o, &c->s) < 0) {
            snprintf(msg, len, "moe_connect: %s", moe_connect_error());
            return -1;
        }
        if (moe_model_find(c->s, "bench", &m) < 0 || !(in = moe_alloc(c->s, bytes)) ||
            !(out = moe_alloc(c->s, bytes))) {
            snprintf(msg, len, "shm setup: %s", moe_last_error(c->s));
            return -1;
        }
        if (m.hidden != H) {
            snprintf(msg, len, "model hidden %d, expected %d", m.hidden, H);
            return -1;
        }
        fill(in, (size_t)cfg->tokens * H, seed);
        c->r = (struct moe_request){.op = MOE_OP_FORWARD,
                                    .model = m.id,
                                    .layer = 0,
                                    .dtype = MOE_F32,
                                    .n_tokens = (uint32_t)cfg->tokens,
                                    .input = in,
                                    .output = out};
    } else {
        struct moe_rpc_client_config cc = {.target = cfg->target};
        Moe__V1__ForwardRequest q = MOE__V1__FORWARD_REQUEST__INIT;
        Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
        int64_t shape[2] = {cfg->tokens, H};
        float *x = malloc(bytes);

        if (!x || moe_rpc_client_open(&cc, &c->rpc, msg, len) < 0) {
            free(x);
            return -1;
        }
        fill(x, (size_t)cfg->tokens * H, seed);
        t.n_shape = 2;
        t.shape = shape;
        t.dtype = MOE__V1__DTYPE__DTYPE_F32;
        t.data.data = (uint8_t *)x;
        t.data.len = bytes;
        q.model = "bench";
        q.layer = 0;
        q.hidden = &t;
        c->req_len = moe__v1__forward_request__get_packed_size(&q);
        c->req = malloc(c->req_len);
        if (c->req)
            moe__v1__forward_request__pack(&q, c->req);
        free(x);
        if (!c->req) {
            snprintf(msg, len, "out of memory");
            return -1;
        }
    }
    return 0;
}

static int conn_call(struct conn *c, char *msg, size_t len)
{
    if (c->cfg->tr == SHM) {
        struct moe_completion done;

        if (moe_forward(c->s, &c->r, &done) < 0) {
            snprintf(msg, len, "shm forward: %s", moe_last_error(c->s));
            return -1;
        }
    } else {
        Moe__V1__ForwardResponse *r;
        uint8_t *resp = NULL;
        size_t rl = 0;
        int st = moe_rpc_client_call(c->rpc, "/moe.v1.Experts/Forward", c->req, c->req_len, &resp,
                                     &rl, msg, len);

        if (st != 0)
            return -1;
        /* As a real client would: decode the answer, check it is whole. */
        r = moe__v1__forward_response__unpack(NULL, rl, resp);
        free(resp);
        if (!r || !r->output || r->output->data.len != (size_t)c->cfg->tokens * H * sizeof(float)) {
            snprintf(msg, len, "bad ForwardResponse");
            moe__v1__forward_response__free_unpacked(r, NULL);
            return -1;
        }
        moe__v1__forward_response__free_unpacked(r, NULL);
    }
    return 0;
}

/* A client process: connects, warms up, waits for the start, sends until
 * its time is up, writes its result to fd.  Never returns. */
static void client_main(const struct client_cfg *cfg, struct start *go, int fd, int idx)
{
    struct result res = {0};
    uint32_t *lat = malloc(MAX_SAMPLES * sizeof(*lat));
    char msg[512] = "";
    struct conn c;
    uint64_t start, end, t = 0;

    if (!lat || conn_open(&c, cfg, 1000 + (uint64_t)idx, msg, sizeof(msg)) < 0)
        goto fail;
    for (int i = 0; i < 3; i++)
        if (conn_call(&c, msg, sizeof(msg)) < 0)
            goto fail;
    atomic_fetch_add_explicit(&go->ready, 1, memory_order_release);
    /* Acquire pairs with the parent's release store: run_ns is set. */
    while (!(start = atomic_load_explicit(&go->start_ns, memory_order_acquire)))
        usleep(200);
    while (moe_now_ns() < start)
        usleep(50);
    end = start + go->run_ns;
    do {
        uint64_t t0 = moe_now_ns();

        if (conn_call(&c, msg, sizeof(msg)) < 0)
            goto fail;
        t = moe_now_ns();
        if (res.n < MAX_SAMPLES)
            lat[res.n] = (uint32_t)MOE_MIN(t - t0, UINT32_MAX);
        res.n++;
    } while (t < end);
    res.elapsed_ns = t - start;
    res.p99_ns = quantile(lat, MOE_MIN(res.n, MAX_SAMPLES), 0.99);
    res.p50_ns = quantile(lat, MOE_MIN(res.n, MAX_SAMPLES), 0.5);
    goto out;
fail:
    fprintf(stderr, "bench-shm: client %d (%s, %d tokens): %s\n", idx,
            cfg->tr == SHM ? "shm" : "gRPC", cfg->tokens, msg[0] ? msg : "out of memory");
    res.err = 1;
out:
    if (write(fd, &res, sizeof(res)) != (ssize_t)sizeof(res)) {
        /* the parent sees a short count and fails */
    }
    /* No cleanup: the kernel closes the session and the channel. */
    _exit(res.err);
}

struct run_result {
    double req_s, p50_ms, p99_ms;
};

/* n_procs client processes for run_s seconds. */
static struct run_result run_clients(const struct client_cfg *cfg, int n_procs, double run_s)
{
    struct start *go =
        mmap(NULL, sizeof(*go), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    double p50[MAX_PROCS];
    struct run_result rr = {0};
    pid_t pids[MAX_PROCS];
    int fds[2], got = 0, failed = 0;
    uint64_t deadline;

    if (go == MAP_FAILED || pipe(fds) < 0)
        die("mmap/pipe");
    go->run_ns = (uint64_t)(run_s * 1e9);
    fflush(stdout);
    for (int i = 0; i < n_procs; i++) {
        pids[i] = fork();
        if (pids[i] < 0)
            die("fork");
        if (pids[i] == 0) {
            close(fds[0]);
            client_main(cfg, go, fds[1], i);
        }
    }
    close(fds[1]);
    /* Connecting 16 gRPC channels on 2 cores takes a while; a client that
     * fails writes its result (err) at once, so do not wait for it. */
    deadline = moe_now_ns() + 60000000000ull;
    while (atomic_load_explicit(&go->ready, memory_order_acquire) < n_procs) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);

        if (p > 0 || moe_now_ns() > deadline) {
            for (int i = 0; i < n_procs; i++)
                kill(pids[i], SIGKILL);
            while (wait(NULL) > 0)
                ;
            die(p > 0 ? "a client process failed before the start" : "clients did not start");
        }
        usleep(1000);
    }
    /* Release pairs with the clients' acquire: run_ns written before. */
    atomic_store_explicit(&go->start_ns, moe_now_ns() + 5000000, memory_order_release);
    for (struct result r; got < n_procs && read(fds[0], &r, sizeof(r)) == sizeof(r); got++) {
        if (r.err || !r.n || !r.elapsed_ns) {
            failed = 1;
            continue;
        }
        rr.req_s += (double)r.n / ((double)r.elapsed_ns / 1e9);
        p50[got] = r.p50_ns / 1e6;
        rr.p99_ms = MOE_MAX(rr.p99_ms, r.p99_ns / 1e6);
    }
    close(fds[0]);
    for (int i = 0; i < n_procs; i++) {
        int st;

        if (waitpid(pids[i], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            failed = 1;
    }
    munmap(go, sizeof(*go));
    if (failed || got < n_procs)
        die("a client process failed (see above)");
    qsort(p50, (size_t)n_procs, sizeof(p50[0]), bench_cmp_double);
    rr.p50_ms = p50[n_procs / 2];
    return rr;
}

static void bench_throughput(const char *sock, const char *target, int ffn)
{
    static const int procs_full[] = {1, 4, 16}, procs_quick[] = {1, 2}, tokens[] = {1, 8};
    const int *procs = quick ? procs_quick : procs_full;
    int n_procs = quick ? (int)MOE_ARRAY_SIZE(procs_quick) : (int)MOE_ARRAY_SIZE(procs_full);
    double run_s = quick ? 0.3 : 1.5;

    printf("\n2. Forward throughput: one Mixtral-shaped layer, hidden %d, 8 experts of ffn %d, "
           "top-2, resident; f32 hidden states; each process sends back to back for %.1f s\n",
           H, ffn, run_s);
    printf("%5s %6s | %10s %10s %8s %8s | %10s %10s %8s %8s | %8s\n", "procs", "tokens",
           "shm req/s", "tokens/s", "p50 ms", "p99 ms", "gRPC req/s", "tokens/s", "p50 ms",
           "p99 ms", "shm/gRPC");
    for (int k = 0; k < (int)MOE_ARRAY_SIZE(tokens); k++) {
        for (int i = 0; i < n_procs; i++) {
            struct client_cfg cs = {SHM, sock, target, tokens[k]};
            struct client_cfg cg = {GRPC, sock, target, tokens[k]};
            struct run_result s = run_clients(&cs, procs[i], run_s);
            struct run_result g = run_clients(&cg, procs[i], run_s);

            printf("%5d %6d | %10.0f %10.0f %8.3f %8.3f | %10.0f %10.0f %8.3f %8.3f | %8.2f\n",
                   procs[i], tokens[k], s.req_s, s.req_s * tokens[k], s.p50_ms, s.p99_ms, g.req_s,
                   g.req_s * tokens[k], g.p50_ms, g.p99_ms, s.req_s / g.req_s);
        }
    }
    printf("req/s summed over the processes; p50 = median of the processes' p50, p99 = the "
           "worst process's; the limit is gRPC on loopback in the same run, shm/gRPC = ratio of "
           "req/s\n");
}

int main(int argc, char **argv)
{
    const char *dir = ".";
    struct moe_genmodel_opts g;
    struct moe_error err;
    char model[4096], sock[4200], target[64];
    uint64_t t0 = moe_now_ns();
    int port;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else {
            fprintf(stderr, "usage: bench-shm [--quick] [--dir DIR]\n");
            return 2;
        }
    }
    if (access(MOED_BIN, X_OK) < 0) {
        fprintf(stderr, "bench-shm: no moed at %s; skipped\n", MOED_BIN);
        return 77;
    }
    signal(SIGPIPE, SIG_IGN);
    if (sched_getaffinity(0, sizeof(all_cpus), &all_cpus) < 0)
        die("sched_getaffinity");
    /* as moed does: reuse big buffers instead of fresh pages per call */
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    snprintf(model, sizeof(model), "%s/bench-shm-model", dir);
    snprintf(sock, sizeof(sock), "%s/bench-shm.sock", model);
    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &g);
    g.out_dir = model;
    g.n_layers = 1;
    g.n_experts = 8;
    g.top_k = 2;
    g.hidden = H;
    g.ffn = quick ? 256 : 1024;
    if (moe_genmodel_write(&g, &err) < 0)
        die(err.msg);
    port = bench_moed_start("bench-shm", MOED_BIN, model, sock);
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    printf("moed on %s and %s\n", target, sock);
    {
        /* Spinning figures need idle cores: say how busy the machine was. */
        FILE *f = fopen("/proc/loadavg", "r");
        double load = -1;

        if (f) {
            if (fscanf(f, "%lf", &load) != 1)
                load = -1;
            fclose(f);
        }
        printf("%ld cores online, load average %.2f before the run\n",
               sysconf(_SC_NPROCESSORS_ONLN), load);
    }

    bench_ipc(sock);
    bench_throughput(sock, target, g.ffn);

    bench_moed_stop();
    {
        char cmd[4200];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", model);
        if (!strchr(model, '\'') && system(cmd) != 0)
            fprintf(stderr, "bench-shm: could not remove %s\n", model);
    }
    printf("\ntook %.1f s\n", (double)(moe_now_ns() - t0) / 1e9);
    return 0;
}
