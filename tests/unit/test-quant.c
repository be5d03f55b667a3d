/*
 * Tests of quantized weights (engine/quant.c and the CPU backend's
 * quantized kernels): the scalar decoders on every code (FP8 e4m3fn against
 * its definition, e2m1, e8m0), FP8 rounding, int8/int4 quantization error
 * bounds, the scale check; then grouped_ffn on FP8 (128 x 128 blocks, rows
 * and columns not multiples of the block), INT8, INT4 and MXFP4 experts with
 * every kernel variant the CPU has and 1-3 threads, against an fp64
 * reference on the dequantized weights (relative L2 1e-5), bit-identical
 * for any thread count and for a token alone or in a batch; and a
 * reference with one scale wrong fails that check.  FP8 experts'
 * activations (moe_cpu_make_x8) exactly as defined, and the FP8 kernels on
 * tokens of largest |x| from 1e-37 to 1e36 and subnormal weights against
 * fp64, infinities and all-zero rows as in fp32.  int8 activations
 * (moe_cpu_config.act_int8): moe_cpu_prep_a8 against its definition (each
 * value within half a step of the block's scale max |x| / 127, NaN
 * carried), the qdot_a8 kernels of every variant the CPU has against an
 * fp64 reference on the dequantized weights and the dequantized int8
 * activations (1e-5 relative to the sum of |products|), a token alone as
 * in a batch; and grouped_ffn with them against the exact fp64 reference
 * (its error reported, bounded by 2e-2), bit-identical for 1-3 threads.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "cpu/kernels.h"
#include "quant.h"
#include "tests.h"

static const char *const kernel_names[] = {"generic", "avx2", "avx512", "amx"};
static const int thread_counts[] = {1, 2, 3};
#define N_KERNELS 4
#define N_THREADS 3
#define TOL 1e-5

static struct moe_backend *backends[N_KERNELS][N_THREADS];

/* ---- scalar ------------------------------------------------------------------- */

