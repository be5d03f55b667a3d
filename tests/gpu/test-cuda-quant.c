/*
 * The CUDA backend's quantized expert kernels (kernels/quant_cuda.h,
 * backend_cuda_quant.cu): FP8 e4m3 with 128 x 128 block scales, INT8 and INT4
 * with per-group scales, MXFP4 with e8m0 scales per 32, against an fp64
 * reference computed here on the weights dequantized by engine/quant.c
 * (moe_quant_dequant_row_f64), and against the CPU backend on the same
 * bytes.
 *
 * Backend level (grouped_ffn): every format, shapes that are not multiples
 * of the kernels' tiles (64 rows, 64 tokens, 512 columns per warp step) nor
 * of the scale blocks, SiLU and gpt-oss's clamped SwiGLU with biases,
 * 1 to 300 tokens per call routed top-2 over 4 experts, the decode kernels
 * and the tiled kernel each forced and chosen by size, each in precision
 * exact and bf16 (the tensor core tiled kernel), a scratch cap that
 * cuts batches into pieces; the weights at 256-byte aligned addresses, and
 * at odd ones (values and scales at any byte, x not 16-byte aligned: the
 * byte-load paths) inside a GPU cache tier block they were uploaded to.
 * Results repeat bit for bit.  Bad layouts are refused (-EINVAL).
 *
 * Tolerance: max |got - ref| <= 1e-4 * max |ref contribution| over the
 * call's outputs.  The GPU sums in fp32 in another order than the CPU and
 * the reference; the expected error is a few units of 2^-24 times
 * sqrt(K) of the output's scale (the CPU backend is within 5e-7 here), so
 * 1e-4 leaves margin for that while a wrong nibble order, element order,
 * scale index or scale factor (errors of the order of the output itself)
 * fails.  Precision bf16 (the tensor core kernel, which rounds the
 * dequantized weights and the activations to bf16): 3e-2 (each rounding
 * is 2^-9 relative; the CPU backend's bf16 precision, which rounds as
 * often, reaches 8e-3 of max |y| on these cases).
 *
 * Engine level: an FP8 checkpoint (DeepSeek-V3 layout) and INT8 / INT4
 * stores packed by moe_pack_write_quant, a layer forward on the GPU (each
 * expert staged, and through a GPU cache tier holding the quantized bytes
 * and scales as stored) against the CPU backend with the same routing.
 *
 * Skips (77) without a CUDA device.
 */
#include "backend.h"
#include "cache.h"
#include "cuda_probe.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "moe_cuda.h"
#include "pack.h"
#include "quant.h"
#include "tests.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_EXP 4
#define TOL 1e-4
#define TOL_BF16 3e-2

struct qcase {
    enum moe_quant q;
    int brows, bcols;
    int H, F;
    bool gpt; /* clamped SwiGLU and biases */
};

static const struct qcase cases[] = {
    {MOE_QUANT_FP8, 128, 128, 256, 160, false}, {MOE_QUANT_FP8, 128, 128, 96, 544, true},
    {MOE_QUANT_INT8, 1, 128, 640, 96, false},   {MOE_QUANT_INT8, 1, 32, 96, 64, true},
    {MOE_QUANT_INT4, 1, 32, 544, 64, false},    {MOE_QUANT_INT4, 1, 64, 128, 224, true},
    {MOE_QUANT_MXFP4, 1, 32, 96, 160, true},    {MOE_QUANT_MXFP4, 1, 32, 576, 96, false},
};

static const struct {
    const char *name;
    int decode_max;
    uint64_t scratch;
} variants[] = {
    {"auto", 0, 0},
    {"tiled-only", -1, 0},
    {"decode-64", 64, 0},
    {"small-scratch", 0, 64 << 10},
};

#define N_VARIANTS (int)MOE_ARRAY_SIZE(variants)

static const int token_counts[] = {1, 2, 5, 8, 9, 33, 64, 130, 300};

