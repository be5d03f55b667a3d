/*
 * The fp64 reference of a MoE layer, shared by the layer tests (CPU and
 * CUDA): every weight widened to double from the checkpoint, SwiGLU
 * experts and shared experts (with qwen2_moe's sigmoid gate) computed in
 * double for a given routing.  Experts are read once per call, on first
 * use.  Llama 4's transposed experts are read as stored and rearranged here
 * (not by the engine's moe_expert_untranspose), and its routing weight
 * scales the expert's input.  gpt-oss's: transposed with gate and up
 * interleaved, rearranged here too; its biases and clamped SwiGLU
 * (transformers' GptOssExperts) in double, and its router (logits plus
 * bias, top-k, softmax over the k) in layer_ref_route_gpt_oss.  Its MXFP4
 * experts as released are decoded here from the file's bytes (transformers'
 * FP4_VALUES table, ldexp by the e8m0 scale minus 127, not quant.c), gate
 * at the even rows of gate_up_proj_blocks[e], up at the odd ones.
 */
#ifndef MOED_TESTS_LAYER_REF_H
#define MOED_TESTS_LAYER_REF_H

#include "dtype.h"
#include "model.h"
#include "tests.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One expert widened to double. */
struct dexpert {
    int64_t H, F;
    double *g, *u, *d;
    const double *gb, *ub, *db; /* gpt-oss biases [F], [F], [H], or NULL */
    bool clamp;                 /* gpt-oss's clamped SwiGLU */
    double alpha, limit;
};

static inline double *tensor_f64(const struct moe_model *m, const struct moe_tensor_ref *t)
{
    size_t n = (size_t)(t->rows * t->cols), es = moe_dtype_size(t->dtype);
    uint8_t *raw = malloc(t->nbytes);
    double *v = malloc(n * sizeof(double));

    ASSERT_TRUE(raw && v);
    ASSERT_EQ(moe_model_read(m, t, raw, NULL), 0);
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        float f;

        if (t->dtype == MOE_DTYPE_F32) {
            memcpy(&f, raw + i * es, 4);
        } else {
            memcpy(&h, raw + i * es, 2);
            f = t->dtype == MOE_DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
        }
        v[i] = f;
    }
    free(raw);
    return v;
}

/* Bytes of t (n from its offset) read from m. */
static inline uint8_t *ref_bytes(const struct moe_model *m, const struct moe_tensor_ref *t,
                                 uint64_t n)
{
    struct moe_tensor_ref r = *t;
    uint8_t *b = malloc(n);

    ASSERT_TRUE(b != NULL);
    r.nbytes = n;
    ASSERT_EQ(moe_model_read(m, &r, b, NULL), 0);
    return b;
}

/* rows x cols of MXFP4 from v (blocks) and s (scales), to double. */
static inline void mxfp4_f64(const uint8_t *v, const uint8_t *s, int64_t rows, int64_t cols,
                             double *out)
{
    static const double fp4[16] = {+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0};

    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint8_t b = v[(r * cols + c) / 2];

            out[r * cols + c] =
                ldexp(fp4[c % 2 ? b >> 4 : b & 15], (int)s[r * (cols / 32) + c / 32] - 127);
        }
}

/* gpt-oss's MXFP4 expert as released: gate_up [2F, H] (rows interleaved)
 * from the bytes of gate then up, down [H, F]; as a packed store holds it:
 * gate's F rows, then up's. */
static inline void dexpert_load_mxfp4(const struct moe_model *m, const struct moe_expert_ref *x,
                                      struct dexpert *d)
{
    const int64_t H = d->H, F = d->F;
    uint8_t *gv = ref_bytes(m, &x->gate, 2 * x->gate.nbytes),
            *gs = ref_bytes(m, &x->gate_s, 2 * x->gate_s.nbytes),
            *dv = ref_bytes(m, &x->down, x->down.nbytes),
            *ds = ref_bytes(m, &x->down_s, x->down_s.nbytes);
    double *gu = malloc(sizeof(double) * (size_t)(2 * F * H));

