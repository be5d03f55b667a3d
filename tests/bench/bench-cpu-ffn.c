/*
 * Benchmark of the CPU backend's grouped FFN on a Mixtral-shaped MoE layer:
 * hidden 4096, ffn 14336, 8 experts, top-2, bf16 weights (2.8 GB, uniform
 * random with the variance of N(0, 1/fan_in)), routed by moe_route() from
 * random router logits, for 1, 8, 64 and 512 tokens.
 *
 * For each size: the best time per call over several calls after a warm-up
 * (and the median), tokens/s, the bytes of the activated experts' weights
 * (each read once per call), the effective weight bandwidth, GFLOP/s, and
 * the ratio to the machine's memory read bandwidth measured in the same run
 * (every thread streaming-reading a 1 GiB buffer, best of several passes,
 * before and after the FFN runs).
 *
 * Usage: bench-cpu-ffn [--quick] [--kernel auto|generic|avx2|avx512]
 *                      [--threads N] [--tokens N[,N...]] [--reps N]
 * --quick: tiny shapes (hidden 256, ffn 512) and a small buffer, about a
 * second; ctest runs it as a smoke test.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "dtype.h"
#include "router.h"
#include "threadpool.h"

#define N_EXPERTS 8
#define TOP_K 2
#define MAX_SIZES 16

struct opts {
    bool quick;
    const char *kernel;
    int threads;
    int tokens[MAX_SIZES];
    int n_sizes;
    int reps; /* 0: by size */
};

static void usage(void)
{
    fprintf(stderr, "usage: bench-cpu-ffn [--quick] [--kernel auto|generic|avx2|avx512] "
                    "[--threads N] [--tokens N[,N...]] [--reps N]\n");
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o)
{
    static const int def_tokens[] = {1, 8, 64, 512};

    memset(o, 0, sizeof(*o));
    for (size_t i = 0; i < MOE_ARRAY_SIZE(def_tokens); i++)
        o->tokens[o->n_sizes++] = def_tokens[i];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            o->quick = true;
        } else if (!strcmp(argv[i], "--kernel") && i + 1 < argc) {
            o->kernel = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            o->threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            o->reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            char *s = argv[++i], *end;

            o->n_sizes = 0;
            while (*s && o->n_sizes < MAX_SIZES) {
                long v = strtol(s, &end, 10);

                if (end == s || v <= 0 || v > 1 << 20)
                    usage();
                o->tokens[o->n_sizes++] = (int)v;
                s = *end == ',' ? end + 1 : end;
            }
        } else {
            usage();
        }
    }
}

/* ---- filling weights fast -------------------------------------------------------- */

struct fill_ctx {
    uint16_t *dst;
    size_t n;
    size_t chunk;
    const uint16_t *table; /* [65536] random 16 bits -> bf16 value */
    uint64_t seed;
};

static void fill_task(void *arg, int task, int thread)
{
    const struct fill_ctx *c = arg;
    size_t i0 = (size_t)task * c->chunk;
    size_t i1 = MOE_MIN(i0 + c->chunk, c->n);
    uint64_t s = c->seed ^ ((uint64_t)task * 0x9e3779b97f4a7c15ull) ^ 0x5851f42d4c957f2dull;

    (void)thread;
    for (size_t i = i0; i < i1; i += 4) {
        uint64_t r;

        /* xorshift64* */
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        r = s * 0x2545f4914f6cdd1dull;
        for (size_t j = 0; j < 4 && i + j < i1; j++)
            c->dst[i + j] = c->table[(r >> (16 * j)) & 0xffff];
    }
}

/* Builds the table for uniform values in [-a, a), a = sqrt(3 / fan_in):
 * variance 1 / fan_in. */
static void make_table(uint16_t *t, int64_t fan_in)
{
    double a = sqrt(3.0 / (double)fan_in);

    for (int i = 0; i < 65536; i++)
        t[i] = moe_f32_to_bf16((float)(((double)i - 32768.0) / 32768.0 * a));
}

static void fill(struct moe_threadpool *pool, uint16_t *dst, size_t n, const uint16_t *table,
                 uint64_t seed)
{
    struct fill_ctx c = {.dst = dst, .n = n, .chunk = 1 << 20, .table = table, .seed = seed};

    moe_threadpool_run(pool, (int)((n + c.chunk - 1) / c.chunk), fill_task, &c);
}