/* One matrix of an expert: host bytes of values and scales, and fp64. */
struct qmatrix {
    int64_t rows, cols;
    uint8_t *v, *s;
    uint64_t vbytes, sbytes;
    double *ref; /* [rows, cols] dequantized */
};

struct qexpert {
    struct qmatrix m[3]; /* gate [F, H], up [F, H], down [H, F] */
    float *bias;         /* gate [F], up [F], down [H] (gpt) or NULL */
};

/* Typical |value| of random bytes of the format, for a scale that keeps
 * the sums near 1. */
static double typical(enum moe_quant q)
{
    return q == MOE_QUANT_FP8 ? 100.0 : q == MOE_QUANT_INT8 ? 73.0 : 4.0;
}

static void make_matrix(const struct qcase *c, int64_t rows, int64_t cols, uint64_t *seed,
                        struct qmatrix *m)
{
    const struct moe_quant_fmt f = {c->q, c->brows, c->bcols};
    int64_t sr, sc;

    m->rows = rows;
    m->cols = cols;
    m->vbytes = moe_quant_data_bytes(c->q, rows, cols);
    m->sbytes = moe_quant_scale_bytes(&f, rows, cols);
    m->v = malloc(m->vbytes);
    m->s = malloc(m->sbytes);
    m->ref = malloc((size_t)(rows * cols) * sizeof(double));
    ASSERT_TRUE(m->v && m->s && m->ref);
    for (uint64_t i = 0; i < m->vbytes; i++) {
        uint8_t b = (uint8_t)test_rand_u64(seed);

        /* FP8 NaN bytes decode as +-480 in the kernels (as on the CPU) */
        if (c->q == MOE_QUANT_FP8 && (b & 0x7f) == 0x7f)
            b ^= 1;
        m->v[i] = b;
    }
    moe_quant_scale_shape(&f, rows, cols, &sr, &sc);
    for (int64_t i = 0; i < sr * sc; i++) {
        if (c->q == MOE_QUANT_MXFP4) {
            /* 2^-8 .. 2^-3 */
            m->s[i] = (uint8_t)(119 + test_rand_u64(seed) % 6);
        } else {
            double base = 1.0 / (typical(c->q) * sqrt((double)cols));
            /* every 7th scale 0 (an all-zero group), others 0.25 .. 2 times base */
            float s = i % 7 == 3
                          ? 0.0f
                          : (float)(base * (0.25 + 1.75 * (0.5 + 0.5 * test_rand_f32(seed))));

            memcpy(m->s + 4 * i, &s, 4);
        }
    }
    for (int64_t r = 0; r < rows; r++)
        moe_quant_dequant_row_f64(&f, m->v, m->s, rows, cols, r, m->ref + r * cols);
}

static void free_expert(struct qexpert *x)
{
    for (int i = 0; i < 3; i++) {
        free(x->m[i].v);
        free(x->m[i].s);
        free(x->m[i].ref);
    }
    free(x->bias);
}

/* Places the 6 tensors (values then scales of gate, up, down) in one
 * buffer: 256-byte aligned, or at odd offsets.  Returns its size; off[]. */
static uint64_t layout(const struct qexpert *x, bool odd, uint64_t off[6])
{
    static const unsigned skew[6] = {1, 5, 3, 2, 7, 6};
    uint64_t p = 0;

    for (int i = 0; i < 6; i++) {
        const struct qmatrix *m = &x->m[i % 3];
        uint64_t n = i < 3 ? m->vbytes : m->sbytes;

        p = (p + 255) & ~(uint64_t)255;
        if (odd)
            p += skew[i];
        off[i] = p;
        p += n;
    }
    return p;
}

static uint64_t tier_len(uint64_t bytes)
{
    return (bytes + MOE_TIER_ALIGN - 1) & ~(uint64_t)(MOE_TIER_ALIGN - 1);
}

static void fill(uint8_t *dst, const struct qexpert *x, const uint64_t off[6])
{
    for (int i = 0; i < 6; i++) {
        const struct qmatrix *m = &x->m[i % 3];

        memcpy(dst + off[i], i < 3 ? m->v : m->s, i < 3 ? m->vbytes : m->sbytes);
    }
}

