/*
 * Portable C kernels of the CPU backend (compiled with -O3 only, for any
 * CPU).  Owns no state and takes no locks.
 *
 * Weights are converted to fp32 a chunk at a time (up to 4 rows x CHUNK
 * elements, on the stack) and dotted with the fp32 activations through 16
 * independent partial sums, a loop shape compilers vectorise without
 * -ffast-math.  Each chunk's partial sums are added in a fixed tree and the
 * chunk sums added to y in K order, so results do not depend on the tiling.
 * The prepared activation layout is plain fp32 for every dtype.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dtype.h"
#include "kernels.h"
#include "quant.h"

#define ROWS 4
#define LANES 16
#define CHUNK 256

/* Converts n weights of row w (dtype index dt) to fp32, zero-padding to
 * n_pad. */
static void convert_row(const void *w, int dt, int64_t n, int64_t n_pad, float *dst)
{
    int64_t i;

    if (dt == MOE_DTYPE_F32) {
        memcpy(dst, w, (size_t)n * sizeof(float));
    } else if (dt == MOE_DTYPE_BF16) {
        const uint16_t *s = w;

        for (i = 0; i < n; i++) {
            uint32_t u = (uint32_t)s[i] << 16;

            memcpy(&dst[i], &u, sizeof(u));
        }
    } else {
        const uint16_t *s = w;

        for (i = 0; i < n; i++)
            dst[i] = moe_f16_to_f32(s[i]);
    }
    for (i = n; i < n_pad; i++)
        dst[i] = 0.0f;
}

static float dot_chunk(const float *restrict w, const float *restrict x, int64_t n)
{
    float acc[LANES] = {0};

    for (int64_t k = 0; k < n; k += LANES)
        for (int j = 0; j < LANES; j++)
            acc[j] += w[k + j] * x[k + j];
    for (int s = LANES / 2; s > 0; s /= 2)
        for (int j = 0; j < s; j++)
            acc[j] += acc[j + s];
    return acc[0];
}

static void dot(int dt, size_t esz, const void *w, int64_t ldw, int nr, int64_t k,
                const void *const *x, int nt, float *y, int64_t ldy)
{
    _Alignas(64) float wbuf[ROWS][CHUNK];
    const char *wb = w;

    for (int r0 = 0; r0 < nr; r0 += ROWS) {
        int rr = MOE_MIN(ROWS, nr - r0);

        for (int64_t k0 = 0; k0 < k; k0 += CHUNK) {
            int64_t kn = MOE_MIN(CHUNK, k - k0);
            /* x rows are padded with zeros to a multiple of 32 >= this */
            int64_t kp = (kn + LANES - 1) / LANES * LANES;

            for (int r = 0; r < rr; r++)
                convert_row(wb + ((size_t)(r0 + r) * ldw + k0) * esz, dt, kn, kp, wbuf[r]);
            for (int t = 0; t < nt; t++) {
                const float *xt = (const float *)x[t] + k0;

                for (int r = 0; r < rr; r++) {
                    float s = dot_chunk(wbuf[r], xt, kp);
                    float *yp = &y[(int64_t)t * ldy + r0 + r];

                    *yp = k0 == 0 ? s : *yp + s;
                }
            }
        }
    }
}

static void dot_f32(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                    float *y, int64_t ldy)
{
    dot(MOE_DTYPE_F32, 4, w, ldw, nr, k, x, nt, y, ldy);
}

static void dot_f16(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                    float *y, int64_t ldy)
{
    dot(MOE_DTYPE_F16, 2, w, ldw, nr, k, x, nt, y, ldy);
}

static void dot_bf16(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    dot(MOE_DTYPE_BF16, 2, w, ldw, nr, k, x, nt, y, ldy);
}

static void prep_f32(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    float *d = dst;

    memcpy(d, src, (size_t)n * sizeof(float));
    for (int64_t i = n; i < n_pad; i++)
        d[i] = 0.0f;
}

static void swiglu(const float *g, const float *u, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void swiglu_clamp(const float *g, const float *u, int64_t n, float alpha, float limit,
                         float *out)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = moe_cpu_swiglu_clamp1(g[i], u[i], alpha, limit);
}

/*
 * Quantized weights: each row's K block dequantized into a buffer on the
 * stack (value times scale, fp32; 4 KiB, never the whole expert), then
 * dotted with each token.
 */
static void qdot(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                 float *y, int64_t ldy)
{
    int64_t sc = (k + w->f.bcols - 1) / w->f.bcols;
    size_t ss = moe_quant_scale_size(w->f.q);
    /* FP8: x times 2^(120 - e), reordered (kernels.h, moe_cpu_make_x8):
     * taken back to x / 2^e, exactly, and the sums times 2^e at the end */
    float buf[MOE_CPU_KBLOCK];

    for (int r = 0; r < nr; r++) {
        int64_t row = w->row0 + r;
        const uint8_t *wr = w->w + moe_quant_data_bytes(w->f.q, row, k);
        const uint8_t *sr = w->s + (size_t)(row / w->f.brows) * (size_t)sc * ss;

        for (int t = 0; t < nt; t++)
            y[(size_t)t * ldy + r] = 0.0f;
        for (int64_t kb = 0; kb < k; kb += MOE_CPU_KBLOCK) {
            int64_t n = MOE_MIN(k - kb, MOE_CPU_KBLOCK);

            moe_quant_dequant_span(&w->f, wr, sr, kb, n, buf);
            for (int t = 0; t < nt; t++) {
                const float *xt = (const float *)x[t] + kb;
                float acc = 0.0f;

                for (int64_t c = 0; c < n; c++)
                    acc +=
                        w->f.q == MOE_QUANT_FP8
                            ? buf[c] * (xt[(c & ~31) + moe_cpu_x8_pos((int)(c & 31))] * 0x1p-120f)
                            : buf[c] * xt[c];
                y[(size_t)t * ldy + r] += acc;
            }
        }
        for (int t = 0; w->f.q == MOE_QUANT_FP8 && t < nt; t++)
            y[(size_t)t * ldy + r] *= ((const float *)x[t])[moe_cpu_kpad(k)];
    }
}

const struct moe_cpu_kernel moe_cpu_kernel_generic = {
    .name = "generic",
    .prep = {prep_f32, prep_f32, prep_f32},
    .dot = {dot_f32, dot_f16, dot_bf16},
    .round = {moe_cpu_round_f32, moe_cpu_round_f32, moe_cpu_round_f32},
    .dot_b16 = {dot_f32, dot_f16, dot_bf16},
    .swiglu = swiglu,
    .swiglu_clamp = swiglu_clamp,
    .qdot = {NULL, qdot, qdot, qdot, qdot},
};