/* ---- memory bandwidth ----------------------------------------------------------------- */

typedef uint64_t v8u64 __attribute__((vector_size(64)));

struct bw_ctx {
    const char *buf;
    size_t bytes, chunk;
    bool avx512;
    v8u64 sink[64]; /* per thread, keeps the loads alive */
};

/* Reads 4 equal parts of [p, p + n) side by side: several sequential streams
 * per thread keep more requests in flight than one. */
#define READ_BODY                                                                                  \
    do {                                                                                           \
        const v8u64 *v = (const v8u64 *)p;                                                         \
        size_t q = n / sizeof(v8u64) / 4;                                                          \
        v8u64 a = {0}, b = {0}, d = {0}, e = {0};                                                  \
                                                                                                   \
        for (size_t i = 0; i < q; i++) {                                                           \
            a ^= v[i];                                                                             \
            b ^= v[q + i];                                                                         \
            d ^= v[2 * q + i];                                                                     \
            e ^= v[3 * q + i];                                                                     \
        }                                                                                          \
        *ret = a ^ b ^ d ^ e;                                                                      \
    } while (0)

static void read_generic(const char *p, size_t n, v8u64 *ret)
{
    READ_BODY;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The same with 512-bit loads, where the CPU has them. */
__attribute__((target("avx512f"))) static void read_avx512(const char *p, size_t n, v8u64 *ret)
{
    READ_BODY;
}
#endif

static void bw_task(void *arg, int task, int thread)
{
    struct bw_ctx *c = arg;
    const char *p = c->buf + (size_t)task * c->chunk;
    size_t n = MOE_MIN(c->chunk, c->bytes - (size_t)task * c->chunk);
    v8u64 s;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (c->avx512)
        read_avx512(p, n, &s);
    else
        read_generic(p, n, &s);
#else
    read_generic(p, n, &s);
#endif
    c->sink[thread % 64] ^= s;
}

static volatile uint64_t bw_sink;

/* Best read bandwidth in GB/s of passes over a buffer of bytes. */
static double mem_bandwidth(struct moe_threadpool *pool, const void *buf, size_t bytes, int passes)
{
    static struct bw_ctx c;
    double best = 0;

    c.buf = buf;
    c.bytes = bytes;
    c.chunk = 4u << 20;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    c.avx512 = __builtin_cpu_supports("avx512f");
#endif
    for (int i = 0; i < passes; i++) {
        uint64_t t0 = moe_now_ns(), dt;

        moe_threadpool_run(pool, (int)((bytes + c.chunk - 1) / c.chunk), bw_task, &c);
        dt = moe_now_ns() - t0;
        if ((double)bytes / (double)dt > best)
            best = (double)bytes / (double)dt;
    }
    for (int i = 0; i < 64; i++)
        bw_sink ^= c.sink[i][0];
    return best;
}

/* ---- the benchmark ---------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

struct result {
    int tokens, experts, reps;
    int min_per_expert, max_per_expert; /* tokens per active expert */
    double best_ms, median_ms, weight_bytes, flops;
    double mem_bw; /* GB/s, best pass around this size */
};