static void set_weights(struct moe_expert_weights *w, const struct qcase *c, const uint8_t *base,
                        const uint64_t off[6], const float *bias)
{
    memset(w, 0, sizeof(*w));
    w->dtype = moe_quant_value_dtype(c->q);
    w->hidden = c->H;
    w->ffn = c->F;
    w->gate = base + off[0];
    w->up = base + off[1];
    w->down = base + off[2];
    w->gate_s = base + off[3];
    w->up_s = base + off[4];
    w->down_s = base + off[5];
    w->quant = (struct moe_quant_fmt){c->q, c->brows, c->bcols};
    if (c->gpt) {
        w->act = MOE_ACT_SWIGLU_CLAMP;
        w->alpha = 1.702f;
        w->limit = 1.5f;
        w->gate_bias = bias;
        w->up_bias = bias + c->F;
        w->down_bias = bias + 2 * c->F;
    }
}

/* out[t] += s * expert(x[t]) in fp64 for every work item. */
static void reference(const struct qcase *c, const struct qexpert *xs, const float *x,
                      const int32_t *tok, const float *sc, const int *cnt, double *out)
{
    const int H = c->H, F = c->F;
    double *h = malloc((size_t)F * sizeof(double));

    ASSERT_TRUE(h);
    for (int e = 0, k = 0; e < N_EXP; e++) {
        const struct qexpert *q = &xs[e];

        for (int j = 0; j < cnt[e]; j++, k++) {
            const float *xt = x + (size_t)tok[k] * H;

            for (int f = 0; f < F; f++) {
                double g = 0, u = 0;

                for (int i = 0; i < H; i++) {
                    g += q->m[0].ref[(size_t)f * H + i] * xt[i];
                    u += q->m[1].ref[(size_t)f * H + i] * xt[i];
                }
                if (c->gpt) {
                    const double lim = 1.5, al = (double)1.702f;

                    g += q->bias[f];
                    u += q->bias[F + f];
                    g = fmin(g, lim);
                    u = fmax(fmin(u, lim), -lim);
                    h[f] = (u + 1.0) * g / (1.0 + exp(-al * g));
                } else {
                    h[f] = g / (1.0 + exp(-g)) * u;
                }
            }
            for (int r = 0; r < H; r++) {
                double y = 0;

                for (int f = 0; f < F; f++)
                    y += q->m[2].ref[(size_t)r * F + f] * h[f];
                if (c->gpt)
                    y += q->bias[2 * F + r];
                out[(size_t)tok[k] * H + r] += (double)sc[k] * y;
            }
        }
    }
    free(h);
}

/* max |got - ref| / max |ref - init|. */
static double max_err(const float *got, const double *ref, const float *init, size_t n)
{
    double e = 0, m = 0;

    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)got[i] - ref[i]));
        m = fmax(m, fabs(ref[i] - init[i]));
    }
    return m > 0 ? e / m : e;
}

static void check_case(const struct qcase *c, struct moe_backend *const *gpu,
                       struct moe_backend *cpu, struct moe_tier *tier)
{
    const int H = c->H, F = c->F, Tmax = 300;
    uint64_t seed = 1000 + (uint64_t)c->q * 17 + (uint64_t)H + (uint64_t)F;
    struct qexpert xs[N_EXP];
    uint64_t off[2][6], bytes[2];
    uint8_t *host[2], *dbuf[N_EXP][2];
    float *dbias[N_EXP] = {0};
    struct moe_expert_weights wg[2][N_EXP], wc[N_EXP];
    const size_t xn = (size_t)Tmax * H;
    float *x = malloc(xn * sizeof(float)), *init = malloc(xn * sizeof(float));
    float *got = malloc(xn * sizeof(float)), *again = malloc(xn * sizeof(float));
    float *ycpu = malloc(xn * sizeof(float));
    double *ref = malloc(xn * sizeof(double));
    int32_t *tok = malloc((size_t)2 * Tmax * sizeof(int32_t));
    float *sc = malloc((size_t)2 * Tmax * sizeof(float));
    float *dx, *dxo, *dout;