static void test_scalar(void)
{
    /* every e4m3fn code against (-1)^s 2^(e-7) (1 + m/8), subnormals m 2^-9 */
    for (int b = 0; b < 256; b++) {
        int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
        double want = e ? ldexp(1.0 + m / 8.0, e - 7) : m * ldexp(1.0, -9);
        float got = moe_fp8_e4m3_to_f32((uint8_t)b);

        if (s)
            want = -want;
        if ((b & 0x7f) == 0x7f) {
            ASSERT_TRUE(isnan(got));
            continue;
        }
        ASSERT_NEAR(got, want, 0);
        /* and back */
        ASSERT_EQ(moe_f32_to_fp8_e4m3(got), b == 0x80 ? 0x80 : b);
    }
    ASSERT_NEAR(moe_fp8_e4m3_to_f32(0x7e), 448.0, 0);
    ASSERT_EQ(moe_f32_to_fp8_e4m3(1000.0f), 0x7e);
    ASSERT_EQ(moe_f32_to_fp8_e4m3(-1000.0f), 0xfe);
    ASSERT_EQ(moe_f32_to_fp8_e4m3(NAN), 0x7f);
    /* ties to even: 1 + 1/16 lies between 1 (m 0) and 1.125 (m 1) */
    ASSERT_EQ(moe_f32_to_fp8_e4m3(1.0625f), 0x38);
    ASSERT_EQ(moe_f32_to_fp8_e4m3(1.1875f), 0x3a);
    /* the largest subnormal rounds up into the smallest normal */
    ASSERT_EQ(moe_f32_to_fp8_e4m3(0x1p-6f * 0.99f), 0x08);

    static const float e2m1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
    for (unsigned n = 0; n < 16; n++)
        ASSERT_NEAR(moe_e2m1_to_f32(n), n & 8 ? -e2m1[n & 7] : e2m1[n & 7], 0);
    ASSERT_NEAR(moe_e8m0_to_f32(127), 1.0, 0);
    ASSERT_NEAR(moe_e8m0_to_f32(120), 1.0 / 128, 0);
    ASSERT_TRUE(isnan(moe_e8m0_to_f32(255)));

    /* quantizing: each value within half a step of its source, the
     * group's largest exactly at +-qmax */
    uint64_t seed = 7;
    enum { C = 256 };
    float src[C], back[C], sc[C / 32];
    uint8_t q[C];

    for (int i = 0; i < C; i++)
        src[i] = test_rand_f32(&seed) * (1 + i / 64);
    src[40] = 0; /* a zero inside a group */
    for (int qi = 0; qi < 2; qi++) {
        enum moe_quant qt = qi ? MOE_QUANT_INT4 : MOE_QUANT_INT8;
        struct moe_quant_fmt f = {qt, 1, qi ? 32 : 64};
        double qmax = qi ? 7 : 127;

        moe_quant_row(qt, f.bcols, src, C, q, sc);
        moe_quant_dequant_row(&f, q, sc, 1, C, 0, back);
        for (int i = 0; i < C; i++) {
            float s = sc[i / f.bcols];

            if (!(fabs((double)back[i] - src[i]) <= 0.5 * s * (1 + 1e-6)))
                FAIL("%s: element %d: %g back as %g (scale %g)", moe_quant_name(qt), i,
                     (double)src[i], (double)back[i], (double)s);
        }
        for (int g = 0; g < C / f.bcols; g++) {
            double amax = 0;

            for (int i = 0; i < f.bcols; i++)
                amax = fmax(amax, fabs(src[g * f.bcols + i]));
            ASSERT_NEAR(sc[g], amax / qmax, amax / qmax * 1e-6);
        }
    }
    /* an all-zero group: scale 0, values 0 */
    memset(src, 0, sizeof(src));
    moe_quant_row(MOE_QUANT_INT4, 32, src, 64, q, sc);
    ASSERT_NEAR(sc[0], 0, 0);
    ASSERT_EQ(q[0], 0x88);

    /* scale checks name the tensor and the scale */
    struct moe_error err = {0};
    float bad[4] = {1, 2, NAN, 3};
    uint8_t e8[3] = {1, 255, 3};

    ASSERT_EQ(moe_quant_check_scales(MOE_QUANT_FP8, bad, 2, "t", &err), 0);
    ASSERT_EQ(moe_quant_check_scales(MOE_QUANT_FP8, bad, 4, "x.weight_scale_inv", &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "'x.weight_scale_inv': scale 2 is nan");
    bad[2] = INFINITY;
    ASSERT_EQ(moe_quant_check_scales(MOE_QUANT_INT8, bad, 4, "t", &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "inf");
    bad[2] = -1;
    ASSERT_EQ(moe_quant_check_scales(MOE_QUANT_INT4, bad, 4, "t", &err), -EINVAL);
    ASSERT_EQ(moe_quant_check_scales(MOE_QUANT_MXFP4, e8, 3, "b.scales", &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "'b.scales': scale 1 is 255");

    /* names */
    for (int i = 0; i < MOE_QUANT_COUNT; i++) {
        enum moe_quant got;

        ASSERT_EQ(moe_quant_parse(moe_quant_name((enum moe_quant)i), &got), 0);
        ASSERT_EQ(got, i);
    }
    {
        enum moe_quant got;

        ASSERT_EQ(moe_quant_parse("int3", &got), -EINVAL);
    }
    ASSERT_EQ(moe_quant_data_bytes(MOE_QUANT_INT4, 3, 64), 96);
    ASSERT_EQ(moe_quant_data_bytes(MOE_QUANT_FP8, 3, 64), 192);
    {
        struct moe_quant_fmt f = {MOE_QUANT_FP8, 128, 128};

        ASSERT_EQ(moe_quant_scale_bytes(&f, 320, 1088), 3 * 9 * 4);
    }
}

/* ---- grouped FFN ----------------------------------------------------------------- */

/* A quantized matrix: values, scales, and the dequantized doubles. */
struct qmat {
    uint8_t *w;
    uint8_t *s;
    double *ref;
};

static void qmat_init(struct qmat *m, const struct moe_quant_fmt *f, int64_t rows, int64_t cols,
                      uint64_t *seed)
{
    uint64_t nb = moe_quant_data_bytes(f->q, rows, cols), sb = moe_quant_scale_bytes(f, rows, cols);
    size_t ss = moe_quant_scale_size(f->q);
    /* the weights' spread: about 2 / sqrt(cols) */
    double spread = 2.0 / sqrt((double)cols);

    m->w = moe_alloc_aligned(nb);
    m->s = malloc(sb);
    m->ref = malloc((size_t)rows * cols * sizeof(double));
    ASSERT_TRUE(m->w && m->s && m->ref);
    for (uint64_t i = 0; i < nb; i++) {
        uint8_t b = (uint8_t)test_rand_u64(seed);

        if (f->q == MOE_QUANT_FP8 && (b & 0x7f) == 0x7f)
            b ^= 1; /* no NaN weights */
        if (f->q == MOE_QUANT_INT8 && b == 0x80)
            b = 0x81; /* -127, as quantizing makes */
        m->w[i] = b;
    }
    for (uint64_t i = 0; i < sb / ss; i++) {
        /* scales vary by up to 4x from block to block */
        double v = spread * (0.5 + 1.5 * (0.5 + 0.5 * test_rand_f32(seed)));

        switch (f->q) {
        case MOE_QUANT_FP8: {
            float s = (float)(v / 100.0); /* e4m3 values reach 448 */

            memcpy(m->s + 4 * i, &s, 4);
            break;
        }
        case MOE_QUANT_MXFP4:
            m->s[i] = (uint8_t)(127 + (int)floor(log2(v / 3.0)) + (int)(test_rand_u64(seed) % 2));
            break;
        default: {
            float s = (float)(v / (f->q == MOE_QUANT_INT4 ? 4.0 : 70.0));

            memcpy(m->s + 4 * i, &s, 4);
            break;
        }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        moe_quant_dequant_row_f64(f, m->w, m->s, rows, cols, r, m->ref + r * cols);
}

static void qmat_free(struct qmat *m)
{
    moe_free_aligned(m->w);
    free(m->s);
    free(m->ref);
}

#define N_EXP 3

struct qcase {
    struct moe_quant_fmt f;
    int64_t hidden, ffn;
    int n_tokens;
};

struct qbatch {
    struct moe_expert_weights w[N_EXP];
    struct qmat gate[N_EXP], up[N_EXP], down[N_EXP];
    float *x, *out0;
    struct moe_ffn_work work[N_EXP];
    int32_t tokens[N_EXP][64];
    float scales[N_EXP][64];
};

static void qbatch_init(struct qbatch *b, const struct qcase *c, uint64_t seed)
{
    int64_t H = c->hidden, T = c->n_tokens;

    memset(b, 0, sizeof(*b));
    for (int e = 0; e < N_EXP; e++) {
        int64_t F = e == N_EXP - 1 ? c->ffn + 64 : c->ffn;

        qmat_init(&b->gate[e], &c->f, F, H, &seed);
        qmat_init(&b->up[e], &c->f, F, H, &seed);
        qmat_init(&b->down[e], &c->f, H, F, &seed);
        b->w[e] = (struct moe_expert_weights){
            .dtype = moe_quant_value_dtype(c->f.q),
            .hidden = H,
            .ffn = F,
            .gate = b->gate[e].w,
            .up = b->up[e].w,
            .down = b->down[e].w,
            .quant = c->f,
            .gate_s = b->gate[e].s,
            .up_s = b->up[e].s,
            .down_s = b->down[e].s,
        };
    }
    b->x = malloc((size_t)T * H * sizeof(float));
    b->out0 = malloc((size_t)T * H * sizeof(float));
    ASSERT_TRUE(b->x && b->out0 && T <= 64);
    for (int64_t i = 0; i < T * H; i++) {
        b->x[i] = test_rand_f32(&seed);
        b->out0[i] = 0.01f * test_rand_f32(&seed);
    }
    /* token t goes to experts t % 3 and (t + 1) % 3, in scrambled order */
    int n[N_EXP] = {0};
    static const int order[N_EXP] = {2, 0, 1};

    for (int t = 0; t < T; t++)
        for (int k = 0; k < 2; k++) {
            int e = (t + k) % N_EXP;

            b->tokens[e][n[e]] = t;
            b->scales[e][n[e]] = 0.2f + 0.3f * (1.0f + test_rand_f32(&seed));
            n[e]++;
        }
    for (int i = 0; i < N_EXP; i++) {
        int e = order[i];

        b->work[i] = (struct moe_ffn_work){
            .w = &b->w[e], .n_tokens = n[e], .tokens = b->tokens[e], .scales = b->scales[e]};
    }
}

static void qbatch_free(struct qbatch *b)
{
    for (int e = 0; e < N_EXP; e++) {
        qmat_free(&b->gate[e]);
        qmat_free(&b->up[e]);
        qmat_free(&b->down[e]);
    }
    free(b->x);
    free(b->out0);
}

/* fp64 reference; bug_scale != 1 multiplies the first column of scales of
 * expert 0's gate (the weights of its first bcols columns) by it. */
static double *qbatch_ref(const struct qbatch *b, const struct qcase *c, double bug_scale)
{
    int64_t H = c->hidden, T = c->n_tokens;
    double *out = malloc((size_t)T * H * sizeof(double));

    ASSERT_TRUE(out != NULL);
    for (int64_t i = 0; i < T * H; i++)
        out[i] = b->out0[i];
    for (int i = 0; i < N_EXP; i++) {
        const struct moe_ffn_work *wk = &b->work[i];
        int e = (int)(wk->w - b->w);
        int64_t F = wk->w->ffn;
        double *act = malloc((size_t)F * sizeof(double));

        ASSERT_TRUE(act != NULL);
        for (int j = 0; j < wk->n_tokens; j++) {
            const float *xt = b->x + (size_t)wk->tokens[j] * H;

            for (int64_t f = 0; f < F; f++) {
                double g = 0, u = 0;

                for (int64_t k = 0; k < H; k++) {
                    double gw = b->gate[e].ref[f * H + k];

                    if (e == 0 && k < c->f.bcols)
                        gw *= bug_scale;
                    g += gw * xt[k];
                    u += b->up[e].ref[f * H + k] * xt[k];
                }
                act[f] = g / (1.0 + exp(-g)) * u;
            }
            for (int64_t h = 0; h < H; h++) {
                double d = 0;

                for (int64_t f = 0; f < F; f++)
                    d += b->down[e].ref[h * F + f] * act[f];
                out[(size_t)wk->tokens[j] * H + h] += wk->scales[j] * d;
            }
        }
        free(act);
    }
    return out;
}

static void test_ffn_case(const struct qcase *c, double *worst)
{
    struct qbatch b;
    size_t n = (size_t)c->n_tokens * c->hidden;
    float *out = malloc(n * sizeof(float)), *first = malloc(n * sizeof(float));
    double *ref;

    ASSERT_TRUE(out && first);
    qbatch_init(&b, c, 1000 + (uint64_t)c->n_tokens);
    ref = qbatch_ref(&b, c, 1.0);
    for (int k = 0; k < N_KERNELS; k++) {
        for (int t = 0; t < N_THREADS; t++) {
            struct moe_backend *be = backends[k][t];
            double e;

            if (!be)
                continue;
            memcpy(out, b.out0, n * sizeof(float));
            ASSERT_EQ(be->ops->grouped_ffn(be, b.x, c->hidden, c->n_tokens, b.work, N_EXP, out), 0);
            e = test_rel_l2_f32(out, ref, n);
            if (!(e <= TOL))
                FAIL("%s %s/%d, H %lld F %lld, %d tokens, %d threads: relative error %.3g > %g",
                     kernel_names[k], moe_quant_name(c->f.q), c->f.bcols, (long long)c->hidden,
                     (long long)c->ffn, c->n_tokens, thread_counts[t], e, TOL);
            if (e > worst[k])
                worst[k] = e;
            if (t == 0)
                memcpy(first, out, n * sizeof(float));
            else if (memcmp(first, out, n * sizeof(float)) != 0)
                FAIL("%s %s: %d threads differ from 1 in the bits", kernel_names[k],
                     moe_quant_name(c->f.q), thread_counts[t]);
        }
        /* each token alone: the same bits as in the batch */
        if (backends[k][0] && c->n_tokens > 1) {
            struct moe_backend *be = backends[k][0];

            for (int tok = 0; tok < c->n_tokens; tok++) {
                struct moe_ffn_work w1[N_EXP];
                int32_t zero = 0;
                float alone[4096];
                int nw = 0;

                ASSERT_TRUE(c->hidden <= 4096);
                for (int i = 0; i < N_EXP; i++)
                    for (int j = 0; j < b.work[i].n_tokens; j++)
                        if (b.work[i].tokens[j] == tok) {
                            w1[nw] = b.work[i];
                            w1[nw].n_tokens = 1;
                            w1[nw].tokens = &zero;
                            w1[nw].scales = &b.work[i].scales[j];
                            nw++;
                        }
                memcpy(alone, b.out0 + (size_t)tok * c->hidden, c->hidden * sizeof(float));
                ASSERT_EQ(be->ops->grouped_ffn(be, b.x + (size_t)tok * c->hidden, c->hidden, 1, w1,
                                               nw, alone),
                          0);
                if (memcmp(alone, first + (size_t)tok * c->hidden, c->hidden * sizeof(float)))
                    FAIL("%s %s: token %d alone differs from the batch", kernel_names[k],
                         moe_quant_name(c->f.q), tok);
            }
        }
    }
    /* the check can fail: one column of scales of one matrix off by 1% */
    {
        double *bad = qbatch_ref(&b, c, 1.01);
        struct moe_backend *be = backends[0][0];

        memcpy(out, b.out0, n * sizeof(float));
        ASSERT_EQ(be->ops->grouped_ffn(be, b.x, c->hidden, c->n_tokens, b.work, N_EXP, out), 0);
        if (!(test_rel_l2_f32(out, bad, n) > 10 * TOL))
            FAIL("%s: a 1%% scale error went unnoticed (%.3g)", moe_quant_name(c->f.q),
                 test_rel_l2_f32(out, bad, n));
        free(bad);
    }
    free(ref);
    free(out);
    free(first);
    qbatch_free(&b);
}

static void test_ffn(void)
{
    static const struct moe_quant_fmt fmts[] = {
        {MOE_QUANT_FP8, 128, 128}, {MOE_QUANT_INT8, 1, 128},
        {MOE_QUANT_INT8, 1, 96}, /* groups straddle a kernel K block */
        {MOE_QUANT_INT4, 1, 32},   {MOE_QUANT_INT4, 1, 64},
        {MOE_QUANT_MXFP4, 1, 32},
    };
    /* 320 rows: two and a half FP8 blocks; 1088 columns: more than one
     * kernel K block and a partial FP8 column block */
    static const struct {
        int64_t h, f;
        int t;
    } shapes[] = {{256, 320, 1},  {256, 320, 2},  {256, 320, 3},
                  {256, 320, 11}, {1088, 160, 1}, {1088, 160, 9}};
    double worst[N_KERNELS];

    for (size_t i = 0; i < MOE_ARRAY_SIZE(fmts); i++) {
        memset(worst, 0, sizeof(worst));
        for (size_t s = 0; s < MOE_ARRAY_SIZE(shapes); s++) {
            struct qcase c = {fmts[i], shapes[s].h, shapes[s].f, shapes[s].t};

            test_ffn_case(&c, worst);
        }
        printf("%-5s group %3d x %3d: worst relative error", moe_quant_name(fmts[i].q),
               fmts[i].brows, fmts[i].bcols);
        for (int k = 0; k < N_KERNELS; k++)
            if (backends[k][0])
                printf(" %s %.2g", kernel_names[k], worst[k]);
        printf("\n");
    }
}

/* Whether this CPU runs kernel variant kern; says so where it does not. */
static bool kernel_runs(const struct moe_cpu_kernel *kern, const char *what)
{
    struct moe_cpu_kernel_info info[8];
    int n = MOE_MIN(moe_backend_cpu_kernels(info, 8), 8);

    for (int i = 0; i < n; i++)
        if (!strcmp(info[i].name, kern->name) && info[i].available)
            return true;
    printf("%s: skipping kernel %s: this CPU lacks its instructions\n", what, kern->name);
    return false;
}

/*
 * One call of kern's exact kernel for format f on nt tokens (rows [row0,
 * row0 + nr) of m, cols columns; xf the tokens' fp32 rows, xp the same
 * prepared), y [nt][nr]: against fp64 (TOL of the sum of |products|, the
 * worst error to *worst), and each token alone the same bits as in the
 * batch.  what names the case in a failure.
 */
static void qdot_check(const struct moe_cpu_kernel *kern, const struct moe_quant_fmt *f,
                       const struct qmat *m, int64_t row0, int nr, int64_t cols, const float *xf,
                       void *const *xp, int nt, float *y, const char *what, double *worst)
{
    float *y1 = malloc((size_t)nr * sizeof(float));

    ASSERT_TRUE(y1 != NULL);
    kern->qdot[f->q](&(struct moe_cpu_qw){.f = *f, .w = m->w, .s = m->s, .row0 = row0}, nr, cols,
                     (const void *const *)xp, nt, y, nr);
    for (int t = 0; t < nt; t++) {
        const float *x = xf + t * cols;

        for (int r = 0; r < nr; r++) {
            const double *wr = m->ref + (row0 + r) * cols;
            double ref = 0, mag = 0, e;

            for (int64_t i = 0; i < cols; i++) {
                ref += wr[i] * (double)x[i];
                mag += fabs(wr[i] * (double)x[i]);
            }
            e = fabs(y[t * nr + r] - ref) / (mag > 0 ? mag : 1);
            if (!(e <= TOL))
                FAIL("%s: %s %s/%d, %lld columns, %d tokens: row %d token %d: %.9g for %.9g "
                     "(error %.3g)",
                     what, kern->name, moe_quant_name(f->q), f->bcols, (long long)cols, nt, r, t,
                     (double)y[t * nr + r], ref, e);
            *worst = fmax(*worst, e);
        }
        kern->qdot[f->q](&(struct moe_cpu_qw){.f = *f, .w = m->w, .s = m->s, .row0 = row0}, nr,
                         cols, (const void *const *)&xp[t], 1, y1, nr);
        if (memcmp(y1, y + t * nr, (size_t)nr * sizeof(float)) != 0)
            FAIL("%s: %s %s/%d: token %d alone differs from the batch of %d", what, kern->name,
                 moe_quant_name(f->q), f->bcols, t, nt);
    }
    free(y1);
}

/* Exact int4 kernels on rows of more groups than the x86 kernels keep the
 * activations' per-group sums for on the stack (QCORR_G in qdot_x86.h):
 * each tile computes them instead.  A down projection of ffn > 65,536
 * (the model allows 262,144) takes this path; against fp64, with up to 8
 * tokens and more, and each token alone the same bits. */
static void test_int4_long_rows(void)
{
    static const struct moe_quant_fmt f = {MOE_QUANT_INT4, 1, 32};
    const struct moe_cpu_kernel *kerns[] = {&moe_cpu_kernel_generic, &moe_cpu_kernel_avx2,
                                            &moe_cpu_kernel_avx512};
    enum { ROWS = 7, NT = 9 };
    const int64_t cols = 65600; /* 2050 groups of 32 */
    uint64_t seed = 31;
    struct qmat m;
    float *xf = malloc((size_t)NT * cols * sizeof(float)), y[NT * ROWS];
    void *xp[NT];

    ASSERT_TRUE(xf != NULL);
    qmat_init(&m, &f, ROWS, cols, &seed);
    for (int t = 0; t < NT; t++)
        for (int64_t i = 0; i < cols; i++)
            xf[t * cols + i] = test_rand_f32(&seed) * (t % 3 == 2 ? 40.0f : 1.0f);
    for (size_t k = 0; k < MOE_ARRAY_SIZE(kerns); k++) {
        const struct moe_cpu_kernel *kern = kerns[k];
        double worst = 0;

        if (!kernel_runs(kern, "int4 long rows"))
            continue;
        for (int t = 0; t < NT; t++) {
            xp[t] = moe_alloc_aligned((size_t)moe_cpu_kpad(cols) * 4);
            ASSERT_TRUE(xp[t] != NULL);
            kern->prep[MOE_DTYPE_F32](xf + t * cols, cols, moe_cpu_kpad(cols), xp[t]);
        }
        for (int nt = 2; nt <= NT; nt += NT - 2)
            qdot_check(kern, &f, &m, 0, ROWS, cols, xf, xp, nt, y, "int4 long rows", &worst);
        printf("int4 long rows (%lld columns): %s worst error %.2g (of the sum of |products|)\n",
               (long long)cols, kern->name, worst);
        for (int t = 0; t < NT; t++)
            moe_free_aligned(xp[t]);
    }
    qmat_free(&m);
    free(xf);
}

/*
 * FP8 experts' activations (kernels.h, moe_cpu_make_x8) over fp32's range:
 * the layout (the values times 2^(120 - e), exactly, reordered in blocks
 * of 32, and 2^e after them;
 * an all-zero row and infinities and NaN kept), then the FP8 kernels of
 * every variant on tokens whose largest |x| is 1e-37, 1e-30, 1, 1e30 and
 * 1e36, with weights of every code (a fifth of them subnormal), against
 * fp64 (TOL of the sum of |products|), a token alone as in the batch; a
 * token holding an infinity gives no finite result, an all-zero one zeros.
 */
static void test_fp8_x_range(void)
{
    static const struct moe_quant_fmt f = {MOE_QUANT_FP8, 128, 128};
    static const float mags[] = {1e-37f, 1e-30f, 1.0f, 1e30f, 1e36f, 0.0f, 1.0f};
    const struct moe_cpu_kernel *kerns[] = {&moe_cpu_kernel_generic, &moe_cpu_kernel_avx2,
                                            &moe_cpu_kernel_avx512};
    enum { ROWS = 9, NT = 7, NF = 5 /* the finite, nonzero tokens */ };
    const int64_t cols = 1088, np = moe_cpu_kpad(cols);
    uint64_t seed = 41;
    struct qmat m;
    float *xf = malloc((size_t)NT * cols * sizeof(float)), y[NT * ROWS], y1[ROWS];
    float *xp[NT];

    ASSERT_TRUE(xf != NULL);
    qmat_init(&m, &f, ROWS, cols, &seed);
    for (int64_t i = 0; i < ROWS * cols; i += 5)
        m.w[i] &= 0x87; /* subnormal (or zero) */
    for (int64_t r = 0; r < ROWS; r++)
        moe_quant_dequant_row_f64(&f, m.w, m.s, ROWS, cols, r, m.ref + r * cols);
    for (int t = 0; t < NT; t++)
        for (int64_t i = 0; i < cols; i++)
            xf[t * cols + i] = test_rand_f32(&seed) * mags[t];
    xf[(NT - 1) * cols + 100] = INFINITY;
    for (int t = 0; t < NT; t++) {
        float amax = 0.0f;
        int ex = 1;

        xp[t] = moe_alloc_aligned((size_t)MOE_CPU_X8_ROW(np) * 4);
        ASSERT_TRUE(xp[t] != NULL);
        memset(xp[t], 0xff, (size_t)MOE_CPU_X8_ROW(np) * 4);
        kerns[0]->prep[MOE_DTYPE_F32](xf + t * cols, cols, np, xp[t]);
        moe_cpu_make_x8(xp[t], np);
        /* e the exponent of the largest finite |x|, 0 for none: 2^(ex - 1) */
        for (int64_t i = 0; i < cols; i++)
            if (isfinite(xf[t * cols + i]))
                amax = fmaxf(amax, fabsf(xf[t * cols + i]));
        if (amax > 0.0f)
            frexpf(amax, &ex);
        for (int64_t i = 0; i < MOE_CPU_X8_ROW(np); i++) {
            /* element i's place: reordered in blocks of 32, then 2^e */
            float got = xp[t][i < np ? (i & ~31) + moe_cpu_x8_pos((int)(i & 31)) : i];
            double want = i < cols ? ldexp(xf[t * cols + i], 121 - ex) : 0.0;

            if (i == np)
                want = ldexp(1.0, ex - 1);
            if (!(got == want || (i == 100 && t == NT - 1 && isinf(got))))
                FAIL("fp8 activations: token %d element %lld: %.9g for %.9g", t, (long long)i,
                     (double)got, want);
        }
    }
    for (size_t k = 0; k < MOE_ARRAY_SIZE(kerns); k++) {
        const struct moe_cpu_kernel *kern = kerns[k];
        struct moe_cpu_qw qw = {.f = f, .w = m.w, .s = m.s, .row0 = 0};
        double worst = 0;

        if (!kernel_runs(kern, "fp8 activations"))
            continue;
        kern->qdot[MOE_QUANT_FP8](&qw, ROWS, cols, (const void *const *)xp, NT, y, ROWS);
        for (int t = 0; t < NT; t++) {
            const float *x = xf + t * cols;

            for (int r = 0; r < ROWS; r++) {
                double ref = 0, mag = 0, e;
                float v = y[t * ROWS + r];

                if (t >= NF) {
                    if (t == NF ? v != 0.0f : isfinite(v))
                        FAIL("%s fp8, token %d (%s): row %d gives %g", kern->name, t,
                             t == NF ? "zeros" : "an infinity", r, (double)v);
                    continue;
                }
                for (int64_t i = 0; i < cols; i++) {
                    ref += m.ref[r * cols + i] * (double)x[i];
                    mag += fabs(m.ref[r * cols + i] * (double)x[i]);
                }
                e = fabs(v - ref) / mag;
                if (!(e <= TOL))
                    FAIL("%s fp8, largest |x| %g: row %d: %.9g for %.9g (error %.3g)", kern->name,
                         (double)mags[t], r, (double)v, ref, e);
                worst = fmax(worst, e);
            }
            kern->qdot[MOE_QUANT_FP8](&qw, ROWS, cols, (const void *const *)&xp[t], 1, y1, ROWS);
            if (memcmp(y1, y + t * ROWS, sizeof(y1)) != 0)
                FAIL("%s fp8 activations: token %d alone differs from the batch", kern->name, t);
        }
        printf("fp8 activations, largest |x| 1e-37 to 1e36: %s worst error %.2g (of the sum of "
               "|products|)\n",
               kern->name, worst);
    }
    for (int t = 0; t < NT; t++)
        moe_free_aligned(xp[t]);
    qmat_free(&m);
    free(xf);
}

/*
 * The exact kernels with 4 to 20 tokens for every format (qdot_x86.h: one
 * row x all the tokens for MXFP4 at 4 to 6; prefill above 8, FP8 and INT8
 * from panels of rows decoded once for all the call's tokens): 75-row
 * matrices from row 5 on (70 rows: two panels and a part, an odd row at
 * the end), 2080 columns (three K blocks; groups of 96 straddle them),
 * against fp64 (TOL of the sum of |products|), and each token alone (the
 * 1-token decode tiles) the same bits as in the batch.
 */
static void test_many_tokens(void)
{
    static const struct moe_quant_fmt fmts[] = {
        {MOE_QUANT_FP8, 128, 128}, {MOE_QUANT_INT8, 1, 128}, {MOE_QUANT_INT8, 1, 96},
        {MOE_QUANT_INT4, 1, 32},   {MOE_QUANT_INT4, 1, 64},  {MOE_QUANT_MXFP4, 1, 32},
    };
    static const int nts[] = {4, 5, 6, 9, 14, 20};
    const struct moe_cpu_kernel *kerns[] = {&moe_cpu_kernel_generic, &moe_cpu_kernel_avx2,
                                            &moe_cpu_kernel_avx512};
    enum { ROWS = 75, ROW0 = 5, NR = ROWS - ROW0, NT = 20 };
    const int64_t cols = 2080, np = moe_cpu_kpad(cols);
    float *xf = malloc((size_t)NT * cols * sizeof(float)), *y = malloc(NT * NR * sizeof(float));
    void *xp[NT];

    ASSERT_TRUE(xf && y);
    for (int t = 0; t < NT; t++)
        ASSERT_TRUE((xp[t] = moe_alloc_aligned((size_t)MOE_CPU_X8_ROW(np) * 4)) != NULL);
    for (size_t f = 0; f < MOE_ARRAY_SIZE(fmts); f++) {
        uint64_t seed = 51 + f;
        struct qmat m;

        qmat_init(&m, &fmts[f], ROWS, cols, &seed);
        for (int t = 0; t < NT; t++)
            for (int64_t i = 0; i < cols; i++)
                xf[t * cols + i] = test_rand_f32(&seed) * (t % 3 == 2 ? 40.0f : 1.0f);
        for (size_t k = 0; k < MOE_ARRAY_SIZE(kerns); k++) {
            const struct moe_cpu_kernel *kern = kerns[k];
            double worst = 0;

            if (!kernel_runs(kern, "4 to 20 tokens"))
                continue;
            for (int t = 0; t < NT; t++) {
                kern->prep[MOE_DTYPE_F32](xf + t * cols, cols, np, xp[t]);
                if (fmts[f].q == MOE_QUANT_FP8)
                    moe_cpu_make_x8(xp[t], np);
            }
            for (size_t n = 0; n < MOE_ARRAY_SIZE(nts); n++)
                qdot_check(kern, &fmts[f], &m, ROW0, NR, cols, xf, xp, nts[n], y, "4 to 20 tokens",
                           &worst);
            printf("4 to 20 tokens: %s %s/%d worst error %.2g (of the sum of |products|)\n",
                   kern->name, moe_quant_name(fmts[f].q), fmts[f].bcols, worst);
        }
        qmat_free(&m);
    }
    for (int t = 0; t < NT; t++)
        moe_free_aligned(xp[t]);
    free(xf);
    free(y);
}

/* ---- int8 activations ------------------------------------------------------------- */

/* Element e of a row prepared by moe_cpu_prep_a8, dequantized. */
static double a8_value(const uint8_t *row, int64_t e)
{
    const uint8_t *blk = row + e / 32 * MOE_CPU_A8_BLOCK;
    int j = (int)(e % 32), p = j % 2 ? 16 + j / 2 : j / 2;
    float d;

    memcpy(&d, blk + MOE_CPU_A8_SCALE, 4);
    return (double)(int8_t)blk[p] * d;
}

static void test_a8_prep(void)
{
    enum { N = 100, NP = 128 };
    float x[N];
    uint8_t *row = moe_alloc_aligned(NP * 4);
    uint64_t seed = 7;

    ASSERT_TRUE(row != NULL);
    for (int i = 0; i < N; i++)
        x[i] = test_rand_f32(&seed) * (i < 32 ? 1e-3f : 5.0f);
    for (int i = 32; i < 64; i++)
        x[i] = 0.0f; /* an all-zero block */
    moe_cpu_prep_a8(x, N, NP, row);
    for (int b = 0; b < NP / 32; b++) {
        float d, off, amax = 0;
        int32_t qs = 0;
        const uint8_t *blk = row + b * MOE_CPU_A8_BLOCK;

        for (int j = 0; j < 32; j++)
            if (b * 32 + j < N)
                amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        memcpy(&d, blk + MOE_CPU_A8_SCALE, 4);
        ASSERT_TRUE(d == amax / 127.0f);
        for (int j = 0; j < 32; j++) {
            /* the copy in order */
            ASSERT_EQ((int8_t)blk[MOE_CPU_A8_SEQ + j], (int8_t)blk[j % 2 ? 16 + j / 2 : j / 2]);
            qs += (int8_t)blk[j];
        }
        memcpy(&off, blk + MOE_CPU_A8_OFF, 4);
        ASSERT_TRUE(off == (float)(8 * qs) * d);
        for (int j = 0; j < 32; j++) {
            int64_t e = b * 32 + j;
            double v = e < N ? x[e] : 0.0;

            if (!(fabs(a8_value(row, e) - v) <= 0.5 * d * (1 + 1e-6)))
                FAIL("prep_a8: element %lld: %g for %g (step %g)", (long long)e, a8_value(row, e),
                     v, (double)d);
        }
    }
    x[70] = NAN;
    moe_cpu_prep_a8(x, N, NP, row);
    ASSERT_TRUE(isnan(a8_value(row, 70)) && isnan(a8_value(row, 64)));
    ASSERT_TRUE(!isnan(a8_value(row, 0)) && !isnan(a8_value(row, 96)));
    moe_free_aligned(row);
}

/* The qdot_a8 kernel of variant k on one case, against fp64. */
static void a8_kernel_case(const struct moe_cpu_kernel *kern, const struct moe_quant_fmt *f,
                           int64_t rows, int64_t cols, int nr, int nt, double *worst)
{
    uint64_t seed = 99 + (uint64_t)cols + (uint64_t)nt;
    struct qmat m;
    uint8_t *xa[16];
    float *xf = malloc((size_t)cols * sizeof(float)), *y = malloc((size_t)nt * rows * 4);
    float y1[64];
    int64_t row0 = rows - nr;
    struct moe_cpu_qw qw;

    ASSERT_TRUE(xf && y && nt <= 16 && nr <= 64);
    qmat_init(&m, f, rows, cols, &seed);
    qw = (struct moe_cpu_qw){.f = *f, .w = m.w, .s = m.s, .row0 = row0};
    for (int t = 0; t < nt; t++) {
        xa[t] = moe_alloc_aligned((size_t)moe_cpu_kpad(cols) * 4);
        ASSERT_TRUE(xa[t] != NULL);
        for (int64_t i = 0; i < cols; i++)
            xf[i] = test_rand_f32(&seed) * (t % 3 == 2 ? 40.0f : 1.0f);
        moe_cpu_prep_a8(xf, cols, moe_cpu_kpad(cols), xa[t]);
    }
    kern->qdot_a8[f->q](&qw, nr, cols, (const void *const *)xa, nt, y, rows);
    for (int t = 0; t < nt; t++) {
        for (int r = 0; r < nr; r++) {
            double ref = 0, mag = 0, e;

            for (int64_t i = 0; i < cols; i++) {
                double p = m.ref[(row0 + r) * cols + i] * a8_value(xa[t], i);

                ref += p;
                mag += fabs(p);
            }
            e = fabs(y[(size_t)t * rows + r] - ref) / (mag > 0 ? mag : 1);
            if (!(e <= TOL))
                FAIL("%s qdot_a8 %s/%d, %lld x %lld, rows %d, %d tokens: row %d token %d: %.9g "
                     "for %.9g (error %.3g)",
                     kern->name, moe_quant_name(f->q), f->bcols, (long long)rows, (long long)cols,
                     nr, nt, r, t, (double)y[(size_t)t * rows + r], ref, e);
            *worst = fmax(*worst, e);
        }
        /* the token alone: the same bits */
        kern->qdot_a8[f->q](&qw, nr, cols, (const void *const *)&xa[t], 1, y1, 64);
        if (memcmp(y1, y + (size_t)t * rows, (size_t)nr * 4) != 0)
            FAIL("%s qdot_a8 %s: token %d alone differs from the batch of %d", kern->name,
                 moe_quant_name(f->q), t, nt);
    }
    for (int t = 0; t < nt; t++)
        moe_free_aligned(xa[t]);
    qmat_free(&m);
    free(xf);
    free(y);
}

static void test_a8_kernels(void)
{
    static const struct moe_quant_fmt fmts[] = {{MOE_QUANT_INT8, 1, 128},
                                                {MOE_QUANT_INT8, 1, 96},
                                                {MOE_QUANT_INT4, 1, 32},
                                                {MOE_QUANT_INT4, 1, 64},
                                                {MOE_QUANT_MXFP4, 1, 32}};
    static const struct {
        int64_t cols;
        int nr, nt;
    } shapes[] = {{256, 64, 1},
                  {256, 13, 2},
                  {2080, 64, 3},
                  {2080, 7, 4},
                  {1088, 64, 5},
                  {1088, 64, 8},
                  {256, 5, 13},
                  {1056, 64, 2},
                  {1056, 7, 6},
                  {2432, 13, 3},
                  /* int4: more groups than the offsets on the stack take for 6 tokens */
                  {65568, 5, 9}};
    const struct moe_cpu_kernel *kerns[] = {&moe_cpu_kernel_avx2, &moe_cpu_kernel_avx512};

    for (size_t k = 0; k < MOE_ARRAY_SIZE(kerns); k++) {
        if (!kernel_runs(kerns[k], "int8 activations"))
            continue;
        ASSERT_TRUE(!kerns[k]->qdot_a8[MOE_QUANT_FP8] && kerns[k]->qdot_a8[MOE_QUANT_MXFP4]);
        for (size_t i = 0; i < MOE_ARRAY_SIZE(fmts); i++) {
            double worst = 0;
            int ran = 0;

            for (size_t s = 0; s < MOE_ARRAY_SIZE(shapes); s++)
                if (shapes[s].cols % fmts[i].bcols == 0) {
                    a8_kernel_case(kerns[k], &fmts[i], 64 + 5, shapes[s].cols, shapes[s].nr,
                                   shapes[s].nt, &worst);
                    ran++;
                }
            ASSERT_TRUE(ran >= 2);
            printf("int8 activations: %s %s/%d kernel: worst error %.2g (of the sum of "
                   "|products|)\n",
                   kerns[k]->name, moe_quant_name(fmts[i].q), fmts[i].bcols, worst);
        }
    }
    ASSERT_TRUE(moe_cpu_kernel_generic.qdot_a8[MOE_QUANT_INT8] == NULL);
}

/* grouped_ffn with int8 activations: close to exact, bit-identical across
 * thread counts. */
static void test_a8_ffn(void)
{
    static const struct qcase cases[] = {{{MOE_QUANT_INT8, 1, 128}, 256, 320, 3},
                                         {{MOE_QUANT_INT4, 1, 32}, 1088, 160, 9},
                                         {{MOE_QUANT_INT4, 1, 64}, 256, 320, 1},
                                         {{MOE_QUANT_MXFP4, 1, 32}, 1088, 160, 5}};

    for (size_t ci = 0; ci < MOE_ARRAY_SIZE(cases); ci++) {
        const struct qcase *c = &cases[ci];
        size_t n = (size_t)c->n_tokens * c->hidden;
        float *out = malloc(n * sizeof(float)), *first = malloc(n * sizeof(float));
        struct qbatch b;
        double *ref;

        ASSERT_TRUE(out && first);
        qbatch_init(&b, c, 3000 + ci);
        ref = qbatch_ref(&b, c, 1.0);
        for (int k = 1; k < N_KERNELS; k++) {
            double e = 0;

            for (int t = 0; t < N_THREADS; t++) {
                struct moe_cpu_config cfg = {
                    .n_threads = thread_counts[t], .kernel = kernel_names[k], .act_int8 = true};
                struct moe_backend *be;
                struct moe_error err = {0};

                if (moe_backend_cpu_init(&cfg, &be, &err) == -ENOTSUP)
                    break;
                memcpy(out, b.out0, n * sizeof(float));
                ASSERT_EQ(be->ops->grouped_ffn(be, b.x, c->hidden, c->n_tokens, b.work, N_EXP, out),
                          0);
                moe_backend_free(be);
                e = test_rel_l2_f32(out, ref, n);
                if (!(e <= 2e-2) || !(e > TOL))
                    FAIL("%s %s/%d with int8 activations: relative error %.3g against the exact "
                         "reference (expected the int8 error: above %g, below 2e-2)",
                         kernel_names[k], moe_quant_name(c->f.q), c->f.bcols, e, TOL);
                if (t == 0)
                    memcpy(first, out, n * sizeof(float));
                else if (memcmp(first, out, n * sizeof(float)) != 0)
                    FAIL("%s %s with int8 activations: %d threads differ from 1 in the bits",
                         kernel_names[k], moe_quant_name(c->f.q), thread_counts[t]);
            }
            if (e > 0)
                printf("int8 activations: %s %s/%d, %d tokens: relative error %.2g against the "
                       "exact layer\n",
                       kernel_names[k], moe_quant_name(c->f.q), c->f.bcols, c->n_tokens, e);
        }
        free(ref);
        free(out);
        free(first);
        qbatch_free(&b);
    }
}

/* Malformed quantized work items are refused. */
static void test_bad_args(void)
{
    struct moe_backend *be = backends[0][0];
    struct qcase c = {{MOE_QUANT_INT8, 1, 128}, 256, 320, 1};
    struct qbatch b;
    float out[256];

    qbatch_init(&b, &c, 1);
    memcpy(out, b.out0, sizeof(out));
    b.w[0].gate_s = NULL;
    ASSERT_EQ(be->ops->grouped_ffn(be, b.x, 256, 1, b.work, N_EXP, out), -EINVAL);
    b.w[0].gate_s = b.gate[0].s;
    b.w[0].quant.bcols = 48; /* not a multiple of 32 */
    ASSERT_EQ(be->ops->grouped_ffn(be, b.x, 256, 1, b.work, N_EXP, out), -EINVAL);
    b.w[0].quant.bcols = 128;
    b.w[0].quant.brows = 128; /* only FP8 has row blocks */
    ASSERT_EQ(be->ops->grouped_ffn(be, b.x, 256, 1, b.work, N_EXP, out), -EINVAL);
    b.w[0].quant.brows = 1;
    b.w[0].dtype = MOE_DTYPE_BF16;
    ASSERT_EQ(be->ops->grouped_ffn(be, b.x, 256, 1, b.work, N_EXP, out), -EINVAL);
    b.w[0].dtype = MOE_DTYPE_I8;
    ASSERT_EQ(be->ops->grouped_ffn(be, b.x, 256, 1, b.work, N_EXP, out), 0);
    qbatch_free(&b);
}

int main(void)
{
    test_scalar();
    for (int k = 0; k < N_KERNELS; k++)
        for (int t = 0; t < N_THREADS; t++) {
            struct moe_cpu_config cfg = {.n_threads = thread_counts[t], .kernel = kernel_names[k]};
            struct moe_error err = {0};
            int r = moe_backend_cpu_init(&cfg, &backends[k][t], &err);

            if (r == -ENOTSUP) {
                if (t == 0)
                    printf("skipping kernel %s: %s\n", kernel_names[k], err.msg);
                backends[k][t] = NULL;
                continue;
            }
            ASSERT_EQ(r, 0);
        }
    test_bad_args();
    test_ffn();
    test_int4_long_rows();
    test_fp8_x_range();
    test_many_tokens();
    test_a8_prep();
    test_a8_kernels();
    test_a8_ffn();
    for (int k = 0; k < N_KERNELS; k++)
        for (int t = 0; t < N_THREADS; t++)
            moe_backend_free(backends[k][t]);
    printf("quant: ok\n");
    return 0;
}