    ASSERT_TRUE(!x->transposed && x->quant.q == MOE_QUANT_MXFP4);
    ASSERT_TRUE(x->up.offset == x->gate.offset + x->gate.nbytes);
    ASSERT_TRUE(x->up_s.offset == x->gate_s.offset + x->gate_s.nbytes);
    d->g = malloc(sizeof(double) * (size_t)(F * H));
    d->u = malloc(sizeof(double) * (size_t)(F * H));
    d->d = malloc(sizeof(double) * (size_t)(F * H));
    ASSERT_TRUE(gu && d->g && d->u && d->d);
    mxfp4_f64(gv, gs, 2 * F, H, gu);
    for (int64_t f = 0; f < F; f++) {
        int64_t rg = x->interleaved ? 2 * f : f, ru = x->interleaved ? 2 * f + 1 : F + f;

        memcpy(d->g + f * H, gu + rg * H, sizeof(double) * (size_t)H);
        memcpy(d->u + f * H, gu + ru * H, sizeof(double) * (size_t)H);
    }
    mxfp4_f64(dv, ds, H, F, d->d);
    free(gu);
    free(gv);
    free(gs);
    free(dv);
    free(ds);
}

static inline void dexpert_load(const struct moe_model *m, const struct moe_expert_ref *x,
                                struct dexpert *d)
{
    d->H = x->gate.cols;
    d->F = x->gate.rows;
    if (x->quant.q == MOE_QUANT_MXFP4) {
        dexpert_load_mxfp4(m, x, d);
        return;
    }
    d->g = tensor_f64(m, &x->gate);
    d->u = tensor_f64(m, &x->up);
    d->d = tensor_f64(m, &x->down);
    if (x->transposed) {
        /* Stored: gate's values then up's are gate_up[e] [H, 2F] (row c:
         * F gate values, then F up values); down[e] is [F, H]. */
        const int64_t H = d->H, F = d->F;
        double *gu = malloc(sizeof(double) * (size_t)(2 * F * H));
        double *dn = malloc(sizeof(double) * (size_t)(F * H));

        ASSERT_TRUE(gu && dn);
        memcpy(gu, d->g, sizeof(double) * (size_t)(F * H));
        memcpy(gu + F * H, d->u, sizeof(double) * (size_t)(F * H));
        memcpy(dn, d->d, sizeof(double) * (size_t)(F * H));
        for (int64_t f = 0; f < F; f++)
            for (int64_t c = 0; c < H; c++) {
                /* gpt-oss: gate at column 2f, up at 2f + 1 */
                d->g[f * H + c] = x->interleaved ? gu[c * 2 * F + 2 * f] : gu[c * 2 * F + f];
                d->u[f * H + c] =
                    x->interleaved ? gu[c * 2 * F + 2 * f + 1] : gu[c * 2 * F + F + f];
                d->d[c * F + f] = dn[f * H + c];
            }
        free(gu);
        free(dn);
    }
}

static inline void dexpert_free(struct dexpert *d)
{
    free(d->g);
    free(d->u);
    free(d->d);
}

/* y += s * down(silu(gate x') * up x') in double, x' = in_scale * x. */
static inline void dexpert_apply_in(const struct dexpert *e, const float *x, double in_scale,
                                    double s, double *y, double *h)
{
    for (int64_t f = 0; f < e->F; f++) {
        double a = 0, b = 0;

        for (int64_t c = 0; c < e->H; c++) {
            a += e->g[f * e->H + c] * (in_scale * x[c]);
            b += e->u[f * e->H + c] * (in_scale * x[c]);
        }
        if (e->gb)
            a += e->gb[f];
        if (e->ub)
            b += e->ub[f];
        if (e->clamp) {
            /* gate = gate.clamp(max=limit), up = up.clamp(-limit, limit),
             * (up + 1) * gate * sigmoid(gate * alpha) */
            double gc = fmin(a, e->limit), uc = fmax(fmin(b, e->limit), -e->limit);

            h[f] = (uc + 1.0) * gc / (1.0 + exp(-e->alpha * gc));
        } else {
            h[f] = a / (1.0 + exp(-a)) * b;
        }
    }
    for (int64_t r = 0; r < e->H; r++) {
        double acc = e->db ? e->db[r] : 0.0;

        for (int64_t f = 0; f < e->F; f++)
            acc += e->d[r * e->F + f] * h[f];
        y[r] += s * acc;
    }
}

/* y += s * down(silu(gate x) * up x) in double. */
static inline void dexpert_apply(const struct dexpert *e, const float *x, double s, double *y,
                                 double *h)
{
    dexpert_apply_in(e, x, 1.0, s, y, h);
}

