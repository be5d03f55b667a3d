/*
 * Tests of the CPU backend (engine/cpu/): grouped_ffn and matmul of every
 * kernel variant the CPU has, every weight dtype, odd shapes and token
 * counts and 1-3 threads, against an fp64 reference computed here from the
 * same (rounded) weights, in both compute precisions (exact; bf16, against a
 * reference that rounds as torch's bf16 block does); bit-identical results
 * for any thread count, and a token's result the same alone as in a batch;
 * argument checking; kernel selection and listing.  Variants the CPU lacks
 * are skipped with a message.  gpt-oss's experts (biases, clamped SwiGLU)
 * take the same checks.
 *
 * "onednn" (built with oneDNN only, else skipped with the reason) runs
 * every case too, with MOE_ONEDNN_MIN_TOKENS=1 so that oneDNN computes
 * every bf16-weight, compute_precision bf16 work item, down to one token;
 * the other work items take moed's kernels under it.  That oneDNN really
 * ran is checked: its bf16 results must differ in some bits from the
 * generic kernel's (other summation order), while staying as close to the
 * fp64 reference as every kernel must.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "dtype.h"
#include "tests.h"

static const char *const kernel_names[] = {"generic", "avx2", "avx512", "amx", "onednn"};
static const int thread_counts[] = {1, 2, 3};
static const enum moe_dtype dtypes[] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};

#define N_KERNELS 5
#define K_ONEDNN 4
#define N_THREADS 3

/* backends[kernel][threads], NULL where the CPU lacks the kernel */
static struct moe_backend *backends[N_KERNELS][N_THREADS];
/* worst relative L2 error seen, per kernel, precision and dtype (grouped_ffn) */
static double worst[N_KERNELS][2][3];
/* bf16 cases where onednn's bits differ from generic's, and all compared */
static int onednn_differs, onednn_compared;

/*
 * Exact: fp32 sums of fp32-accurate products.  bf16: the intermediate is
 * rounded to bf16 both here and in the backend, from sums that differ in
 * the last fp32 bits, so now and then one element rounds the other way (one
 * bf16 step, 2^-8); 5e-4 allows that and is still well under what skipping
 * one of the roundings costs (about 2e-3, checked below).
 */
static double tolerance(enum moe_dtype dt, enum moe_compute_precision prec)
{
    if (prec == MOE_PRECISION_BF16)
        return 2e-4;
    return dt == MOE_DTYPE_F32 ? 1e-5 : 1e-4;
}

static const char *const prec_names[] = {"exact", "bf16"};

static double round_bf16(double v)
{
    return moe_bf16_to_f32(moe_f32_to_bf16((float)v));
}

/* ---- weights ------------------------------------------------------------------ */

/* A matrix in its stored dtype and decoded exactly to double. */
struct matrix {
    void *data;  /* rows * cols of dtype, 64-byte aligned */
    double *ref; /* the same values as doubles */
};

static void matrix_init(struct matrix *m, enum moe_dtype dt, int64_t rows, int64_t cols,
                        double scale, uint64_t *seed)
{
    size_t n = (size_t)rows * cols;

    m->data = moe_alloc_aligned(n * moe_dtype_size(dt));
    m->ref = malloc(n * sizeof(double));
    ASSERT_TRUE(m->data && m->ref);
    for (size_t i = 0; i < n; i++) {
        float v = (float)(test_rand_f32(seed) * scale);

        switch (dt) {
        case MOE_DTYPE_BF16: {
            uint16_t h = moe_f32_to_bf16(v);

            ((uint16_t *)m->data)[i] = h;
            m->ref[i] = moe_bf16_to_f32(h);
            break;
        }
        case MOE_DTYPE_F16: {
            uint16_t h = moe_f32_to_f16(v);

            ((uint16_t *)m->data)[i] = h;
            m->ref[i] = moe_f16_to_f32(h);
            break;
        }
        default:
            ((float *)m->data)[i] = v;
            m->ref[i] = v;
            break;
        }
    }
}

static void matrix_free(struct matrix *m)
{
    moe_free_aligned(m->data);
    free(m->ref);
}

struct expert {
    struct moe_expert_weights w;
    struct matrix gate, up, down;
    float *bias; /* gpt-oss: gate [F], up [F], down [H] biases, or NULL */
};

/* gpt-oss's activation parameters in these tests: a limit that x's scale
 * crosses often (the release's 7 would hardly ever clamp), an alpha of our
 * own. */
#define GPT_ALPHA 1.3f
#define GPT_LIMIT 0.6f

/* Gives e gpt-oss's biases and clamped SwiGLU. */
static void expert_gpt_oss(struct expert *e, uint64_t *seed)
{
    int64_t F = e->w.ffn, H = e->w.hidden;

    e->bias = moe_alloc_aligned((size_t)(2 * F + H) * sizeof(float));
    ASSERT_TRUE(e->bias != NULL);
    for (int64_t i = 0; i < 2 * F + H; i++)
        e->bias[i] = 0.3f * test_rand_f32(seed);
    e->w.gate_bias = e->bias;
    e->w.up_bias = e->bias + F;
    e->w.down_bias = e->bias + 2 * F;
    e->w.act = MOE_ACT_SWIGLU_CLAMP;
    e->w.alpha = GPT_ALPHA;
    e->w.limit = GPT_LIMIT;
}