static int bench_size(struct moe_backend *be, const struct moe_expert_weights *ex, int64_t H, int T,
                      int reps, uint64_t *seed, struct result *res)
{
    struct moe_router_params rp = {
        .score_func = MOE_SCORE_SOFTMAX,
        .n_experts = N_EXPERTS,
        .top_k = TOP_K,
        .norm_topk_prob = true,
        .n_group = 1,
        .topk_group = 1,
        .routed_scaling_factor = 1.0f,
    };
    struct moe_error err = {0};
    float *x = malloc((size_t)T * H * sizeof(float));
    float *out = be->ops->alloc(be, (size_t)T * H * sizeof(float));
    float *logits = malloc((size_t)T * N_EXPERTS * sizeof(float));
    int32_t *ids = malloc((size_t)T * TOP_K * sizeof(int32_t));
    float *weights = malloc((size_t)T * TOP_K * sizeof(float));
    int32_t *tokens = malloc((size_t)T * TOP_K * sizeof(int32_t));
    float *scales = malloc((size_t)T * TOP_K * sizeof(float));
    uint64_t *times = calloc((size_t)reps, sizeof(uint64_t));
    struct moe_ffn_work work[N_EXPERTS];
    int n_work = 0, n_assign = 0, r = -ENOMEM;

    if (!x || !out || !logits || !ids || !weights || !tokens || !scales || !times)
        goto out;
    for (size_t i = 0; i < (size_t)T * H; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(*seed >> 11) * 0x1p-53 * 2.0 - 1.0);
    }
    for (size_t i = 0; i < (size_t)T * N_EXPERTS; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        logits[i] = (float)((double)(*seed >> 11) * 0x1p-53 * 4.0 - 2.0);
    }
    r = moe_route(&rp, logits, T, ids, weights, &err);
    if (r < 0) {
        fprintf(stderr, "moe_route: %s\n", err.msg);
        goto out;
    }
    /* group by expert */
    for (int e = 0; e < N_EXPERTS; e++) {
        int start = n_assign;

        for (int t = 0; t < T; t++)
            for (int k = 0; k < TOP_K; k++)
                if (ids[t * TOP_K + k] == e) {
                    tokens[n_assign] = t;
                    scales[n_assign] = weights[t * TOP_K + k];
                    n_assign++;
                }
        if (n_assign > start)
            work[n_work++] = (struct moe_ffn_work){
                .w = &ex[e],
                .n_tokens = n_assign - start,
                .tokens = tokens + start,
                .scales = scales + start,
            };
    }

    /* warm-up, then timed calls */
    memset(out, 0, (size_t)T * H * sizeof(float));
    r = be->ops->grouped_ffn(be, x, H, T, work, n_work, out);
    for (int i = 0; i < reps && r == 0; i++) {
        uint64_t t0 = moe_now_ns();

        r = be->ops->grouped_ffn(be, x, H, T, work, n_work, out);
        times[i] = moe_now_ns() - t0;
    }
    if (r < 0) {
        fprintf(stderr, "grouped_ffn: %s\n", strerror(-r));
        goto out;
    }
    qsort(times, (size_t)reps, sizeof(*times), cmp_u64);
    *res = (struct result){
        .tokens = T,
        .experts = n_work,
        .reps = reps,
        .min_per_expert = INT32_MAX,
        .best_ms = (double)times[0] * 1e-6,
        .median_ms = (double)times[reps / 2] * 1e-6,
        .weight_bytes = (double)n_work * 3.0 * (double)H * (double)ex[0].ffn * 2.0,
        .flops = (double)n_assign * 6.0 * (double)H * (double)ex[0].ffn,
    };
    for (int i = 0; i < n_work; i++) {
        res->min_per_expert = MOE_MIN(res->min_per_expert, work[i].n_tokens);
        res->max_per_expert = MOE_MAX(res->max_per_expert, work[i].n_tokens);
    }
out:
    free(x);
    be->ops->mem_free(be, out);
    free(logits);
    free(ids);
    free(weights);
    free(tokens);
    free(scales);
    free(times);
    return r;
}