/* The layer's output for the given routing, in double. */
static inline void layer_ref(const struct moe_model *m, int layer, const float *x, int T,
                             const int32_t *ids, const float *w, double *y)
{
    const struct moe_layer *L = &m->layers[layer];
    const int H = m->cfg.hidden, K = m->cfg.top_k, E = m->cfg.n_experts;
    struct dexpert *ex = calloc((size_t)E, sizeof(*ex)), sh = {0};
    double *gate = NULL, *h, *gub = NULL, *dnb = NULL;
    int64_t F = L->experts[0].gate.rows;

    if (L->has_shared && L->shared.gate.rows > F)
        F = L->shared.gate.rows;
    h = malloc(sizeof(double) * (size_t)F);

    ASSERT_TRUE(ex && h);
    if (L->has_shared)
        dexpert_load(m, &L->shared, &sh);
    if (L->has_shared_gate)
        gate = tensor_f64(m, &L->shared_gate);
    if (L->has_expert_bias) {
        /* gate_up_proj_bias [E, 2F] interleaved; down_proj_bias [E, H] */
        double *raw = tensor_f64(m, &L->gate_up_bias);
        const int64_t Fe = L->experts[0].gate.rows;

        gub = malloc(sizeof(double) * (size_t)(2 * Fe * E));
        ASSERT_TRUE(gub);
        for (int64_t i = 0; i < E; i++)
            for (int64_t f = 0; f < Fe; f++) {
                gub[i * 2 * Fe + f] = raw[i * 2 * Fe + 2 * f];
                gub[i * 2 * Fe + Fe + f] = raw[i * 2 * Fe + 2 * f + 1];
            }
        free(raw);
        dnb = tensor_f64(m, &L->down_bias);
    }
    memset(y, 0, (size_t)T * H * sizeof(double));
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * H;

        for (int j = 0; j < K; j++) {
            int e = ids[t * K + j];

            if (e < 0)
                continue; /* left out of a partial forward */
            if (!ex[e].g) {
                dexpert_load(m, &L->experts[e], &ex[e]);
                ex[e].clamp = m->cfg.act == MOE_ACT_SWIGLU_CLAMP;
                ex[e].alpha = m->cfg.swiglu_alpha;
                ex[e].limit = m->cfg.swiglu_limit;
                if (gub) {
                    ex[e].gb = gub + (size_t)e * 2 * ex[e].F;
                    ex[e].ub = ex[e].gb + ex[e].F;
                    ex[e].db = dnb + (size_t)e * H;
                }
            }
            if (m->cfg.scale_input) /* Llama 4: the weight scales the input */
                dexpert_apply_in(&ex[e], xt, w[t * K + j], 1.0, y + (size_t)t * H, h);
            else
                dexpert_apply(&ex[e], xt, w[t * K + j], y + (size_t)t * H, h);
        }
        if (L->has_shared) {
            double s = 1.0;

            if (gate) {
                double a = 0;

                for (int c = 0; c < H; c++)
                    a += gate[c] * xt[c];
                s = 1.0 / (1.0 + exp(-a));
            }
            dexpert_apply(&sh, xt, s, y + (size_t)t * H, h);
        }
    }
    for (int e = 0; e < E; e++)
        dexpert_free(&ex[e]);
    dexpert_free(&sh);
    free(ex);
    free(gate);
    free(gub);
    free(dnb);
    free(h);
}

/*
 * gpt-oss's router in double (GptOssTopKRouter): logits = W x + b, the
 * top_k largest (ties: lower id), softmax over those k; ids and w
 * [T, top_k] in descending order of weight.
 */
static inline void layer_ref_route_gpt_oss(const struct moe_model *m, int layer, const float *x,
                                           int T, int32_t *ids, double *w)
{
    const struct moe_layer *L = &m->layers[layer];
    const int H = m->cfg.hidden, K = m->cfg.top_k, E = m->cfg.n_experts;
    double *W = tensor_f64(m, &L->router), *b = tensor_f64(m, &L->router_bias);
    double *l = malloc(sizeof(double) * (size_t)E);

    ASSERT_TRUE(l && L->has_router_bias);
    for (int t = 0; t < T; t++) {
        double sum = 0;

        for (int e = 0; e < E; e++) {
            l[e] = b[e];
            for (int c = 0; c < H; c++)
                l[e] += W[(size_t)e * H + c] * x[(size_t)t * H + c];
        }
        for (int j = 0; j < K; j++) {
            int best = -1;

            for (int e = 0; e < E; e++) {
                bool taken = false;

                for (int i = 0; i < j; i++)
                    taken |= ids[t * K + i] == e;
                if (!taken && (best < 0 || l[e] > l[best]))
                    best = e;
            }
            ids[t * K + j] = best;
        }
        for (int j = 0; j < K; j++)
            sum += exp(l[ids[t * K + j]] - l[ids[t * K]]);
        for (int j = 0; j < K; j++)
            w[t * K + j] = exp(l[ids[t * K + j]] - l[ids[t * K]]) / sum;
    }
    free(W);
    free(b);
    free(l);
}

#endif