static void expert_init(struct expert *e, enum moe_dtype dt, int64_t hidden, int64_t ffn,
                        uint64_t *seed)
{
    e->bias = NULL;
    matrix_init(&e->gate, dt, ffn, hidden, 2.0 / sqrt((double)hidden), seed);
    matrix_init(&e->up, dt, ffn, hidden, 2.0 / sqrt((double)hidden), seed);
    matrix_init(&e->down, dt, hidden, ffn, 2.0 / sqrt((double)ffn), seed);
    e->w = (struct moe_expert_weights){
        .dtype = dt,
        .hidden = hidden,
        .ffn = ffn,
        .gate = e->gate.data,
        .up = e->up.data,
        .down = e->down.data,
    };
}

static void expert_free(struct expert *e)
{
    matrix_free(&e->gate);
    matrix_free(&e->up);
    matrix_free(&e->down);
    moe_free_aligned(e->bias);
}

/* ---- the fp64 reference ----------------------------------------------------------- */

/* Knobs that break the reference on purpose, to see the comparison fail. */
struct ref_bug {
    int skip_last_k;     /* ignore the last hidden column of gate */
    double scale_factor; /* multiply the first assignment's scale (1 = none) */
    int no_round;        /* bf16: 1 skips rounding x, 2 the intermediate */
    int no_clamp;        /* gpt-oss: 1 skips the clamp of gate, 2 of up */
    int no_bias;         /* gpt-oss: 1 skips the gate/up biases, 2 the down bias */
};

/* gpt-oss's clamped SwiGLU of g and u, in double; ra: every step rounded to
 * bf16 as torch's bf16 GptOssExperts computes it. */
static double clamp_act(double g, double u, bool ra, const struct ref_bug *bug)
{
    double a = ra ? round_bf16(GPT_ALPHA) : GPT_ALPHA, lim = ra ? round_bf16(GPT_LIMIT) : GPT_LIMIT;
    double gc = bug && bug->no_clamp == 1 ? g : fmin(g, lim);
    double uc = bug && bug->no_clamp == 2 ? u : fmax(fmin(u, lim), -lim);

    if (!ra)
        return (uc + 1.0) * (gc / (1.0 + exp(-a * gc)));
    {
        double z = round_bf16(gc * a), sg = round_bf16(1.0 / (1.0 + exp(-z)));

        return round_bf16(round_bf16(uc + 1.0) * round_bf16(gc * sg));
    }
}

/*
 * out[t, :] += s * down(silu(gate x[t]) * up x[t]) for every work item; for
 * a bf16 item x, gate x, up x, silu(gate x) and the product are rounded to
 * bf16 on the way, as torch computes a bf16 MixtralBlockSparseTop2MLP.
 */
static void ref_ffn(const struct expert *ex, const double *x, int64_t H,
                    const struct moe_ffn_work *work, const int *work_expert, int n_work,
                    double *out, const struct ref_bug *bug)
{
    bool first = true;
    double *xr = malloc((size_t)H * sizeof(double));

    ASSERT_TRUE(xr != NULL);
    for (int i = 0; i < n_work; i++) {
        const struct expert *e = &ex[work_expert[i]];
        int64_t F = e->w.ffn;
        double *act = malloc((size_t)F * sizeof(double));
        bool b16 = work[i].precision == MOE_PRECISION_BF16;
        bool rx = b16 && !(bug && bug->no_round == 1);
        bool ra = b16 && !(bug && bug->no_round == 2);

        ASSERT_TRUE(act != NULL);
        for (int j = 0; j < work[i].n_tokens; j++) {
            const double *xt = x + (size_t)work[i].tokens[j] * H;

            if (rx) {
                for (int64_t k = 0; k < H; k++)
                    xr[k] = round_bf16(xt[k]);
                xt = xr;
            }
            double *o = out + (size_t)work[i].tokens[j] * H;
            double s = work[i].scales[j];

            if (bug && first)
                s *= bug->scale_factor;
            first = false;
            for (int64_t f = 0; f < F; f++) {
                double g = 0, u = 0;
                int64_t kend = bug && bug->skip_last_k ? H - 1 : H;

                for (int64_t k = 0; k < kend; k++)
                    g += e->gate.ref[f * H + k] * xt[k];
                for (int64_t k = 0; k < H; k++)
                    u += e->up.ref[f * H + k] * xt[k];
                if (e->bias && !(bug && bug->no_bias == 1)) {
                    /* torch in bf16: the product rounded, then its sum */
                    g = ra ? round_bf16(round_bf16(g) + e->w.gate_bias[f]) : g + e->w.gate_bias[f];
                    u = ra ? round_bf16(round_bf16(u) + e->w.up_bias[f]) : u + e->w.up_bias[f];
                }
                if (e->w.act == MOE_ACT_SWIGLU_CLAMP) {
                    act[f] = clamp_act(ra ? round_bf16(g) : g, ra ? round_bf16(u) : u, ra, bug);
                } else if (ra) {
                    g = round_bf16(g);
                    act[f] = round_bf16(round_bf16(g / (1.0 + exp(-g))) * round_bf16(u));
                } else {
                    act[f] = g / (1.0 + exp(-g)) * u;
                }
            }
            for (int64_t h = 0; h < H; h++) {
                double d = 0;

                for (int64_t f = 0; f < F; f++)
                    d += e->down.ref[h * F + f] * act[f];
                if (e->bias && !(bug && bug->no_bias == 2))
                    d += e->w.down_bias[h];
                o[h] += s * d;
            }
        }
        free(act);
    }
    free(xr);
}

