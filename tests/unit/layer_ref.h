/*
 * The fp64 reference of a MoE layer, shared by the layer tests (CPU and
 * CUDA): every weight widened to double from the checkpoint, SwiGLU
 * experts and shared experts (with qwen2_moe's sigmoid gate) computed in
 * double for a given routing.  Experts are read once per call, on first
 * use.  Llama 4's transposed experts are read as stored and rearranged here
 * (not by the engine's moe_expert_untranspose), and its routing weight
 * scales the expert's input.
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

static inline void dexpert_load(const struct moe_model *m, const struct moe_expert_ref *x,
                                struct dexpert *d)
{
    d->H = x->gate.cols;
    d->F = x->gate.rows;
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
                d->g[f * H + c] = gu[c * 2 * F + f];
                d->u[f * H + c] = gu[c * 2 * F + F + f];
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
        h[f] = a / (1.0 + exp(-a)) * b;
    }
    for (int64_t r = 0; r < e->H; r++) {
        double acc = 0;

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
    double *gate = NULL, *h;
    int64_t F = L->experts[0].gate.rows;

    if (L->has_shared && L->shared.gate.rows > F)
        F = L->shared.gate.rows;
    h = malloc(sizeof(double) * (size_t)F);

    ASSERT_TRUE(ex && h);
    if (L->has_shared)
        dexpert_load(m, &L->shared, &sh);
    if (L->has_shared_gate)
        gate = tensor_f64(m, &L->shared_gate);
    memset(y, 0, (size_t)T * H * sizeof(double));
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * H;

        for (int j = 0; j < K; j++) {
            int e = ids[t * K + j];

            if (e < 0)
                continue; /* left out of a partial forward */
            if (!ex[e].g)
                dexpert_load(m, &L->experts[e], &ex[e]);
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
    free(h);
}

#endif
