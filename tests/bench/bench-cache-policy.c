/*
 * Benchmark of the expert cache's replacement policies on routing traces:
 * for two synthetic models shaped like Mixtral (32 MoE layers, 8 experts,
 * top-2) and DeepSeek-V3 (61 layers, the first 3 dense, 256 routed experts,
 * top-8 in 4 of 8 groups, one shared expert), with a small hidden size (only
 * the routers matter) and tiny experts, a trace of a synthetic token stream
 * routed by the models' real routers (moe_trace_generate, as `moectl
 * gen-trace`), replayed through the cache in simulation (moe_trace_replay,
 * as `moectl cache-sim`) with 25%, 50% and 75% of the routed experts
 * resident.  For each size: the hit rate of lru, freq, routing,
 * routing+prefetch, adaptive and adaptive+prefetch next to Belady's optimum
 * (moe_trace_belady), the ratio to it, the share of LRU's gap to it each
 * policy closes, and the time steps stall for their experts per token: the
 * replay's disk and compute model with its defaults (moe_trace_timing_default:
 * 4.5 GB/s, 1.7 ms a read, compute at 40 GB/s of expert bytes), for experts
 * of the real models' size (Mixtral's 352 MB in bf16, DeepSeek-V3's 44 MB in
 * fp8), since the benchmark's own experts are tiny.
 *
 * Target, for moed's default (adaptive, prefetch on): adaptive hits no less
 * than LRU at every size; with prefetch it beats LRU and closes at least
 * half of LRU's gap to Belady, and stalls less than without prefetch; the
 * last lines say whether it does.
 *
 * Usage: bench-cache-policy [--quick] [--tokens N] [--seed S] [--keep DIR]
 * --quick: few tokens and fewer layers, a few seconds (ctest's smoke test);
 * --tokens: tokens of both traces (default 2000 Mixtral, 1000 DeepSeek);
 * --keep DIR: write the models and traces there and leave them.
 */
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backend.h"
#include "cache.h"
#include "common.h"
#include "dtype.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "router.h"
#include "safetensors.h"
#include "st_writer.h"
#include "trace.h"

#define N_SIZES 3
#define N_RUNS 6

struct shape {
    const char *name;
    enum moe_arch arch;
    int layers, quick_layers;
    int first_dense; /* dense layers before the first MoE one */
    int experts, top_k, n_shared;
    int hidden, ffn;
    int tokens, quick_tokens;
    uint64_t real_expert_bytes; /* the real model's expert, for the stall column */
};

static const struct shape shapes[] = {
    /* 3 x 4096 x 14336 bf16; 3 x 7168 x 2048 fp8 */
    {"mixtral-like", MOE_ARCH_MIXTRAL, 32, 8, 0, 8, 2, 0, 256, 16, 2000, 200, 352321536},
    {"deepseek-v3-like", MOE_ARCH_DEEPSEEK_V3, 61, 11, 3, 256, 8, 1, 256, 8, 1000, 150, 44040192},
};

static const int sizes[N_SIZES] = {25, 50, 75};

static const struct {
    enum moe_cache_policy policy;
    bool prefetch;
    const char *name;
} runs[N_RUNS] = {
    {MOE_POLICY_LRU, false, "lru"},           {MOE_POLICY_FREQ, false, "freq"},
    {MOE_POLICY_ROUTING, false, "routing"},   {MOE_POLICY_ROUTING, true, "routing+prefetch"},
    {MOE_POLICY_ADAPTIVE, false, "adaptive"}, {MOE_POLICY_ADAPTIVE, true, "adaptive+prefetch"},
};

/* moed's default: the policy the targets are about. */
#define DEFAULT_POLICY MOE_POLICY_ADAPTIVE

struct opts {
    bool quick;
    int tokens; /* 0: the shape's */
    uint64_t seed;
    const char *keep;
};

static void usage(void)
{
    fprintf(stderr, "usage: bench-cache-policy [--quick] [--tokens N] [--seed S] [--keep DIR]\n");
    exit(2);
}

/* snprintf into a path buffer; exits when it does not fit. */
static void __attribute__((format(printf, 3, 4)))
path_fmt(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= len) {
        fprintf(stderr, "path too long: %s...\n", buf);
        exit(1);
    }
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

#define BAL_SAMPLES 512
#define BAL_ROUNDS 60

/*
 * DeepSeek-V3 keeps its experts' loads even with e_score_correction_bias,
 * tuned in training (auxiliary-loss-free balancing: an overloaded expert's
 * bias goes down, an underloaded one's up).  genmodel's biases are random
 * and its skewed routers leave about half of 256 experts unused.  This tunes
 * the biases of one layer the same way on BAL_SAMPLES unit-variance inputs
 * (the router's scores keep their skew, so tokens still prefer some
 * experts).  bias: [n_experts], in and out.
 */