/* ---- grouped FFN cases ----------------------------------------------------------- */

struct ffn_case {
    int64_t hidden, ffn;
    int n_tokens;
    enum moe_compute_precision prec;
    bool gpt_oss; /* experts with biases and the clamped SwiGLU */
};

#define N_EXPERTS 4
#define TOP_K 2

/*
 * One routed batch: N_EXPERTS experts (the last one with a different ffn
 * size), each token sent to TOP_K distinct experts with random scales, work
 * items in a scrambled expert order, one expert left without tokens.
 */
struct batch {
    struct expert ex[N_EXPERTS];
    float *x, *out0; /* [n_tokens, hidden] input, initial output */
    double *xd;
    struct moe_ffn_work work[N_EXPERTS];
    int work_expert[N_EXPERTS];
    int32_t *tokens[N_EXPERTS];
    float *scales[N_EXPERTS];
    int n_work;
};

static void batch_init(struct batch *b, enum moe_dtype dt, const struct ffn_case *c, uint64_t seed)
{
    int64_t H = c->hidden;
    int T = c->n_tokens;
    static const int order[N_EXPERTS] = {2, 0, 3, 1};

    memset(b, 0, sizeof(*b));
    for (int e = 0; e < N_EXPERTS; e++) {
        expert_init(&b->ex[e], dt, H, e == N_EXPERTS - 1 ? c->ffn + 5 : c->ffn, &seed);
        if (c->gpt_oss)
            expert_gpt_oss(&b->ex[e], &seed);
    }
    b->x = malloc((size_t)T * H * sizeof(float));
    b->out0 = malloc((size_t)T * H * sizeof(float));
    b->xd = malloc((size_t)T * H * sizeof(double));
    ASSERT_TRUE(b->x && b->out0 && b->xd);
    for (size_t i = 0; i < (size_t)T * H; i++) {
        b->x[i] = test_rand_f32(&seed);
        b->xd[i] = b->x[i];
        b->out0[i] = 0.01f * test_rand_f32(&seed);
    }
    for (int e = 0; e < N_EXPERTS; e++) {
        b->tokens[e] = malloc((size_t)T * sizeof(int32_t));
        b->scales[e] = malloc((size_t)T * sizeof(float));
        ASSERT_TRUE(b->tokens[e] && b->scales[e]);
    }
    /* Route: each token to TOP_K distinct experts; with more than 2 tokens
     * expert 1 gets none (an empty work item). */
    int counts[N_EXPERTS] = {0}, pool[N_EXPERTS], np = 0;

    for (int e = 0; e < N_EXPERTS; e++)
        if (T <= 2 || e != 1)
            pool[np++] = e;
    for (int t = 0; t < T; t++) {
        int a = (int)(test_rand_u64(&seed) % (uint64_t)np);
        int pick[TOP_K] = {pool[a],
                           pool[(a + 1 + (int)(test_rand_u64(&seed) % (uint64_t)(np - 1))) % np]};

        for (int k = 0; k < TOP_K; k++) {
            int e = pick[k];

            b->tokens[e][counts[e]] = t;
            b->scales[e][counts[e]] = 0.05f + 0.95f * (0.5f + 0.5f * test_rand_f32(&seed));
            counts[e]++;
        }
    }
    b->n_work = N_EXPERTS;
    for (int i = 0; i < N_EXPERTS; i++) {
        int e = order[i];

        b->work_expert[i] = e;
        b->work[i] = (struct moe_ffn_work){
            .w = &b->ex[e].w,
            .n_tokens = counts[e],
            .tokens = b->tokens[e],
            .scales = b->scales[e],
            .precision = c->prec,
        };
    }
}

static void batch_free(struct batch *b)
{
    for (int e = 0; e < N_EXPERTS; e++) {
        expert_free(&b->ex[e]);
        free(b->tokens[e]);
        free(b->scales[e]);
    }
    free(b->x);
    free(b->out0);
    free(b->xd);
}

static double *batch_ref(const struct batch *b, const struct ffn_case *c, const struct ref_bug *bug)
{
    size_t n = (size_t)c->n_tokens * c->hidden;
    double *ref = malloc(n * sizeof(double));

    ASSERT_TRUE(ref != NULL);
    for (size_t i = 0; i < n; i++)
        ref[i] = b->out0[i];
    ref_ffn(b->ex, b->xd, c->hidden, b->work, b->work_expert, b->n_work, ref, bug);
    return ref;
}