    ASSERT_TRUE(x && init && got && again && ycpu && ref && tok && sc);
    for (int e = 0; e < N_EXP; e++) {
        make_matrix(c, F, H, &seed, &xs[e].m[0]);
        make_matrix(c, F, H, &seed, &xs[e].m[1]);
        make_matrix(c, H, F, &seed, &xs[e].m[2]);
        xs[e].bias = NULL;
        if (c->gpt) {
            xs[e].bias = malloc((size_t)(2 * F + H) * sizeof(float));
            ASSERT_TRUE(xs[e].bias);
            for (int i = 0; i < 2 * F + H; i++)
                xs[e].bias[i] = 0.5f * test_rand_f32(&seed);
        }
    }
    /* Placement 0: backend memory, aligned; 1: a GPU tier block, odd
     * offsets (values and scales at any byte). */
    for (int e = 0; e < N_EXP; e++) {
        for (int p = 0; p < 2; p++) {
            bytes[p] = layout(&xs[e], p == 1, off[p]);
            host[p] = calloc(1, bytes[p]);
            ASSERT_TRUE(host[p]);
            fill(host[p], &xs[e], off[p]);
        }
        dbuf[e][0] = gpu[0]->ops->alloc(gpu[0], bytes[0]);
        ASSERT_TRUE(dbuf[e][0] != NULL);
        ASSERT_EQ(gpu[0]->ops->copy_in(gpu[0], dbuf[e][0], host[0], bytes[0]), 0);
        /* tier blocks are whole MOE_TIER_ALIGN units, as the cache asks */
        dbuf[e][1] = tier->ops->alloc(tier, tier_len(bytes[1]));
        ASSERT_TRUE(dbuf[e][1] != NULL);
        ASSERT_EQ(tier->ops->upload(tier, dbuf[e][1], host[1], bytes[1]), 0);
        if (c->gpt) {
            const size_t bb = (size_t)(2 * F + H) * sizeof(float);

            dbias[e] = gpu[0]->ops->alloc(gpu[0], bb);
            ASSERT_TRUE(dbias[e] != NULL);
            ASSERT_EQ(gpu[0]->ops->copy_in(gpu[0], dbias[e], xs[e].bias, bb), 0);
        }
        for (int p = 0; p < 2; p++)
            set_weights(&wg[p][e], c, dbuf[e][p], off[p], dbias[e]);
        /* the CPU backend reads the aligned host copy (kept) */
        set_weights(&wc[e], c, host[0], off[0], xs[e].bias);
        free(host[1]);
    }

    for (size_t i = 0; i < xn; i++) {
        x[i] = test_rand_f32(&seed);
        init[i] = test_rand_f32(&seed);
    }
    /* x aligned, and at +1 float (rows not 16-byte aligned) for the odd
     * placement */
    dx = gpu[0]->ops->alloc(gpu[0], xn * sizeof(float));
    dxo = gpu[0]->ops->alloc(gpu[0], (xn + 4) * sizeof(float));
    dout = gpu[0]->ops->alloc(gpu[0], xn * sizeof(float));
    ASSERT_TRUE(dx && dxo && dout);
    ASSERT_EQ(gpu[0]->ops->copy_in(gpu[0], dx, x, xn * sizeof(float)), 0);
    ASSERT_EQ(gpu[0]->ops->copy_in(gpu[0], dxo + 1, x, xn * sizeof(float)), 0);