static int balance_bias(const struct moe_model *m, const struct moe_layer *ly, int layer,
                        float *bias, struct moe_error *err)
{
    const int E = m->cfg.n_experts, H = m->cfg.hidden, K = m->cfg.top_k, N = BAL_SAMPLES;
    const size_t eh = (size_t)E * H;
    struct moe_router_params p;
    void *raw = malloc(ly->router.nbytes);
    float *w = malloc(eh * sizeof(float)), *x = malloc((size_t)N * H * sizeof(float));
    float *logits = malloc((size_t)N * E * sizeof(float)), *wts = malloc((size_t)N * K * 4);
    int32_t *ids = malloc((size_t)N * K * sizeof(int32_t));
    int *load = malloc((size_t)E * sizeof(int));
    uint64_t sm = 0x5eed0000ull + (uint64_t)layer;
    int r;

    if (!raw || !w || !x || !logits || !wts || !ids || !load) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    r = moe_model_read(m, &ly->router, raw, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < eh; i++) {
        if (ly->router.dtype == MOE_DTYPE_F32)
            w[i] = ((const float *)raw)[i];
        else if (ly->router.dtype == MOE_DTYPE_BF16)
            w[i] = moe_bf16_to_f32(((const uint16_t *)raw)[i]);
        else
            w[i] = moe_f16_to_f32(((const uint16_t *)raw)[i]);
    }
    /* Uniform in [-sqrt(3), sqrt(3)): variance 1 (splitmix64). */
    for (size_t i = 0; i < (size_t)N * H; i++) {
        uint64_t z = (sm += 0x9e3779b97f4a7c15ull);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        x[i] = (float)(((double)(z >> 11) * 0x1p-53 - 0.5) * 3.4641016151377544);
    }
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            const float *a = x + (size_t)n * H, *b = w + (size_t)e * H;
            float acc = 0;

            for (int h = 0; h < H; h++)
                acc += a[h] * b[h];
            logits[(size_t)n * E + e] = acc;
        }
    moe_model_router_params(m, bias, &p);
    for (int round = 0; round < BAL_ROUNDS; round++) {
        const double target = (double)N * K / E;
        /* Steps from 0.05 down to 0.002 of a sigmoid score. */
        const double step = 0.05 * pow(0.04, (double)round / (BAL_ROUNDS - 1));

        r = moe_route(&p, logits, N, ids, wts, err);
        if (r < 0)
            goto out;
        memset(load, 0, (size_t)E * sizeof(int));
        for (int i = 0; i < N * K; i++)
            load[ids[i]]++;
        for (int e = 0; e < E; e++)
            bias[e] += (float)(step * (target - load[e]) / target);
    }
    r = 0;
out:
    free(raw);
    free(w);
    free(x);
    free(logits);
    free(wts);
    free(ids);
    free(load);
    return r;
}

/*
 * genmodel makes only layer 0 of a DeepSeek model dense; DeepSeek-V3 has
 * three.  Copies src's MoE tensors of layers >= first_dense to dst (one
 * model.safetensors) with config.json's first_k_dense_replace set: the
 * other tensors (attention, norms, dense MLPs) are not read by moed.  The
 * selection biases are balanced on the way (balance_bias).
 */