static void run_ffn(struct moe_backend *be, const struct batch *b, const struct ffn_case *c,
                    float *out)
{
    size_t n = (size_t)c->n_tokens * c->hidden;

    memcpy(out, b->out0, n * sizeof(float));
    ASSERT_EQ(be->ops->grouped_ffn(be, b->x, c->hidden, c->n_tokens, b->work, b->n_work, out), 0);
}

/*
 * Each token of the batch computed alone (its work items cut down to it)
 * gives the same bits as in the batch: the kernels' decode and prefill
 * tiles do the same arithmetic, so moed's batching across clients never
 * changes an answer.
 */
static void check_alone(struct moe_backend *be, const struct batch *b, const struct ffn_case *c,
                        const float *batch_out, const char *kname, enum moe_dtype dt)
{
    int64_t H = c->hidden;
    float *out = malloc((size_t)H * sizeof(float));

    ASSERT_TRUE(out != NULL);
    for (int t = 0; t < c->n_tokens; t++) {
        struct moe_ffn_work w[N_EXPERTS];
        int32_t zero = 0;
        float sc[N_EXPERTS];
        int n = 0;

        for (int i = 0; i < b->n_work; i++)
            for (int j = 0; j < b->work[i].n_tokens; j++)
                if (b->work[i].tokens[j] == t) {
                    sc[n] = b->work[i].scales[j];
                    w[n] = b->work[i];
                    w[n].n_tokens = 1;
                    w[n].tokens = &zero;
                    w[n].scales = &sc[n];
                    n++;
                }
        memcpy(out, b->out0 + (size_t)t * H, (size_t)H * sizeof(float));
        ASSERT_EQ(be->ops->grouped_ffn(be, b->x + (size_t)t * H, H, 1, w, n, out), 0);
        if (memcmp(out, batch_out + (size_t)t * H, (size_t)H * sizeof(float)) != 0)
            FAIL("grouped_ffn %s %s %s hidden %lld ffn %lld: token %d of %d alone differs from "
                 "the batch",
                 kname, moe_dtype_user_name(dt), prec_names[c->prec], (long long)H,
                 (long long)c->ffn, t, c->n_tokens);
    }
    free(out);
}

static void test_ffn_case(enum moe_dtype dt, const struct ffn_case *c, bool check_bugs, bool alone)
{
    size_t n = (size_t)c->n_tokens * c->hidden;
    struct batch b;
    double *ref;
    float *out = malloc(n * sizeof(float)), *out1 = malloc(n * sizeof(float));
    float *out_generic = malloc(n * sizeof(float));

    ASSERT_TRUE(out && out1 && out_generic);
    batch_init(&b, dt, c,
               0x1234 + (uint64_t)c->hidden * 7919 + (uint64_t)c->ffn * 31 + c->n_tokens);
    ref = batch_ref(&b, c, NULL);

    for (int k = 0; k < N_KERNELS; k++) {
        for (int ti = 0; ti < N_THREADS; ti++) {
            struct moe_backend *be = backends[k][ti];
            double err;

            if (!be)
                continue;
            run_ffn(be, &b, c, out);
            err = test_rel_l2_f32(out, ref, n);
            worst[k][c->prec][dt] = MOE_MAX(worst[k][c->prec][dt], err);
            if (!(err < tolerance(dt, c->prec)))
                FAIL("grouped_ffn %s %s %s threads %d hidden %lld ffn %lld tokens %d: "
                     "relative L2 error %.3g >= %.3g",
                     kernel_names[k], moe_dtype_user_name(dt), prec_names[c->prec],
                     thread_counts[ti], (long long)c->hidden, (long long)c->ffn, c->n_tokens, err,
                     tolerance(dt, c->prec));
            /* bit-identical for every thread count */
            if (ti == 0)
                memcpy(out1, out, n * sizeof(float));
            if (ti == 0 && k == 0)
                memcpy(out_generic, out, n * sizeof(float));
            if (ti == 0 && k == K_ONEDNN && dt == MOE_DTYPE_BF16 && c->prec == MOE_PRECISION_BF16 &&
                c->hidden >= 17 && c->ffn >= 33) {
                onednn_compared++;
                onednn_differs += memcmp(out, out_generic, n * sizeof(float)) != 0;
            } else if (memcmp(out1, out, n * sizeof(float)) != 0)
                FAIL("grouped_ffn %s %s %s hidden %lld ffn %lld tokens %d: %d threads differ "
                     "from 1 thread",
                     kernel_names[k], moe_dtype_user_name(dt), prec_names[c->prec],
                     (long long)c->hidden, (long long)c->ffn, c->n_tokens, thread_counts[ti]);
            if (alone && ti == 1)
                check_alone(be, &b, c, out, kernel_names[k], dt);
            /* the same call again gives the same bits (scratch reuse) */
            if (ti == N_THREADS - 1) {
                run_ffn(be, &b, c, out);
                ASSERT_TRUE(memcmp(out1, out, n * sizeof(float)) == 0);
            }
        }
    }

    if (check_bugs) {
        /* The comparison must catch real bugs: a reference that is wrong in
         * a small way has to fail it. */
        static const struct ref_bug bugs[] = {
            {.skip_last_k = 1, .scale_factor = 1.0}, {.skip_last_k = 0, .scale_factor = 1.2},
            {.scale_factor = 1.0, .no_round = 1},    {.scale_factor = 1.0, .no_round = 2},
            {.scale_factor = 1.0, .no_clamp = 1},    {.scale_factor = 1.0, .no_clamp = 2},
            {.scale_factor = 1.0, .no_bias = 1},     {.scale_factor = 1.0, .no_bias = 2},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(bugs); i++) {
            double *bad;
            double err;

            if (bugs[i].no_round && c->prec != MOE_PRECISION_BF16)
                continue;
            if ((bugs[i].no_clamp || bugs[i].no_bias) && !c->gpt_oss)
                continue;
            bad = batch_ref(&b, c, &bugs[i]);
            err = test_rel_l2_f32(out1, bad, n);
            if (!(err > 3 * tolerance(dt, c->prec)))
                FAIL("a deliberately wrong reference (bug %zu, %s) passed: error %.3g", i,
                     prec_names[c->prec], err);
            free(bad);
        }
    }
    free(ref);
    free(out);
    free(out1);
    free(out_generic);
    batch_free(&b);
}