    for (size_t ti = 0; ti < MOE_ARRAY_SIZE(token_counts); ti++) {
        const int T = token_counts[ti];
        const size_t n = (size_t)T * H;
        int cnt[N_EXP] = {0}, k = 0;
        struct moe_ffn_work work[2][N_EXP], workc[N_EXP];
        double worst = 0, worst_bf = 0;

        /* top-2 of 4: token t goes to experts t % 4 and (t + 1 + t / 4) % 4
         * when they differ; lists per expert in token order */
        for (int e = 0; e < N_EXP; e++) {
            int first = k;

            for (int t = 0; t < T; t++) {
                const int a = t % N_EXP, b = (t + 1 + t / N_EXP) % N_EXP;

                if (a == e || (b == e && b != a)) {
                    tok[k] = t;
                    sc[k] = 0.25f + 0.5f * (0.5f + 0.5f * test_rand_f32(&seed));
                    k++;
                }
            }
            cnt[e] = k - first;
        }
        for (int e = 0, o = 0; e < N_EXP; o += cnt[e], e++) {
            for (int p = 0; p < 2; p++)
                work[p][e] = (struct moe_ffn_work){&wg[p][e], cnt[e], tok + o, sc + o, 0};
            workc[e] = (struct moe_ffn_work){&wc[e], cnt[e], tok + o, sc + o, 0};
        }
        for (size_t i = 0; i < n; i++)
            ref[i] = init[i];
        reference(c, xs, x, tok, sc, cnt, ref);

        memcpy(ycpu, init, n * sizeof(float));
        if (cpu->ops->grouped_ffn(cpu, x, H, T, workc, N_EXP, ycpu) != 0)
            FAIL("%s H %d F %d: the CPU backend failed", moe_quant_name(c->q), H, F);
        const double ecpu = max_err(ycpu, ref, init, n);

        for (int vp = 0; vp < 2 * N_VARIANTS; vp++) {
            /* each variant exact, then precision bf16 (the tensor core
             * kernel for pieces above decode size) */
            const int v = vp % N_VARIANTS;
            const bool bf = vp >= N_VARIANTS;
            const double tol = bf ? TOL_BF16 : TOL;

            for (int p = 0; p < 2; p++) {
                const float *xin = p ? dxo + 1 : dx;
                int r;

                for (int e = 0; e < N_EXP; e++)
                    work[p][e].precision = bf ? MOE_PRECISION_BF16 : MOE_PRECISION_EXACT;

                ASSERT_EQ(gpu[v]->ops->copy_in(gpu[v], dout, init, n * sizeof(float)), 0);
                r = gpu[v]->ops->grouped_ffn(gpu[v], xin, H, T, work[p], N_EXP, dout);
                if (r != 0)
                    FAIL("%s H %d F %d %s%s %s, %d tokens: %d (%s)", moe_quant_name(c->q), H, F,
                         variants[v].name, bf ? " bf16" : "", p ? "odd/tier" : "aligned", T, r,
                         moe_backend_cuda_last_error(gpu[v]));
                ASSERT_EQ(gpu[v]->ops->copy_out(gpu[v], got, dout, n * sizeof(float)), 0);
                const double e = max_err(got, ref, init, n);
                double d = 0, m = 0;

                for (size_t i = 0; i < n; i++) {
                    d = fmax(d, fabs((double)got[i] - ycpu[i]));
                    m = fmax(m, fabs((double)ycpu[i] - init[i]));
                }
                d = m > 0 ? d / m : d;
                if (bf)
                    worst_bf = fmax(worst_bf, e);
                else
                    worst = fmax(worst, e);
                if (!(e <= tol) || !(d <= tol))
                    FAIL("%s brows %d bcols %d H %d F %d%s, %s%s, %s, %d tokens: max error %.3e "
                         "of max |y| vs fp64, %.3e vs the CPU backend (CPU vs fp64 %.3e); "
                         "tolerance %.0e",
                         moe_quant_name(c->q), c->brows, c->bcols, H, F, c->gpt ? " gpt" : "",
                         variants[v].name, bf ? " bf16" : "",
                         p ? "odd offsets in a GPU tier" : "aligned", T, e, d, ecpu, tol);
                /* repeatable bit for bit */
                ASSERT_EQ(gpu[v]->ops->copy_in(gpu[v], dout, init, n * sizeof(float)), 0);
                ASSERT_EQ(gpu[v]->ops->grouped_ffn(gpu[v], xin, H, T, work[p], N_EXP, dout), 0);
                ASSERT_EQ(gpu[v]->ops->copy_out(gpu[v], again, dout, n * sizeof(float)), 0);
                ASSERT_TRUE(memcmp(got, again, n * sizeof(float)) == 0);
            }
        }
        printf("%-5s brows %3d bcols %3d H %3d F %3d%-4s %3d tokens: max error %.2e of max |y| "
               "(bf16 %.2e; cpu %.2e)\n",
               moe_quant_name(c->q), c->brows, c->bcols, H, F, c->gpt ? " gpt" : "", T, worst,
               worst_bf, ecpu);
    }

