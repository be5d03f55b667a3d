/*
 * Benchmark of the CPU backend's grouped FFN on a Mixtral-shaped MoE layer:
 * hidden 4096, ffn 14336, 8 experts, top-2, bf16 weights (2.8 GB, uniform
 * random with the variance of N(0, 1/fan_in)), routed by moe_route() from
 * random router logits, for 1, 8, 64 and 512 tokens (and 4096 on request),
 * with 1 thread and with one per CPU, in both compute precisions.
 *
 * For each size: the best time per call over several calls after a warm-up
 * (and the median), tokens/s, the bytes of the activated experts' weights
 * (each read once per call), the effective weight bandwidth, GFLOP/s, and
 * the ratio to the machine's memory read bandwidth measured in the same run
 * with the same threads (every thread streaming-reading a 1 GiB buffer, best
 * of several passes, before and after the FFN runs).
 *
 * torch's column: tests/bench/bench-torch-moe.py, Hugging Face's Mixtral MoE
 * block loop in bf16 on the same shapes and thread count, run by the Python
 * of --torch (default: $MOE_TORCH_PYTHON, else python3 if it has torch, else
 * the Hugging Face test environment of scripts/hf-env.sh); the column says
 * "-" when none has torch.  Ratio: torch's time over moed's bf16 time.
 *
 * --dtype runs the same layer stored in other formats (engine/quant.h): fp8
 * (e4m3, a float32 scale per 128x128 block, as DeepSeek-V3 publishes it),
 * int8 (scale per 128 values of a row), int4 (per 32), mxfp4 (e2m1, e8m0
 * scale per 32); random values and scales of the same spread.  "weights MB"
 * and eff GB/s count the bytes as stored (values and scales), so eff/mem
 * says how close decode comes to streaming the stored bytes at the
 * machine's read bandwidth, whatever the format.  torch runs only for bf16.
 * --clock cpu times every call and every bandwidth pass by the process's
 * CPU time divided by the thread count instead of the wall clock: on a
 * machine shared with other loads, both sides of eff/mem then count only
 * the time this process ran (stalls on memory included), so the ratio
 * holds where wall-clock ratios swing with the other loads.
 * --act int8 runs int8 and int4 (each a second time, when the list also
 * says exact) with int8 activations (struct moe_cpu_config.act_int8): the
 * title says "int8 activations".
 *
 * Usage: bench-cpu-ffn [--quick] [--kernel auto|generic|avx2|avx512|amx|onednn]
 *                      [--threads N[,N...]] [--tokens N[,N...]] [--reps N]
 *                      [--precision exact|bf16[,...]] [--torch PYTHON|off]
 *                      [--dtype bf16|fp8|int8|int4|mxfp4[,...]]
 *                      [--act exact|int8[,...]] [--clock wall|cpu] [--bandwidth]
 * --quick: tiny shapes (hidden 256, ffn 512) and a small buffer, about a
 * second, without torch unless --torch names one, every format unless
 * --dtype says; ctest runs it as a smoke test.  --bandwidth: only the read
 * bandwidth for each --threads count, one line each ("bandwidth THREADS
 * GB/s"), for other benchmarks' limits (tests/bench/bench-hf.py).
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "common.h"
#include "dtype.h"
#include "quant.h"
#include "router.h"
#include "threadpool.h"

#define N_EXPERTS 8
#define TOP_K 2
#define MAX_SIZES 16
#define MAX_THREADS 8

struct opts {
    bool quick;
    const char *kernel;
    int threads[MAX_THREADS]; /* thread counts to run */
    int n_threads;
    int tokens[MAX_SIZES];
    int n_sizes;
    int reps;          /* 0: by size */
    bool prec[2];      /* precisions to run, by enum moe_compute_precision */
    const char *torch; /* NULL: find one; "off": none; else a Python */
    struct moe_quant_fmt fmts[MOE_QUANT_COUNT]; /* formats to run; .q NONE: bf16 */
    int n_fmts;
    bool act[2];         /* activations for int8, int4, mxfp4: [0] exact, [1] int8 */
    bool cpu_time;       /* --clock cpu */
    bool bandwidth_only; /* --bandwidth: the read bandwidth alone */
};