static void test_ffn(void)
{
    static const int64_t hiddens[] = {1, 17, 100, 256};
    static const int64_t ffns[] = {1, 33, 300};
    static const int small_tokens[] = {1, 2, 7, 64};
    /* 300 tokens for a few shapes; K longer than one kernel K block */
    static const struct ffn_case big[] = {
        {256, 300, 300, 0, false}, {100, 33, 300, 0, false},  {17, 1, 300, 0, false},
        {1100, 2100, 1, 0, false}, {1100, 2100, 9, 0, false}, {1030, 64, 40, 0, false},
    };
    static const struct ffn_case gpt[] = {
        {17, 1, 2, 0, false},
        {100, 33, 64, 0, false},
        {256, 300, 7, 0, false},
        {1030, 64, 40, 0, false},
    };
    int n = 0;

    for (int p = 0; p < 2; p++) {
        for (size_t d = 0; d < MOE_ARRAY_SIZE(dtypes); d++) {
            for (size_t h = 0; h < MOE_ARRAY_SIZE(hiddens); h++)
                for (size_t f = 0; f < MOE_ARRAY_SIZE(ffns); f++)
                    for (size_t t = 0; t < MOE_ARRAY_SIZE(small_tokens); t++) {
                        struct ffn_case c = {hiddens[h], ffns[f], small_tokens[t],
                                             (enum moe_compute_precision)p, false};

                        test_ffn_case(dtypes[d], &c, hiddens[h] == 100 && small_tokens[t] == 64,
                                      hiddens[h] == 100 && small_tokens[t] >= 7);
                        n++;
                    }
            for (size_t i = 0; i < MOE_ARRAY_SIZE(big); i++) {
                struct ffn_case c = big[i];

                c.prec = (enum moe_compute_precision)p;
                test_ffn_case(dtypes[d], &c, false, i == MOE_ARRAY_SIZE(big) - 1);
                n++;
            }
            /* gpt-oss's experts: biases and the clamped SwiGLU, odd shapes
             * (vector bodies and tails), decode and prefill. */
            for (size_t i = 0; i < MOE_ARRAY_SIZE(gpt); i++) {
                struct ffn_case c = gpt[i];

                c.prec = (enum moe_compute_precision)p;
                c.gpt_oss = true;
                test_ffn_case(dtypes[d], &c, i == 1, i == 1);
                n++;
            }
        }
    }
    if (backends[K_ONEDNN][0]) {
        /* oneDNN sums in another order than moed's kernels: if it ran, most
         * of these cases differ somewhere */
        printf("onednn: %d of %d bf16 cases differ in some bits from generic\n", onednn_differs,
               onednn_compared);
        ASSERT_TRUE(onednn_compared > 0 && 2 * onednn_differs > onednn_compared);
    }
    printf("grouped_ffn: %d cases ok; worst relative L2 error (bf16 f16 f32 weights):\n", n);
    for (int k = 0; k < N_KERNELS; k++)
        for (int p = 0; p < 2; p++)
            if (backends[k][0])
                printf("  %-8s %-5s %.2g %.2g %.2g\n", kernel_names[k], prec_names[p],
                       worst[k][p][MOE_DTYPE_BF16], worst[k][p][MOE_DTYPE_F16],
                       worst[k][p][MOE_DTYPE_F32]);
}

/*
 * onednn's default threshold: work items under 16 tokens (6 with AMX) keep
 * moed's best kernel (the same bits as amx, avx512 or avx2, where it runs), larger
 * ones take oneDNN (other bits, still within the bf16 tolerance).
 */