static int make_dense(const char *src, const char *dst, int first_dense, struct moe_error *err)
{
    struct moe_model *m = NULL;
    struct moe_st_writer *w = NULL;
    json_t *cfg = NULL;
    const struct moe_tensor_ref **refs = NULL;
    int *ndim = NULL, *bias_layer = NULL;
    size_t n = 0, cap = 0;
    char path[4096], *text = NULL, *buf = NULL;
    size_t len;
    int r;

    r = moe_model_open(src, &m, err);
    if (r < 0)
        return r;
    path_fmt(path, sizeof(path), "%s/config.json", src);
    r = moe_read_file(path, 1 << 20, &text, &len, err);
    if (r < 0)
        goto out;
    cfg = json_loadb(text, len, 0, NULL);
    if (!cfg || json_object_set_new(cfg, "first_k_dense_replace", json_integer(first_dense))) {
        r = moe_error_set(err, -EINVAL, "%s: cannot edit", path);
        goto out;
    }
    if (mkdir(dst, 0755) < 0 && errno != EEXIST) {
        r = moe_error_set(err, -errno, "%s: cannot create", dst);
        goto out;
    }
    path_fmt(path, sizeof(path), "%s/config.json", dst);
    if (json_dump_file(cfg, path, JSON_INDENT(2) | JSON_SORT_KEYS) < 0) {
        r = moe_error_set(err, -EIO, "%s: cannot write", path);
        goto out;
    }
    /* The tensors to copy, in model order. */
    for (int l = first_dense; l < m->cfg.n_layers; l++) {
        const struct moe_layer *ly = &m->layers[l];

        if (!ly->is_moe)
            continue;
        if (n + 5 + 3 * (size_t)m->cfg.n_experts > cap) {
            cap = 2 * (n + 5 + 3 * (size_t)m->cfg.n_experts);
            refs = realloc(refs, cap * sizeof(*refs));
            ndim = realloc(ndim, cap * sizeof(*ndim));
            bias_layer = realloc(bias_layer, cap * sizeof(*bias_layer));
            if (!refs || !ndim || !bias_layer) {
                r = moe_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
        }
        ndim[n] = 2;
        refs[n++] = &ly->router;
        if (ly->has_bias) {
            ndim[n] = 1;
            bias_layer[n] = l;
            refs[n++] = &ly->bias;
        }
        for (int e = 0; e < m->cfg.n_experts; e++) {
            ndim[n] = ndim[n + 1] = ndim[n + 2] = 2;
            refs[n++] = &ly->experts[e].gate;
            refs[n++] = &ly->experts[e].up;
            refs[n++] = &ly->experts[e].down;
        }
        if (ly->has_shared) {
            ndim[n] = ndim[n + 1] = ndim[n + 2] = 2;
            refs[n++] = &ly->shared.gate;
            refs[n++] = &ly->shared.up;
            refs[n++] = &ly->shared.down;
        }
    }
    path_fmt(path, sizeof(path), "%s/model.safetensors", dst);
    r = moe_st_writer_init(path, &w, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        int64_t shape[2] = {refs[i]->rows, refs[i]->cols};

        if (ndim[i] == 1)
            shape[0] = refs[i]->cols;
        r = moe_st_writer_add(w, refs[i]->name, refs[i]->dtype, ndim[i], shape, err);
        if (r < 0)
            goto out;
    }
    r = moe_st_writer_begin(w, err);
    for (size_t i = 0; r == 0 && i < n; i++) {
        char *nb = realloc(buf, refs[i]->nbytes ? refs[i]->nbytes : 1);

        if (!nb) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            break;
        }
        buf = nb;
        r = moe_model_read(m, refs[i], buf, err);
        if (r == 0 && refs[i] == &m->layers[bias_layer[i]].bias)
            r = balance_bias(m, &m->layers[bias_layer[i]], bias_layer[i], (float *)buf, err);
        if (r == 0)
            r = moe_st_writer_write(w, buf, refs[i]->nbytes, err);
    }
    if (r == 0)
        r = moe_st_writer_finish(w, err);
out:
    moe_st_writer_free(w);
    moe_model_free(m);
    json_decref(cfg);
    free(text);
    free(buf);
    free(refs);
    free(ndim);
    free(bias_layer);
    return r;
}