/* --clock cpu: the thread count the process's CPU time is divided by; 0:
 * the wall clock. */
static int clock_threads;

/* Now, by the clock --clock chose, in ns. */
static uint64_t bench_ns(void)
{
    struct timespec ts;

    if (!clock_threads)
        return moe_now_ns();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) / (uint64_t)clock_threads;
}

/* The formats --dtype names, with their scale blocks. */
static const struct {
    const char *name;
    struct moe_quant_fmt f;
} fmt_names[] = {
    {"bf16", {MOE_QUANT_NONE, 0, 0}},
    {"fp8", {MOE_QUANT_FP8, 128, 128}},
    {"int8", {MOE_QUANT_INT8, 1, MOE_QUANT_INT8_GROUP}},
    {"int4", {MOE_QUANT_INT4, 1, MOE_QUANT_INT4_GROUP}},
    {"mxfp4", {MOE_QUANT_MXFP4, 1, 32}},
};

static const char *fmt_name(const struct moe_quant_fmt *f)
{
    return f->q == MOE_QUANT_NONE ? "bf16" : moe_quant_name(f->q);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench-cpu-ffn [--quick] [--kernel auto|generic|avx2|avx512|amx|onednn] "
                    "[--threads N[,N...]] [--tokens N[,N...]] [--reps N] "
                    "[--precision exact|bf16[,...]] [--torch PYTHON|off] "
                    "[--dtype bf16|fp8|int8|int4|mxfp4[,...]] [--act exact|int8[,...]] "
                    "[--clock wall|cpu] [--bandwidth]\n");
    exit(2);
}

/* Parses "N[,N...]" into at most max values in [1, limit]. */
static int parse_list(const char *s, int *v, int max, long limit)
{
    int n = 0;
    char *end;

    while (*s && n < max) {
        long x = strtol(s, &end, 10);

        if (end == s || x <= 0 || x > limit || (*end && *end != ','))
            usage();
        v[n++] = (int)x;
        s = *end == ',' ? end + 1 : end;
    }
    if (n == 0)
        usage();
    return n;
}

static void parse(int argc, char **argv, struct opts *o)
{
    static const int def_tokens[] = {1, 8, 64, 512};
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);

    memset(o, 0, sizeof(*o));
    for (size_t i = 0; i < MOE_ARRAY_SIZE(def_tokens); i++)
        o->tokens[o->n_sizes++] = def_tokens[i];
    o->threads[o->n_threads++] = 1;
    if (cpus > 1)
        o->threads[o->n_threads++] = (int)MOE_MIN(cpus, 256);
    o->prec[MOE_PRECISION_EXACT] = o->prec[MOE_PRECISION_BF16] = true;
    o->act[0] = true;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bandwidth")) {
            o->bandwidth_only = true;
        } else if (!strcmp(argv[i], "--quick")) {
            o->quick = true;
        } else if (!strcmp(argv[i], "--kernel") && i + 1 < argc) {
            o->kernel = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            o->n_threads = parse_list(argv[++i], o->threads, MAX_THREADS, 1024);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            o->reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            o->n_sizes = parse_list(argv[++i], o->tokens, MAX_SIZES, 1 << 20);
        } else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            const char *s = argv[++i];

            o->prec[0] = o->prec[1] = false;
            while (*s) {
                size_t len = strcspn(s, ",");

                if (len == 5 && !strncmp(s, "exact", 5))
                    o->prec[MOE_PRECISION_EXACT] = true;
                else if (len == 4 && !strncmp(s, "bf16", 4))
                    o->prec[MOE_PRECISION_BF16] = true;
                else
                    usage();
                s += len + (s[len] == ',');
            }
        } else if (!strcmp(argv[i], "--clock") && i + 1 < argc) {
            i++;
            if (strcmp(argv[i], "wall") && strcmp(argv[i], "cpu"))
                usage();
            o->cpu_time = !strcmp(argv[i], "cpu");
        } else if (!strcmp(argv[i], "--act") && i + 1 < argc) {
            const char *s = argv[++i];

            o->act[0] = o->act[1] = false;
            while (*s) {
                size_t len = strcspn(s, ",");

                if (len == 5 && !strncmp(s, "exact", 5))
                    o->act[0] = true;
                else if (len == 4 && !strncmp(s, "int8", 4))
                    o->act[1] = true;
                else
                    usage();
                s += len + (s[len] == ',');
            }
        } else if (!strcmp(argv[i], "--torch") && i + 1 < argc) {
            o->torch = argv[++i];
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            const char *p = argv[++i];

            o->n_fmts = 0;
            while (*p && o->n_fmts < MOE_QUANT_COUNT) {
                size_t len = strcspn(p, ","), k;

                for (k = 0; k < MOE_ARRAY_SIZE(fmt_names); k++)
                    if (strlen(fmt_names[k].name) == len && !strncmp(p, fmt_names[k].name, len))
                        break;
                if (k == MOE_ARRAY_SIZE(fmt_names))
                    usage();
                o->fmts[o->n_fmts++] = fmt_names[k].f;
                p += len + (p[len] == ',');
            }
            if (o->n_fmts == 0)
                usage();
        } else {
            usage();
        }
    }
    if (o->quick && !o->torch)
        o->torch = "off";
    if (o->n_fmts == 0) {
        /* quick: every format; else bf16 */
        for (size_t k = 0; k < (o->quick ? MOE_ARRAY_SIZE(fmt_names) : 1); k++)
            o->fmts[o->n_fmts++] = fmt_names[k].f;
    }
}