static void test_onednn_threshold(void)
{
    struct moe_cpu_config cd = {.n_threads = 2, .kernel = "onednn"};
    struct moe_backend *dn = NULL, *best = NULL;
    struct moe_error err = {0};
    int r = moe_backend_cpu_init(&cd, &dn, &err);

    if (r == -ENOTSUP) {
        printf("onednn threshold: skipped: %s\n", err.msg);
        return;
    }
    ASSERT_EQ(r, 0);
    /* the threshold: 6 tokens where oneDNN runs on AMX, else 16 */
    ASSERT_CONTAINS(moe_backend_cpu_describe(dn),
                    strstr(moe_backend_cpu_describe(dn), "avx512_core_amx")
                        ? "from 6 tokens per expert"
                        : "from 16 tokens per expert");
    {
        /* moed's best kernel here, which onednn runs beside oneDNN */
        struct moe_cpu_kernel_info info[N_KERNELS];
        int nk = MOE_MIN(moe_backend_cpu_kernels(info, N_KERNELS), N_KERNELS);
        const char *name = NULL;

        for (int i = nk - 1; i >= 0; i--)
            if (info[i].available && strcmp(info[i].name, "onednn") != 0)
                name = info[i].name;
        ASSERT_TRUE(name != NULL);
        ASSERT_EQ(moe_backend_cpu_init(&(struct moe_cpu_config){.n_threads = 2, .kernel = name},
                                       &best, &err),
                  0);
    }
    for (int i = 0; i < 2; i++) {
        /* 5 tokens: at most 5 per item, under both thresholds (6 where
         * oneDNN runs on AMX, else 16); 80: about 53 per item.  Hidden
         * 1100 for 80: moed's kernels sum K in blocks of 1024, so even the
         * amx kernel, whose tiles otherwise sum as oneDNN's AMX ones do,
         * differs from oneDNN in some bits. */
        struct ffn_case c = {i ? 1100 : 100, 300, i ? 80 : 5, MOE_PRECISION_BF16, false};
        size_t n = (size_t)c.n_tokens * c.hidden;
        float *o1 = malloc(n * sizeof(float)), *o2 = malloc(n * sizeof(float));
        struct batch b;
        double *ref;

        ASSERT_TRUE(o1 && o2);
        batch_init(&b, MOE_DTYPE_BF16, &c, 77 + (uint64_t)i);
        ref = batch_ref(&b, &c, NULL);
        run_ffn(dn, &b, &c, o1);
        run_ffn(best, &b, &c, o2);
        ASSERT_TRUE(test_rel_l2_f32(o1, ref, n) < tolerance(MOE_DTYPE_BF16, c.prec));
        if (i == 0)
            ASSERT_TRUE(memcmp(o1, o2, n * sizeof(float)) == 0);
        else
            ASSERT_TRUE(memcmp(o1, o2, n * sizeof(float)) != 0);
        free(ref);
        free(o1);
        free(o2);
        batch_free(&b);
    }
    moe_backend_free(dn);
    moe_backend_free(best);
    printf("onednn threshold: decode on moed's kernel, prefill on oneDNN: ok\n");
}

/* ---- matmul ------------------------------------------------------------------------ */

static void test_matmul_case(enum moe_dtype dt, int64_t rows, int64_t cols, int n_tokens)
{
    uint64_t seed = 99 + (uint64_t)rows * 131 + (uint64_t)cols * 7 + (uint64_t)n_tokens;
    struct matrix w;
    size_t ny = (size_t)n_tokens * rows;
    float *x = malloc((size_t)n_tokens * cols * sizeof(float));
    float *y = malloc(ny * sizeof(float)), *y1 = malloc(ny * sizeof(float));
    double *ref = malloc(ny * sizeof(double));

    ASSERT_TRUE(x && y && y1 && ref);
    matrix_init(&w, dt, rows, cols, 1.0, &seed);
    for (size_t i = 0; i < (size_t)n_tokens * cols; i++)
        x[i] = test_rand_f32(&seed);
    for (int t = 0; t < n_tokens; t++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0;

            for (int64_t k = 0; k < cols; k++)
                s += w.ref[r * cols + k] * x[(size_t)t * cols + k];
            ref[(size_t)t * rows + r] = s;
        }

    for (int k = 0; k < N_KERNELS; k++)
        for (int ti = 0; ti < N_THREADS; ti++) {
            struct moe_backend *be = backends[k][ti];
            double err;

            if (!be)
                continue;
            for (size_t i = 0; i < ny; i++)
                y[i] = 12345.0f; /* overwritten, not accumulated */
            ASSERT_EQ(be->ops->matmul(be, w.data, dt, rows, cols, x, n_tokens, y), 0);
            err = test_rel_l2_f32(y, ref, ny);
            if (!(err < tolerance(dt, MOE_PRECISION_EXACT)))
                FAIL("matmul %s %s threads %d rows %lld cols %lld tokens %d: relative L2 "
                     "error %.3g",
                     kernel_names[k], moe_dtype_user_name(dt), thread_counts[ti], (long long)rows,
                     (long long)cols, n_tokens, err);
            if (ti == 0)
                memcpy(y1, y, ny * sizeof(float));
            else
                ASSERT_TRUE(memcmp(y1, y, ny * sizeof(float)) == 0);
        }

    /* a reference off by twice the tolerance in one element fails */
    {
        double norm = 0;

        for (size_t i = 0; i < ny; i++)
            norm += ref[i] * ref[i];
        ref[ny / 2] += 2 * tolerance(dt, MOE_PRECISION_EXACT) * sqrt(norm);
        ASSERT_TRUE(test_rel_l2_f32(y1, ref, ny) > tolerance(dt, MOE_PRECISION_EXACT));
    }

    matrix_free(&w);
    free(x);
    free(y);
    free(y1);
    free(ref);
}