    for (int e = 0; e < N_EXP; e++) {
        gpu[0]->ops->mem_free(gpu[0], dbuf[e][0]);
        tier->ops->free(tier, dbuf[e][1], tier_len(layout(&xs[e], true, off[1])));
        gpu[0]->ops->mem_free(gpu[0], dbias[e]);
        free((void *)((const uint8_t *)wc[e].gate - off[0][0]));
        free_expert(&xs[e]);
    }
    gpu[0]->ops->mem_free(gpu[0], dx);
    gpu[0]->ops->mem_free(gpu[0], dxo);
    gpu[0]->ops->mem_free(gpu[0], dout);
    free(x);
    free(init);
    free(got);
    free(again);
    free(ycpu);
    free(ref);
    free(tok);
    free(sc);
}

/* Layouts the kernels do not take: -EINVAL, before anything runs. */
static void check_bad(struct moe_backend *gpu)
{
    const struct qcase c = {MOE_QUANT_INT8, 1, 32, 64, 32, false};
    struct qexpert x;
    uint64_t off[6], seed = 5;
    struct moe_expert_weights w;
    const int32_t tok[1] = {0};
    const float sc[1] = {1.0f};
    struct moe_ffn_work wk = {&w, 1, tok, sc, 0};
    uint8_t *d;
    float *dx, *dout;

    make_matrix(&c, 32, 64, &seed, &x.m[0]);
    make_matrix(&c, 32, 64, &seed, &x.m[1]);
    make_matrix(&c, 64, 32, &seed, &x.m[2]);
    x.bias = NULL;
    uint64_t bytes = layout(&x, false, off);
    uint8_t *h = calloc(1, bytes);

    ASSERT_TRUE(h);
    fill(h, &x, off);
    d = gpu->ops->alloc(gpu, bytes);
    dx = gpu->ops->alloc(gpu, 64 * sizeof(float));
    dout = gpu->ops->alloc(gpu, 64 * sizeof(float));
    ASSERT_TRUE(d && dx && dout);
    ASSERT_EQ(gpu->ops->copy_in(gpu, d, h, bytes), 0);
    {
        float hx[64];

        for (int i = 0; i < 64; i++)
            hx[i] = test_rand_f32(&seed);
        ASSERT_EQ(gpu->ops->copy_in(gpu, dx, hx, sizeof(hx)), 0);
    }
    set_weights(&w, &c, d, off, NULL);
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), 0);

    w.quant.brows = 2; /* INT8 scales are per row */
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.quant.bcols = 48; /* not a multiple of 32 */
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    w.quant.bcols = 0;
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.quant.q = MOE_QUANT_MXFP4; /* wrong dtype for it, and bcols must be 32 */
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    w.dtype = MOE_DTYPE_U8;
    w.quant.bcols = 64;
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.quant.q = MOE_QUANT_COUNT;
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.dtype = MOE_DTYPE_BF16; /* values of a plain dtype, with scales */
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.down_s = NULL;
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    w.ffn = 48; /* not a multiple of 32 */
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), -EINVAL);
    set_weights(&w, &c, d, off, NULL);
    ASSERT_EQ(gpu->ops->grouped_ffn(gpu, dx, 64, 1, &wk, 1, dout), 0);

    gpu->ops->mem_free(gpu, d);
    gpu->ops->mem_free(gpu, dx);
    gpu->ops->mem_free(gpu, dout);
    free(h);
    free_expert(&x);
    printf("bad layouts: refused\n");
}