/* Bytes of one expert as stored: values and scales of its three matrices. */
static double expert_bytes(const struct moe_expert_weights *e)
{
    if (e->quant.q == MOE_QUANT_NONE)
        return 3.0 * (double)e->hidden * (double)e->ffn * (double)moe_dtype_size(e->dtype);
    return 3.0 * ((double)moe_quant_data_bytes(e->quant.q, e->ffn, e->hidden) +
                  (double)moe_quant_scale_bytes(&e->quant, e->ffn, e->hidden));
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
        uint64_t t0 = bench_ns(), dt;

        moe_threadpool_run(pool, (int)((bytes + c.chunk - 1) / c.chunk), bw_task, &c);
        dt = bench_ns() - t0;
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
                      int reps, enum moe_compute_precision prec, uint64_t seed, struct result *res)
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
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(seed >> 11) * 0x1p-53 * 2.0 - 1.0);
    }
    for (size_t i = 0; i < (size_t)T * N_EXPERTS; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        logits[i] = (float)((double)(seed >> 11) * 0x1p-53 * 4.0 - 2.0);
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
                .precision = prec,
            };
    }

    /* warm-up, then timed calls */
    memset(out, 0, (size_t)T * H * sizeof(float));
    r = be->ops->grouped_ffn(be, x, H, T, work, n_work, out);
    for (int i = 0; i < reps && r == 0; i++) {
        uint64_t t0 = bench_ns();

        r = be->ops->grouped_ffn(be, x, H, T, work, n_work, out);
        times[i] = bench_ns() - t0;
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
        .weight_bytes = (double)n_work * expert_bytes(&ex[0]),
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

/* ---- torch's column ----------------------------------------------------------------------- */

struct torch_row {
    int tokens;
    double best_ms, median_ms;
};

/* This source's directory, from __FILE__ (CMake compiles it by absolute path). */
static void source_dir(char *dir, size_t size)
{
    const char *slash = strrchr(__FILE__, '/');

    snprintf(dir, size, "%.*s", slash ? (int)(slash - __FILE__) : 1, slash ? __FILE__ : ".");
}

static bool python_has_torch(const char *python)
{
    char cmd[1100];

    if (snprintf(cmd, sizeof(cmd), "'%s' -c 'import torch' >/dev/null 2>&1", python) >=
        (int)sizeof(cmd))
        return false;
    return system(cmd) == 0;
}

/* Chooses the Python that runs torch's block into py; false when none. */
static bool find_torch(const struct opts *o, char *py, size_t size)
{
    const char *env = getenv("MOE_TORCH_PYTHON");
    char dir[512], cmd[1024];
    FILE *f;

    if (o->torch) {
        snprintf(py, size, "%s", o->torch);
        return strcmp(o->torch, "off") != 0;
    }
    if (env && *env) {
        snprintf(py, size, "%s", env);
        return true;
    }
    snprintf(py, size, "python3");
    if (python_has_torch(py))
        return true;
    source_dir(dir, sizeof(dir));
    snprintf(cmd, sizeof(cmd), "'%s/../../scripts/hf-env.sh' --print 2>/dev/null", dir);
    f = popen(cmd, "r");
    if (!f)
        return false;
    if (!fgets(py, (int)size, f))
        py[0] = '\0';
    pclose(f);
    py[strcspn(py, "\n")] = '\0';
    return py[0] && python_has_torch(py);
}

/*
 * Runs bench-torch-moe.py with python on the benchmark's shapes; fills
 * rows[i] for o->tokens[i] (best_ms < 0 where it gave none) and version.
 * 0, or -1 with the reason printed.
 */
static int run_torch(const char *python, const struct opts *o, int64_t H, int64_t F, int threads,
                     struct torch_row *rows, char *version, size_t vsize)
{
    char dir[512], cmd[2048], line[512];
    size_t len;
    FILE *f;
    int status;

    source_dir(dir, sizeof(dir));
    len = (size_t)snprintf(cmd, sizeof(cmd),
                           "'%s' '%s/bench-torch-moe.py' --hidden %lld --ffn %lld --experts %d "
                           "--top-k %d --threads %d --tokens ",
                           python, dir, (long long)H, (long long)F, N_EXPERTS, TOP_K, threads);
    for (int i = 0; i < o->n_sizes && len < sizeof(cmd); i++)
        len += (size_t)snprintf(cmd + len, sizeof(cmd) - len, "%s%d", i ? "," : "", o->tokens[i]);
    if (o->reps > 0 && len < sizeof(cmd))
        snprintf(cmd + len, sizeof(cmd) - len, " --reps %d", o->reps);
    for (int i = 0; i < o->n_sizes; i++)
        rows[i] = (struct torch_row){.tokens = o->tokens[i], .best_ms = -1};
    f = popen(cmd, "r");
    if (!f) {
        fprintf(stderr, "bench-cpu-ffn: cannot run %s: %s\n", python, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), f)) {
        const char *v = strstr(line, "\"torch\": \"");
        const char *t = strstr(line, "\"tokens\": ");
        const char *b = strstr(line, "\"best_ms\": ");
        const char *m = strstr(line, "\"median_ms\": ");

        if (v) {
            v += strlen("\"torch\": \"");
            snprintf(version, vsize, "%.*s", (int)strcspn(v, "\""), v);
        } else if (t && b && m) {
            int tokens = atoi(t + strlen("\"tokens\": "));

            for (int i = 0; i < o->n_sizes; i++)
                if (rows[i].tokens == tokens && rows[i].best_ms < 0) {
                    rows[i].best_ms = strtod(b + strlen("\"best_ms\": "), NULL);
                    rows[i].median_ms = strtod(m + strlen("\"median_ms\": "), NULL);
                    break;
                }
        }
    }
    status = pclose(f);
    if (status != 0) {
        fprintf(stderr, "bench-cpu-ffn: torch's block (%s) failed, status %d\n", python, status);
        return -1;
    }
    return 0;
}