static void test_matmul(void)
{
    static const int64_t rows[] = {1, 5, 8, 33, 100};
    static const int64_t cols[] = {1, 17, 100, 256, 1500};
    static const int tokens[] = {1, 3, 7, 64, 130};
    int n = 0;

    for (size_t d = 0; d < MOE_ARRAY_SIZE(dtypes); d++)
        for (size_t r = 0; r < MOE_ARRAY_SIZE(rows); r++)
            for (size_t c = 0; c < MOE_ARRAY_SIZE(cols); c++)
                for (size_t t = 0; t < MOE_ARRAY_SIZE(tokens); t++) {
                    test_matmul_case(dtypes[d], rows[r], cols[c], tokens[t]);
                    n++;
                }
    printf("matmul: %d cases ok\n", n);
}

/* ---- interface --------------------------------------------------------------------- */

static void test_bad_args(struct moe_backend *be)
{
    uint64_t seed = 5;
    struct expert e;
    float x[2 * 8] = {0}, out[2 * 8] = {0};
    int32_t tok[2] = {0, 1}, bad_tok[1] = {2}, neg_tok[1] = {-1};
    float sc[2] = {1, 1};
    struct moe_ffn_work wk = {.w = &e.w, .n_tokens = 2, .tokens = tok, .scales = sc};
    struct moe_ffn_work bad;
    struct moe_expert_weights ew;

    expert_init(&e, MOE_DTYPE_BF16, 8, 16, &seed);
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &wk, 1, out), 0);
    /* nothing to do */
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 0, &wk, 0, out), 0);
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, NULL, 0, out), 0);
    /* token out of range */
    bad = (struct moe_ffn_work){.w = &e.w, .n_tokens = 1, .tokens = bad_tok, .scales = sc};
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    bad.tokens = neg_tok;
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    /* hidden mismatch */
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 4, 2, &wk, 1, out), -EINVAL);
    /* a dtype the backend cannot compute with */
    ew = e.w;
    ew.dtype = MOE_DTYPE_I32;
    bad = (struct moe_ffn_work){.w = &ew, .n_tokens = 2, .tokens = tok, .scales = sc};
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    /* an unknown activation, and the clamped SwiGLU without its parameters */
    ew = e.w;
    ew.act = (enum moe_activation)7;
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    ew.act = MOE_ACT_SWIGLU_CLAMP;
    ew.alpha = 1.702f;
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    ew.limit = NAN;
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), -EINVAL);
    ew.limit = 7.0f;
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, 2, &bad, 1, out), 0);
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 0, 2, &wk, 1, out), -EINVAL);
    ASSERT_EQ(be->ops->grouped_ffn(be, x, 8, -1, &wk, 1, out), -EINVAL);
    ASSERT_EQ(be->ops->matmul(be, e.w.gate, MOE_DTYPE_U8, 16, 8, x, 2, out), -EINVAL);
    ASSERT_EQ(be->ops->matmul(be, e.w.gate, MOE_DTYPE_BF16, 0, 8, x, 2, out), -EINVAL);
    ASSERT_EQ(be->ops->matmul(be, e.w.gate, MOE_DTYPE_BF16, 16, 8, x, 0, out), 0);
    expert_free(&e);
}