/* A layer forward of a quantized checkpoint or store: GPU (staged, and
 * through a GPU tier) against the CPU backend, same routing. */
static void check_engine(const char *tag, enum moe_arch arch, enum moe_dtype dt, enum moe_quant q,
                         int group)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir(tag), *pdir = NULL;
    struct moe_model *m;
    struct moe_backend *cpu, *gpu;
    struct moe_engine *ecpu, *egpu, *etier;
    struct moe_cache *cache;
    struct moe_tier *tier;
    struct moe_cpu_config ccfg = {0};
    struct moe_cuda_config gcfg = {0};
    uint64_t seed = 9;
    const char *path = dir;
    int model;

    moe_genmodel_defaults(arch, &o);
    o.out_dir = dir;
    o.n_layers = arch == MOE_ARCH_DEEPSEEK_V3 ? 2 : 1;
    o.n_experts = 8;
    o.top_k = 2;
    o.hidden = 256;
    o.ffn = 128;
    o.dtype = dt;
    o.seed = 4;
    o.layout = MOE_GEN_LAYOUT_PER_EXPERT;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel %s: %s", tag, err.msg);
    if (q != MOE_QUANT_NONE) {
        struct moe_quant_fmt f = {q, 1, group};

        pdir = test_tmpdir("cuda-quant-pack");
        ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
        if (moe_pack_write_quant(m, pdir, true, &f, NULL, NULL, &err) < 0)
            FAIL("pack %s: %s", tag, err.msg);
        moe_model_free(m);
        path = pdir;
    }
    if (moe_model_open(path, &m, &err) != 0)
        FAIL("%s: %s", tag, err.msg);
    ASSERT_TRUE(m->expert_quant.q != MOE_QUANT_NONE);
    ASSERT_EQ(moe_backend_cpu_init(&ccfg, &cpu, NULL), 0);
    ASSERT_EQ(moe_engine_init(m, cpu, &ecpu), 0);
    if (moe_backend_cuda_init(&gcfg, &gpu, &err) != 0)
        FAIL("CUDA backend: %s", err.msg);
    ASSERT_EQ(moe_engine_init(m, gpu, &egpu), 0);
    {
        uint64_t slot = m->expert_bytes + 6 * 4096;
        struct moe_cache_config cc = {.policy = MOE_POLICY_LRU, .host_bytes = 6 * slot};

        ASSERT_EQ(moe_cache_create(&cc, &cache, &err), 0);
        /* room for 3 experts on the GPU: batches page in */
        if (moe_tier_cuda_create(0, 3 * slot, &tier, &err) != 0)
            FAIL("GPU tier: %s", err.msg);
        ASSERT_EQ(moe_cache_push_tier(cache, tier, &err), 0);
        ASSERT_EQ(moe_cache_add_model(cache, m, NULL, &model, &err), 0);
        ASSERT_EQ(moe_engine_attach(m, gpu, cache, model, &etier), 0);
    }

    const int H = m->cfg.hidden, K = m->cfg.top_k, Tmax = 300;
    const size_t xn = (size_t)Tmax * H;
    float *x = malloc(xn * 4), *yc = malloc(xn * 4), *yg = malloc(xn * 4), *yt = malloc(xn * 4);
    float *w = malloc((size_t)Tmax * K * 4);
    int32_t *ids = malloc((size_t)Tmax * K * 4);

    ASSERT_TRUE(x && yc && yg && yt && w && ids);
    for (size_t i = 0; i < xn; i++)
        x[i] = 2.0f * test_rand_f32(&seed);
    for (int layer = 0; layer < m->cfg.n_layers; layer++) {
        static const int Ts[] = {1, 7, 64, 300};

        if (!m->layers[layer].is_moe)
            continue;
        for (size_t ti = 0; ti < MOE_ARRAY_SIZE(Ts); ti++) {
            const int T = Ts[ti];
            const size_t n = (size_t)T * H;
            double e1, e2;

            ASSERT_EQ(moe_layer_forward(ecpu, layer, x, T, NULL, NULL, yc, ids, w, NULL, &err), 0);
            if (moe_layer_forward(egpu, layer, x, T, ids, w, yg, NULL, NULL, NULL, &err) != 0)
                FAIL("%s layer %d, %d tokens: %s", tag, layer, T, err.msg);
            if (moe_layer_forward(etier, layer, x, T, ids, w, yt, NULL, NULL, NULL, &err) != 0)
                FAIL("%s GPU tier, layer %d, %d tokens: %s", tag, layer, T, err.msg);
            double *ref = malloc(n * sizeof(double));

            ASSERT_TRUE(ref);
            for (size_t i = 0; i < n; i++)
                ref[i] = yc[i];
            e1 = test_rel_l2_f32(yg, ref, n);
            e2 = test_rel_l2_f32(yt, ref, n);
            free(ref);
            printf("%s layer %d, %3d tokens: rel L2 vs cpu %.2e (staged), %.2e (GPU tier)\n", tag,
                   layer, T, e1, e2);
            if (!(e1 < 1e-5) || !(e2 < 1e-5))
                FAIL("%s layer %d, %d tokens: rel L2 vs the CPU backend %.3e staged, %.3e "
                     "through the GPU tier; tolerance 1e-5",
                     tag, layer, T, e1, e2);
            ASSERT_TRUE(memcmp(yg, yt, n * sizeof(float)) == 0);
        }
    }
    moe_engine_free(etier);
    moe_cache_free(cache);
    moe_engine_free(egpu);
    moe_engine_free(ecpu);
    moe_backend_free(gpu);
    moe_backend_free(cpu);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
    if (pdir) {
        test_rmtree(pdir);
        free(pdir);
    }
    free(x);
    free(yc);
    free(yg);
    free(yt);
    free(w);
    free(ids);
}