/* ---- one thread count ----------------------------------------------------------------------- */

/* Runs every size and precision with threads threads and prints the table. */
static int bench_threads(const struct opts *o, const struct moe_expert_weights *ex, int64_t H,
                         void *bw_buf, size_t bw_bytes, int threads, const char *python, bool a8)
{
    struct moe_cpu_config cfg = {.n_threads = threads, .kernel = o->kernel, .act_int8 = a8};
    struct moe_backend *be = NULL;
    struct moe_threadpool *pool = NULL;
    struct moe_error err = {0};
    struct result res[MAX_SIZES][2];
    struct torch_row trow[MAX_SIZES];
    char tver[64] = "";
    bool have_torch = false;
    int passes = o->quick ? 2 : 3, r = -1;
    double bw, bw_after;

    if (moe_backend_cpu_init(&cfg, &be, &err) < 0) {
        fprintf(stderr, "bench-cpu-ffn: %s\n", err.msg);
        return -1;
    }
    clock_threads = o->cpu_time ? threads : 0;
    if (moe_threadpool_init(threads, &pool) < 0)
        goto out;
    bw = mem_bandwidth(pool, bw_buf, bw_bytes, passes);
    for (int i = 0; i < o->n_sizes; i++) {
        int T = o->tokens[i];
        int reps = o->reps > 0 ? o->reps : o->quick ? 5 : T >= 256 ? 3 : T >= 64 ? 5 : 20;

        bw_after = 0;
        for (int p = 0; p < 2; p++) {
            res[i][p].tokens = 0;
            if (!o->prec[p])
                continue;
            /* the same routing and inputs for both precisions */
            if (bench_size(be, ex, H, T, reps, (enum moe_compute_precision)p, 42 + (uint64_t)T,
                           &res[i][p]) < 0)
                goto out;
            bw_after = MOE_MAX(bw_after, mem_bandwidth(pool, bw_buf, bw_bytes, passes));
        }
        for (int p = 0; p < 2; p++)
            res[i][p].mem_bw = MOE_MAX(bw, bw_after);
        bw = bw_after;
    }
    if (python && ex[0].quant.q == MOE_QUANT_NONE)
        have_torch = run_torch(python, o, H, ex[0].ffn, threads, trow, tver, sizeof(tver)) == 0;

    printf("\n%s weights%s, %d thread%s, kernel %s; memory read bandwidth: %d threads streaming a "
           "%zu MiB buffer, best of %d passes before and after each size%s\n",
           fmt_name(&ex[0].quant), a8 ? ", int8 activations" : "", threads, threads > 1 ? "s" : "",
           moe_backend_cpu_describe(be), threads, bw_bytes >> 20, passes,
           clock_threads ? "; times: CPU time per thread" : "");
    printf("torch: %s\n", have_torch                        ? tver
                          : ex[0].quant.q != MOE_QUANT_NONE ? "not run (bf16 only)"
                          : python                          ? "failed (see above)"
                                                            : "not run (no Python with torch)");
    printf("%7s %6s %7s %7s %17s %17s %10s %6s %10s %8s %8s %7s %8s\n", "threads", "tokens",
           "experts", "tok/exp", "exact ms", "bf16 ms", "torch ms", "torch/", "weights MB",
           "eff GB/s", "mem GB/s", "eff/mem", "GFLOP/s");
    printf("%7s %6s %7s %7s %17s %17s %10s %6s %10s %8s %8s %7s %8s\n", "", "", "", "",
           "best (median)", "best (median)", "best", "bf16", "", "best", "", "", "best");
    for (int i = 0; i < o->n_sizes; i++) {
        const struct result *e = &res[i][0], *b = &res[i][1];
        const struct result *p = !e->tokens ? b : !b->tokens ? e : b->best_ms < e->best_ms ? b : e;
        double s = p->best_ms * 1e-3;
        char ems[32] = "-", bms[32] = "-", tms[16] = "-", ratio[16] = "-", per[24];

        if (e->tokens)
            snprintf(ems, sizeof(ems), "%.3f (%.3f)", e->best_ms, e->median_ms);
        if (b->tokens)
            snprintf(bms, sizeof(bms), "%.3f (%.3f)", b->best_ms, b->median_ms);
        if (have_torch && trow[i].best_ms >= 0) {
            snprintf(tms, sizeof(tms), "%.3f", trow[i].best_ms);
            if (b->tokens)
                snprintf(ratio, sizeof(ratio), "%.2f", trow[i].best_ms / b->best_ms);
        }
        snprintf(per, sizeof(per), "%d-%d", p->min_per_expert, p->max_per_expert);
        printf("%7d %6d %7d %7s %17s %17s %10s %6s %10.1f %8.1f %8.1f %7.2f %8.1f\n", threads,
               p->tokens, p->experts, per, ems, bms, tms, ratio, p->weight_bytes * 1e-6,
               p->weight_bytes / s * 1e-9, p->mem_bw, p->weight_bytes / s * 1e-9 / p->mem_bw,
               p->flops / s * 1e-9);
    }
    fflush(stdout);
    r = 0;
out:
    moe_threadpool_free(pool);
    moe_backend_free(be);
    return r;
}