static void test_interface(void)
{
    static const char *const bad_min[] = {"0", "-3", "x", "12q", "99999999999"};
    struct moe_cpu_config cfg = {.n_threads = 2, .kernel = "bogus"};
    struct moe_backend *be = NULL;
    struct moe_error err = {0};
    unsigned char *p, src[100], dst[100];
    int r;

    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "bogus");
    cfg.n_threads = -1;
    cfg.kernel = NULL;
    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, NULL), -EINVAL);

    /* NULL config: defaults */
    ASSERT_EQ(moe_backend_cpu_init(NULL, &be, &err), 0);
    ASSERT_STREQ(be->ops->name, "cpu");
    ASSERT_TRUE(be->ops->host_memory);
    printf("default CPU kernel: %s\n", moe_backend_cpu_kernel(be));
    p = be->ops->alloc(be, 1000);
    ASSERT_TRUE(p != NULL);
    ASSERT_EQ((uintptr_t)p % 64, 0);
    for (int i = 0; i < 100; i++)
        src[i] = (unsigned char)i;
    ASSERT_EQ(be->ops->copy_in(be, p + 3, src, 100), 0);
    ASSERT_EQ(be->ops->copy_out(be, dst, p + 3, 100), 0);
    ASSERT_TRUE(memcmp(src, dst, 100) == 0);
    be->ops->mem_free(be, p);
    be->ops->mem_free(be, NULL);
    test_bad_args(be);
    moe_backend_free(be);
    moe_backend_free(NULL);

    /* MOE_CPU_KERNEL forces the variant when the config does not */
    setenv("MOE_CPU_KERNEL", "generic", 1);
    ASSERT_EQ(moe_backend_cpu_init(NULL, &be, &err), 0);
    ASSERT_STREQ(moe_backend_cpu_kernel(be), "generic");
    moe_backend_free(be);
    setenv("MOE_CPU_KERNEL", "nonsense", 1);
    ASSERT_EQ(moe_backend_cpu_init(NULL, &be, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "MOE_CPU_KERNEL");
    /* the config wins over the environment */
    cfg = (struct moe_cpu_config){.n_threads = 1, .kernel = "generic"};
    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, &err), 0);
    ASSERT_STREQ(moe_backend_cpu_kernel(be), "generic");
    moe_backend_free(be);
    /* MOE_CPU_KERNEL=onednn: built, or refused with the reason */
    setenv("MOE_CPU_KERNEL", "onednn", 1);
    r = moe_backend_cpu_init(NULL, &be, &err);
    if (r == -ENOTSUP) {
        ASSERT_CONTAINS(err.msg, "without oneDNN");
        ASSERT_CONTAINS(err.msg, "MOE_CPU_KERNEL");
    } else {
        ASSERT_EQ(r, 0);
        ASSERT_STREQ(moe_backend_cpu_kernel(be), "onednn");
        moe_backend_free(be);
    }
    unsetenv("MOE_CPU_KERNEL");
    /* the test hook's bad values */
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad_min); i++) {
        setenv("MOE_ONEDNN_MIN_TOKENS", bad_min[i], 1);
        err.msg[0] = '\0';
        ASSERT_EQ(moe_backend_cpu_init(NULL, &be, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "MOE_ONEDNN_MIN_TOKENS");
        ASSERT_CONTAINS(err.msg, bad_min[i]);
    }
    unsetenv("MOE_ONEDNN_MIN_TOKENS");
}

int main(void)
{
    int available = 0;

    test_interface();

    for (int k = 0; k < N_KERNELS; k++) {
        for (int t = 0; t < N_THREADS; t++) {
            struct moe_cpu_config cfg = {.n_threads = thread_counts[t], .kernel = kernel_names[k]};
            struct moe_error err = {0};
            int r;

            /* oneDNN for every bf16 work item, however few its tokens */
            if (k == K_ONEDNN)
                setenv("MOE_ONEDNN_MIN_TOKENS", "1", 1);
            r = moe_backend_cpu_init(&cfg, &backends[k][t], &err);
            unsetenv("MOE_ONEDNN_MIN_TOKENS");

            if (r == -ENOTSUP) {
                if (t == 0)
                    printf("skipping kernel %s: %s\n", kernel_names[k], err.msg);
                backends[k][t] = NULL;
                continue;
            }
            if (r != 0)
                FAIL("moe_backend_cpu_init(%s, %d threads): %d %s", kernel_names[k],
                     thread_counts[t], r, err.msg);
            ASSERT_STREQ(moe_backend_cpu_kernel(backends[k][t]), kernel_names[k]);
            if (k == K_ONEDNN) {
                ASSERT_CONTAINS(moe_backend_cpu_describe(backends[k][t]), "oneDNN");
                if (t == 0)
                    printf("onednn: %s\n", moe_backend_cpu_describe(backends[k][t]));
            }
            available++;
        }
    }
    ASSERT_TRUE(available >= N_THREADS); /* generic at least */

    /* the listing (moectl --kernel) agrees with what init accepts */
    {
        struct moe_cpu_kernel_info info[N_KERNELS + 1];
        int n = moe_backend_cpu_kernels(info, N_KERNELS + 1);

        ASSERT_EQ(n, N_KERNELS);
        ASSERT_STREQ(info[0].name, "onednn");
        for (int i = 0; i < n; i++) {
            int k = -1;

            for (int j = 0; j < N_KERNELS; j++)
                if (!strcmp(info[i].name, kernel_names[j]))
                    k = j;
            ASSERT_TRUE(k >= 0);
            ASSERT_EQ(info[i].available, backends[k][0] != NULL);
            ASSERT_EQ(info[i].available, info[i].missing[0] == '\0');
            printf("kernel %-8s %s%s\n", info[i].name, info[i].available ? "available" : "missing ",
                   info[i].missing);
        }
        ASSERT_STREQ(info[n - 1].name, "generic");
    }

    test_matmul();
    test_ffn();
    test_onednn_threshold();

    for (int k = 0; k < N_KERNELS; k++)
        for (int t = 0; t < N_THREADS; t++)
            moe_backend_free(backends[k][t]);
    printf("cpu backend: ok\n");
    return 0;
}