int main(void)
{
    char msg[256];
    int n = moe_cuda_probe(msg, sizeof(msg));
    struct moe_backend *gpu[N_VARIANTS], *cpu;
    struct moe_cpu_config ccfg = {0};
    struct moe_tier *tier;
    struct moe_error err = {0};

    printf("%s\n", msg);
    if (n <= 0) {
        printf("SKIP: no CUDA device on this machine; the quantized CUDA kernels' tests need "
               "one\n");
        return TEST_SKIP;
    }
    for (int v = 0; v < N_VARIANTS; v++) {
        struct moe_cuda_config cfg = {.device = 0,
                                      .decode_max_tokens = variants[v].decode_max,
                                      .scratch_bytes = variants[v].scratch};

        if (moe_backend_cuda_init(&cfg, &gpu[v], &err) != 0)
            FAIL("CUDA backend: %s", err.msg);
    }
    ASSERT_EQ(moe_backend_cpu_init(&ccfg, &cpu, NULL), 0);
    if (moe_tier_cuda_create(0, 64ull << 20, &tier, &err) != 0)
        FAIL("GPU tier: %s", err.msg);
    check_bad(gpu[0]);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++)
        check_case(&cases[i], gpu, cpu, tier);
    moe_tier_destroy(tier);
    for (int v = 0; v < N_VARIANTS; v++)
        moe_backend_free(gpu[v]);
    moe_backend_free(cpu);
    check_engine("cuda-quant-fp8", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_F8_E4M3, MOE_QUANT_NONE, 0);
    check_engine("cuda-quant-int8", MOE_ARCH_MIXTRAL, MOE_DTYPE_BF16, MOE_QUANT_INT8, 128);
    check_engine("cuda-quant-int4", MOE_ARCH_MIXTRAL, MOE_DTYPE_BF16, MOE_QUANT_INT4, 32);
    printf("ok\n");
    return 0;
}