/*
 * The table of random 16 bits -> two stored values of format f (values of
 * a matrix of fan_in columns: bf16 uniform with variance 1 / fan_in; the
 * quantized formats' codes uniform over their range, the scale setting the
 * spread, see scale_of).
 */
static void make_qtable(uint16_t *t, const struct moe_quant_fmt *f, int64_t fan_in)
{
    if (f->q == MOE_QUANT_NONE) {
        make_table(t, fan_in);
        return;
    }
    for (int i = 0; i < 65536; i++) {
        uint8_t b[2] = {(uint8_t)i, (uint8_t)(i >> 8)};

        for (int j = 0; j < 2; j++) {
            switch (f->q) {
            case MOE_QUANT_FP8:
                b[j] = moe_f32_to_fp8_e4m3(((float)b[j] - 127.5f) / 127.5f * 448.0f);
                break;
            case MOE_QUANT_INT8:
                b[j] = (uint8_t)(int8_t)MOE_MAX(-127, (int)b[j] - 128);
                break;
            default: /* int4, mxfp4: any two nibbles */
                break;
            }
        }
        t[i] = (uint16_t)(b[0] | b[1] << 8);
    }
}

/* The scale that gives uniform codes of f the spread of the bf16 weights. */
static float scale_of(const struct moe_quant_fmt *f, int64_t fan_in)
{
    double a = sqrt(3.0 / (double)fan_in);

    switch (f->q) {
    case MOE_QUANT_FP8:
        return (float)(a / 448.0);
    case MOE_QUANT_INT8:
        return (float)(a / 127.0);
    case MOE_QUANT_INT4:
        return (float)(a / 7.0);
    default:
        return (float)(a / 6.0);
    }
}