/* Writes the model of sh under dir/name; path of its directory in out. */
static int make_model(const struct shape *sh, const struct opts *o, const char *dir, char *out,
                      size_t len, struct moe_error *err)
{
    struct moe_genmodel_opts g;
    char gen[4096];
    int r;

    moe_genmodel_defaults(sh->arch, &g);
    path_fmt(gen, sizeof(gen), "%s/%s%s", dir, sh->name, sh->first_dense > 1 ? "-gen" : "");
    g.out_dir = gen;
    g.n_layers = o->quick ? sh->quick_layers : sh->layers;
    g.n_experts = sh->experts;
    g.top_k = sh->top_k;
    g.hidden = sh->hidden;
    g.ffn = sh->ffn;
    g.n_shared = sh->n_shared;
    g.seed = o->seed;
    r = moe_genmodel_write(&g, err);
    if (r < 0)
        return r;
    if (sh->first_dense <= 1) {
        path_fmt(out, len, "%s", gen);
        return 0;
    }
    path_fmt(out, len, "%s/%s", dir, sh->name);
    r = make_dense(gen, out, sh->first_dense, err);
    nftw(gen, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return r;
}

/* Routes the stream through the model in model_dir into path. */
static int make_trace(const char *model_dir, const char *name, int tokens, uint64_t seed,
                      const char *path, struct moe_error *err)
{
    struct moe_cpu_config cpu = {0};
    struct moe_model *m = NULL;
    struct moe_backend *b = NULL;
    struct moe_engine *e = NULL;
    struct moe_trace_writer *w = NULL;
    struct moe_trace_info info;
    int r;

    r = moe_model_open(model_dir, &m, err);
    if (r < 0)
        return r;
    r = moe_backend_cpu_init(&cpu, &b, err);
    if (r < 0)
        goto out;
    r = moe_engine_init(m, b, &e);
    if (r < 0) {
        moe_error_set(err, r, "cannot create the engine");
        goto out;
    }
    moe_trace_info_from_model(m, name, &info);
    r = moe_trace_writer_open(path, &info, &w, err);
    if (r < 0)
        goto out;
    r = moe_trace_generate(e, m, tokens, seed, 1, w, err);
    if (r < 0) {
        moe_trace_writer_close(w, NULL);
        goto out;
    }
    r = moe_trace_writer_close(w, err);
out:
    moe_engine_free(e);
    moe_backend_free(b);
    moe_model_free(m);
    return r;
}

static double rate(uint64_t hits, uint64_t accesses)
{
    return accesses ? (double)hits / (double)accesses : 0.0;
}

/* Runs one shape; *ret_ok: routing+prefetch met the target at every size. */
static int bench_shape(const struct shape *sh, const struct opts *o, const char *dir, bool *ret_ok)
{
    const int tokens = o->tokens ? o->tokens : o->quick ? sh->quick_tokens : sh->tokens;
    struct moe_cache_config cfg = {0};
    struct moe_trace_timing tm;
    struct moe_trace_summary sum;
    struct moe_error err = {0};
    struct moe_trace *t = NULL;
    char model[4096], path[4096];
    uint64_t t0, total;
    double gen_s, trace_s, sim_s = 0;
    int r, beats = 0, closes = 0, moot = 0, faster = 0, not_below = 0;

    t0 = moe_now_ns();
    r = make_model(sh, o, dir, model, sizeof(model), &err);
    if (r < 0) {
        fprintf(stderr, "%s: making the model: %s\n", sh->name, err.msg);
        return r;
    }
    gen_s = (double)(moe_now_ns() - t0) / 1e9;
    path_fmt(path, sizeof(path), "%s/%s.trace", dir, sh->name);
    t0 = moe_now_ns();
    r = make_trace(model, sh->name, tokens, o->seed, path, &err);
    if (r < 0) {
        fprintf(stderr, "%s: making the trace: %s\n", sh->name, err.msg);
        return r;
    }
    trace_s = (double)(moe_now_ns() - t0) / 1e9;
    r = moe_trace_read(path, &t, &err);
    if (r < 0 || (r = moe_trace_summarize(t, &sum)) < 0) {
        fprintf(stderr, "%s: %s\n", sh->name, r == -ENOMEM ? "out of memory" : err.msg);
        moe_trace_free(t);
        return r;
    }
    total = (uint64_t)sum.n_moe_layers * (uint64_t)t->info.n_experts;
    printf("%s: %d layers (%d MoE) x %d experts, top-%d; %d tokens: %" PRIu64 " steps, %" PRIu64
           " accesses, %" PRIu64 " of the %" PRIu64 " routed experts used (model %.1f s, trace "
           "%.1f s)\n",
           sh->name, t->info.n_layers, sum.n_moe_layers, t->info.n_experts, t->info.top_k, tokens,
           sum.n_steps, sum.accesses, sum.distinct, total, gen_s, trace_s);
    moe_trace_timing_default(&tm);
    tm.expert_bytes = sh->real_expert_bytes;
    printf("  %-9s %-8s %-18s %9s %9s %12s %11s\n", "resident", "belady", "policy", "hit rate",
           "x belady", "gap closed", "stall/tok");
    for (int s = 0; s < N_SIZES; s++) {
        const uint64_t cap = MOE_MAX(total * (uint64_t)sizes[s] / 100, sum.max_step);
        struct moe_belady_result bel;
        double bel_rate, lru_rate = 0, plain_stall = 0;
        char res[32], br[32];

        r = moe_trace_belady(t, cap, &bel, &err);
        if (r < 0) {
            fprintf(stderr, "%s: belady: %s\n", sh->name, err.msg);
            goto out;
        }
        bel_rate = rate(bel.hits, bel.accesses);
        snprintf(res, sizeof(res), "%d%% %" PRIu64, sizes[s], cap);
        snprintf(br, sizeof(br), "%.2f%%", 100.0 * bel_rate);
        for (int i = 0; i < N_RUNS; i++) {
            struct moe_trace_replay_result x;
            double hr;
            char gap[16] = "-";

            cfg.policy = runs[i].policy;
            cfg.prefetch = runs[i].prefetch;
            t0 = moe_now_ns();
            r = moe_trace_replay(t, cap, &cfg, &tm, &x, &err);
            sim_s += (double)(moe_now_ns() - t0) / 1e9;
            if (r < 0) {
                fprintf(stderr, "%s: %s: %s\n", sh->name, runs[i].name, err.msg);
                goto out;
            }
            hr = rate(x.hits, x.accesses);
            if (i == 0)
                lru_rate = hr;
            else if (bel_rate > lru_rate)
                snprintf(gap, sizeof(gap), "%.0f%%",
                         100.0 * (hr - lru_rate) / (bel_rate - lru_rate));
            if (runs[i].policy == DEFAULT_POLICY && !runs[i].prefetch) {
                plain_stall = x.stall;
                not_below += hr >= lru_rate;
            }
            if (runs[i].policy == DEFAULT_POLICY && runs[i].prefetch) {
                /* LRU at the optimum already (everything used fits): nothing
                 * to beat or close. */
                if (bel_rate <= lru_rate) {
                    moot++;
                } else {
                    beats += hr > lru_rate;
                    closes += (hr - lru_rate) >= 0.5 * (bel_rate - lru_rate);
                    faster += x.stall < plain_stall;
                }
            }
            printf("  %-9s %-8s %-18s %8.2f%% %9.3f %12s %8.1f ms\n", i == 0 ? res : "",
                   i == 0 ? br : "", runs[i].name, 100.0 * hr, bel_rate > 0 ? hr / bel_rate : 0.0,
                   gap, x.tokens ? 1e3 * x.stall / (double)x.tokens : 0.0);
        }
    }
    *ret_ok = beats == N_SIZES - moot && closes == N_SIZES - moot && faster == N_SIZES - moot &&
              not_below == N_SIZES;
    printf("  adaptive (moed's default) hits no less than lru at %d of %d sizes; with prefetch "
           "it beats lru at %d of %d, closes >= half of lru's gap to belady at %d of %d, stalls "
           "less than without at %d of %d%s: %s  (replays %.1f s)\n",
           not_below, N_SIZES, beats, N_SIZES - moot, closes, N_SIZES - moot, faster,
           N_SIZES - moot, moot ? " (the others: lru is optimal already)" : "",
           *ret_ok ? "target met" : "TARGET MISSED", sim_s);
    r = 0;
out:
    moe_trace_free(t);
    return r;
}

int main(int argc, char **argv)
{
    struct opts o = {.seed = 1};
    char dir[4096];
    bool all_ok = true;
    int r = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            o.quick = true;
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            o.tokens = atoi(argv[++i]);
            if (o.tokens < 1 || o.tokens > 10000000)
                usage();
        } else if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
            o.seed = strtoull(argv[++i], NULL, 0);
        } else if (!strcmp(argv[i], "--keep") && i + 1 < argc) {
            o.keep = argv[++i];
        } else {
            usage();
        }
    }
    if (o.keep) {
        path_fmt(dir, sizeof(dir), "%s", o.keep);
        if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
            perror(dir);
            return 1;
        }
    } else {
        const char *base = getenv("TMPDIR");

        path_fmt(dir, sizeof(dir), "%s/moed-bench-cache-XXXXXX", base && *base ? base : "/tmp");
        if (!mkdtemp(dir)) {
            perror(dir);
            return 1;
        }
    }
    printf("cache policies on synthetic routing traces (seed %" PRIu64 "%s)\n"
           "hit rates of the distinct experts of each step; belady: Belady's MIN, the optimum "
           "of demand paging\n(a policy with prefetch can pass it: its page-ins ahead of use "
           "are not accesses); gap closed:\n(hit rate - lru's) / (belady's - lru's); stall/tok: "
           "the time steps wait for their experts per token,\non one disk of %.1f GB/s and "
           "%.1f ms a read, computing at %.0f GB/s, experts of the real models' size\n",
           o.seed, o.quick ? ", quick" : "", MOE_TRACE_DISK_BW / 1e9, MOE_TRACE_DISK_LATENCY * 1e3,
           MOE_TRACE_COMPUTE_BW / 1e9);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(shapes) && r == 0; i++) {
        bool ok = false;

        r = bench_shape(&shapes[i], &o, dir, &ok);
        all_ok &= ok;
    }
    if (r == 0)
        printf("%s\n", all_ok ? "target met for every model" : "target missed (see above)");
    if (!o.keep)
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    /* A missed target is a result, not a failure of the benchmark. */
    return r < 0 ? 1 : 0;
}