int main(int argc, char **argv)
{
    struct opts o;
    struct moe_cpu_config cfg;
    struct moe_backend *be = NULL;
    struct moe_threadpool *pool = NULL;
    struct moe_error err = {0};
    struct moe_expert_weights ex[N_EXPERTS];
    void *mats[N_EXPERTS][3] = {{0}};
    struct result res[MAX_SIZES];
    uint16_t *table_in = malloc(65536 * 2), *table_f = malloc(65536 * 2);
    int64_t H, F;
    size_t bw_bytes;
    void *bw_buf = NULL;
    double bw, bw_after;
    int passes;
    uint64_t seed = 42, t_start = moe_now_ns(), t0;
    int r = 1;

    parse(argc, argv, &o);
    H = o.quick ? 256 : 4096;
    F = o.quick ? 512 : 14336;
    bw_bytes = o.quick ? (64u << 20) : (1u << 30);
    passes = o.quick ? 2 : 3;
    cfg = (struct moe_cpu_config){.n_threads = o.threads, .kernel = o.kernel};
    if (moe_backend_cpu_init(&cfg, &be, &err) < 0) {
        fprintf(stderr, "bench-cpu-ffn: %s\n", err.msg);
        return 1;
    }
    if (moe_threadpool_init(o.threads, &pool) < 0 || !table_in || !table_f)
        goto out;

    /* weights */
    t0 = moe_now_ns();
    make_table(table_in, H);
    make_table(table_f, F);
    for (int e = 0; e < N_EXPERTS; e++) {
        size_t n = (size_t)H * F;

        for (int m = 0; m < 3; m++) {
            mats[e][m] = be->ops->alloc(be, n * 2);
            if (!mats[e][m]) {
                fprintf(stderr, "bench-cpu-ffn: out of memory for the weights\n");
                goto out;
            }
            fill(pool, mats[e][m], n, m == 2 ? table_f : table_in, seed + (uint64_t)e * 3 + m);
        }
        ex[e] = (struct moe_expert_weights){
            .dtype = MOE_DTYPE_BF16,
            .hidden = H,
            .ffn = F,
            .gate = mats[e][0],
            .up = mats[e][1],
            .down = mats[e][2],
        };
    }
    printf("moe layer: hidden %lld, ffn %lld, %d experts, top-%d, bf16 weights %.2f GB "
           "(filled in %.2f s)\n",
           (long long)H, (long long)F, N_EXPERTS, TOP_K,
           (double)N_EXPERTS * 3 * (double)H * (double)F * 2 * 1e-9,
           (double)(moe_now_ns() - t0) * 1e-9);
    printf("cpu backend: kernel %s, %d threads\n", moe_backend_cpu_kernel(be),
           moe_threadpool_size(pool));

    /* Memory read bandwidth, from the backend like the weights (huge pages
     * where available), measured just before and just after each size: the
     * machine is shared and its bandwidth drifts, so each row is compared
     * with the best of the passes around it. */
    bw_buf = be->ops->alloc(be, bw_bytes);
    if (!bw_buf)
        goto out;
    memset(bw_buf, 1, bw_bytes);
    bw = mem_bandwidth(pool, bw_buf, bw_bytes, passes);
    for (int i = 0; i < o.n_sizes; i++) {
        int T = o.tokens[i];
        int reps = o.reps > 0 ? o.reps : o.quick ? 5 : T >= 256 ? 3 : T >= 64 ? 5 : 20;

        if (bench_size(be, ex, H, T, reps, &seed, &res[i]) < 0)
            goto out;
        bw_after = mem_bandwidth(pool, bw_buf, bw_bytes, passes);
        res[i].mem_bw = MOE_MAX(bw, bw_after);
        bw = bw_after;
    }

    printf("memory read bandwidth: %d threads streaming a %zu MiB buffer, best of %d passes "
           "before and %d after each size\n",
           moe_threadpool_size(pool), bw_bytes >> 20, passes, passes);
    printf("times: best of N calls after a warm-up (median in brackets)\n\n");
    printf("%6s %7s %7s %4s %17s %9s %10s %8s %8s %8s %7s\n", "tokens", "experts", "tok/exp", "N",
           "ms/call", "tokens/s", "weights MB", "eff GB/s", "GFLOP/s", "mem GB/s", "eff/mem");
    for (int i = 0; i < o.n_sizes; i++) {
        const struct result *p = &res[i];
        double s = p->best_ms * 1e-3;
        char ms[32], per[24];

        snprintf(ms, sizeof(ms), "%.3f (%.3f)", p->best_ms, p->median_ms);
        snprintf(per, sizeof(per), "%d-%d", p->min_per_expert, p->max_per_expert);
        printf("%6d %7d %7s %4d %17s %9.1f %10.1f %8.1f %8.1f %8.1f %7.2f\n", p->tokens, p->experts,
               per, p->reps, ms, p->tokens / s, p->weight_bytes * 1e-6, p->weight_bytes / s * 1e-9,
               p->flops / s * 1e-9, p->mem_bw, p->weight_bytes / s * 1e-9 / p->mem_bw);
    }
    printf("\ntotal %.1f s\n", (double)(moe_now_ns() - t_start) * 1e-9);
    r = 0;
out:
    for (int e = 0; e < N_EXPERTS; e++)
        for (int m = 0; m < 3; m++)
            be->ops->mem_free(be, mats[e][m]);
    be->ops->mem_free(be, bw_buf);
    moe_threadpool_free(pool);
    moe_backend_free(be);
    free(table_in);
    free(table_f);
    return r;
}