/* One matrix [rows, cols] of format f into backend memory: values at
 * *ret_w, scales at *ret_s (NULL for bf16).  0 or -ENOMEM. */
static int make_matrix(struct moe_backend *be, struct moe_threadpool *pool,
                       const struct moe_quant_fmt *f, int64_t rows, int64_t cols,
                       const uint16_t *table, uint64_t seed, void **ret_w, void **ret_s)
{
    uint64_t vb =
        f->q == MOE_QUANT_NONE ? (uint64_t)rows * cols * 2 : moe_quant_data_bytes(f->q, rows, cols);

    *ret_s = NULL;
    *ret_w = be->ops->alloc(be, vb);
    if (!*ret_w)
        return -ENOMEM;
    fill(pool, *ret_w, vb / 2, table, seed);
    if (f->q != MOE_QUANT_NONE) {
        uint64_t sb = moe_quant_scale_bytes(f, rows, cols);
        float sc = scale_of(f, cols);

        *ret_s = be->ops->alloc(be, sb);
        if (!*ret_s)
            return -ENOMEM;
        for (uint64_t i = 0; i < sb / moe_quant_scale_size(f->q); i++) {
            if (f->q == MOE_QUANT_MXFP4)
                ((uint8_t *)*ret_s)[i] = (uint8_t)(127 + (int)lrint(log2((double)sc)));
            else
                ((float *)*ret_s)[i] = sc * (float)(1.0 + 0.25 * (double)(i % 5) / 4.0);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o;
    struct moe_cpu_config cfg;
    struct moe_backend *be = NULL;
    struct moe_threadpool *pool = NULL;
    struct moe_error err = {0};
    struct moe_expert_weights ex[N_EXPERTS];
    void *mats[N_EXPERTS][6] = {{0}};
    uint16_t *table_in = malloc(65536 * 2), *table_f = malloc(65536 * 2);
    int64_t H, F;
    size_t bw_bytes;
    void *bw_buf = NULL;
    char python[1024];
    bool torch;
    uint64_t seed = 42, t_start = moe_now_ns(), t0;
    int r = 1;

    parse(argc, argv, &o);
    H = o.quick ? 256 : 4096;
    F = o.quick ? 512 : 14336;
    bw_bytes = o.quick ? (64u << 20) : (1u << 30);
    cfg = (struct moe_cpu_config){.kernel = o.kernel};
    if (moe_backend_cpu_init(&cfg, &be, &err) < 0) {
        fprintf(stderr, "bench-cpu-ffn: %s\n", err.msg);
        return 1;
    }
    if (moe_threadpool_init(0, &pool) < 0 || !table_in || !table_f)
        goto out;
    torch = find_torch(&o, python, sizeof(python));

    /* Memory read bandwidth, from the backend like the weights (huge pages
     * where available), measured just before and just after each size: the
     * machine is shared and its bandwidth drifts, so each row is compared
     * with the best of the passes around it. */
    bw_buf = be->ops->alloc(be, bw_bytes);
    if (!bw_buf)
        goto out;
    memset(bw_buf, 1, bw_bytes);
    if (o.bandwidth_only) {
        for (int ti = 0; ti < o.n_threads; ti++) {
            struct moe_threadpool *tp = NULL;

            if (moe_threadpool_init(o.threads[ti], &tp) < 0)
                goto out;
            printf("bandwidth %d %.2f\n", o.threads[ti], mem_bandwidth(tp, bw_buf, bw_bytes, 5));
            moe_threadpool_free(tp);
        }
        r = 0;
        goto out;
    }

    for (int fi = 0; fi < o.n_fmts; fi++) {
        const struct moe_quant_fmt *f = &o.fmts[fi];

        /* weights: one format at a time, the previous one freed */
        t0 = moe_now_ns();
        make_qtable(table_in, f, H);
        make_qtable(table_f, f, F);
        for (int e = 0; e < N_EXPERTS; e++) {
            for (int m = 0; m < 3; m++) {
                if (make_matrix(be, pool, f, m == 2 ? H : F, m == 2 ? F : H,
                                m == 2 ? table_f : table_in, seed + (uint64_t)e * 3 + m,
                                &mats[e][m], &mats[e][3 + m]) < 0) {
                    fprintf(stderr, "bench-cpu-ffn: out of memory for the weights\n");
                    goto out;
                }
            }
            ex[e] = (struct moe_expert_weights){
                .dtype = f->q == MOE_QUANT_NONE ? MOE_DTYPE_BF16 : moe_quant_value_dtype(f->q),
                .hidden = H,
                .ffn = F,
                .gate = mats[e][0],
                .up = mats[e][1],
                .down = mats[e][2],
                .quant = *f,
                .gate_s = mats[e][3],
                .up_s = mats[e][4],
                .down_s = mats[e][5],
            };
        }
        printf("%smoe layer: hidden %lld, ffn %lld, %d experts, top-%d, %s weights %.2f GB as "
               "stored (filled in %.2f s)\n",
               fi ? "\n" : "", (long long)H, (long long)F, N_EXPERTS, TOP_K, fmt_name(f),
               (double)N_EXPERTS * expert_bytes(&ex[0]) * 1e-9, (double)(moe_now_ns() - t0) * 1e-9);
        if (fi == 0) {
            printf("times: best of N calls after a warm-up (median in brackets); eff GB/s, "
                   "eff/mem and GFLOP/s from the faster precision\n");
            printf("torch's block: %s\n", torch ? python : "not run");
        }
        for (int a = 0; a < 2; a++) {
            bool has_a8 =
                f->q == MOE_QUANT_INT8 || f->q == MOE_QUANT_INT4 || f->q == MOE_QUANT_MXFP4;

            /* exact: always for the other formats */
            if (a ? !(o.act[1] && has_a8) : !(o.act[0] || !has_a8))
                continue;
            for (int i = 0; i < o.n_threads; i++)
                if (bench_threads(&o, ex, H, bw_buf, bw_bytes, o.threads[i], torch ? python : NULL,
                                  a == 1) < 0)
                    goto out;
        }
        for (int e = 0; e < N_EXPERTS; e++)
            for (int m = 0; m < 6; m++) {
                be->ops->mem_free(be, mats[e][m]);
                mats[e][m] = NULL;
            }
    }
    printf("\ntotal %.1f s\n", (double)(moe_now_ns() - t_start) * 1e-9);
    r = 0;
out:
    for (int e = 0; e < N_EXPERTS; e++)
        for (int m = 0; m < 6; m++)
            be->ops->mem_free(be, mats[e][m]);
    be->ops->mem_free(be, bw_buf);
    moe_threadpool_free(pool);
    moe_backend_free(be);
    free(table_in);
    free(table_f);
    return r;
}
