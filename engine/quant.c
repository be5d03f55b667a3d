/*
 * Quantized weight formats: the scalar arithmetic (see quant.h).  No state.
 */
#include "quant.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>

static const char *const names[MOE_QUANT_COUNT] = {"none", "fp8", "int8", "int4", "mxfp4"};

const char *moe_quant_name(enum moe_quant q)
{
    return (unsigned)q < MOE_QUANT_COUNT ? names[q] : "?";
}

int moe_quant_parse(const char *s, enum moe_quant *ret)
{
    for (int i = 0; i < MOE_QUANT_COUNT; i++)
        if (s && strcmp(s, names[i]) == 0) {
            *ret = (enum moe_quant)i;
            return 0;
        }
    return -EINVAL;
}

uint64_t moe_quant_data_bytes(enum moe_quant q, int64_t rows, int64_t cols)
{
    uint64_t n;

    if (rows < 0 || cols < 0 || __builtin_mul_overflow((uint64_t)rows, (uint64_t)cols, &n))
        return 0;
    return q == MOE_QUANT_INT4 || q == MOE_QUANT_MXFP4 ? (n + 1) / 2 : n;
}

size_t moe_quant_scale_size(enum moe_quant q)
{
    return q == MOE_QUANT_MXFP4 ? 1 : 4;
}

enum moe_dtype moe_quant_value_dtype(enum moe_quant q)
{
    switch (q) {
    case MOE_QUANT_FP8:
        return MOE_DTYPE_F8_E4M3;
    case MOE_QUANT_INT8:
        return MOE_DTYPE_I8;
    default:
        return MOE_DTYPE_U8;
    }
}

enum moe_dtype moe_quant_scale_dtype(enum moe_quant q)
{
    return q == MOE_QUANT_MXFP4 ? MOE_DTYPE_U8 : MOE_DTYPE_F32;
}

void moe_quant_scale_shape(const struct moe_quant_fmt *f, int64_t rows, int64_t cols,
                           int64_t *ret_rows, int64_t *ret_cols)
{
    int br = f->brows > 0 ? f->brows : 1, bc = f->bcols > 0 ? f->bcols : 1;

    *ret_rows = (rows + br - 1) / br;
    *ret_cols = (cols + bc - 1) / bc;
}

uint64_t moe_quant_scale_bytes(const struct moe_quant_fmt *f, int64_t rows, int64_t cols)
{
    int64_t sr, sc;

    moe_quant_scale_shape(f, rows, cols, &sr, &sc);
    return (uint64_t)sr * (uint64_t)sc * moe_quant_scale_size(f->q);
}

float moe_fp8_e4m3_to_f32(uint8_t b)
{
    unsigned e = (b >> 3) & 0xf, m = b & 7;
    float v;

    if ((b & 0x7f) == 0x7f)
        return NAN;
    if (e == 0)
        v = (float)m * 0x1p-9f;
    else
        v = ldexpf(1.0f + (float)m / 8.0f, (int)e - 7);
    return b & 0x80 ? -v : v;
}

uint8_t moe_f32_to_fp8_e4m3(float f)
{
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    int e;

    if (isnan(f))
        return 0x7f;
    if (a >= 448.0f)
        return sign | 0x7e;
    if (a < 0x1p-6f) {
        /* subnormal: multiples of 2^-9; rint rounds ties to even, and 8
         * (2^-6) carries into the smallest normal, 0x08 */
        return sign | (uint8_t)rintf(a * 0x1p9f);
    }
    (void)frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    e -= 1;              /* a = 1.x * 2^e, e in [-6, 8] */
    {
        float mant = rintf(ldexpf(a, -e) * 8.0f) - 8.0f; /* 0..8 */

        if (mant >= 8.0f) {
            mant = 0.0f;
            e++;
        }
        if (e > 8 || (e == 8 && mant > 6.0f))
            return sign | 0x7e;
        return sign | (uint8_t)((e + 7) << 3) | (uint8_t)mant;
    }
}

float moe_e2m1_to_f32(unsigned nib)
{
    static const float v[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

    return nib & 8 ? -v[nib & 7] : v[nib & 7];
}

float moe_e8m0_to_f32(uint8_t e)
{
    if (e == 255)
        return NAN;
    return ldexpf(1.0f, (int)e - 127);
}

float moe_quant_scale(enum moe_quant q, const void *srow, int64_t j)
{
    float s;

    if (q == MOE_QUANT_MXFP4)
        return moe_e8m0_to_f32(((const uint8_t *)srow)[j]);
    memcpy(&s, (const char *)srow + 4 * j, 4);
    return s;
}

/* Value (r, c) of the matrix, before scaling. */
static float value_at(enum moe_quant q, const uint8_t *row, int64_t c)
{
    switch (q) {
    case MOE_QUANT_FP8:
        return moe_fp8_e4m3_to_f32(row[c]);
    case MOE_QUANT_INT8:
        return (float)(int8_t)row[c];
    case MOE_QUANT_INT4:
        return (float)((int)((row[c / 2] >> (4 * (c & 1))) & 0xf) - 8);
    case MOE_QUANT_MXFP4:
        return moe_e2m1_to_f32((row[c / 2] >> (4 * (c & 1))) & 0xf);
    default:
        return NAN;
    }
}

static const uint8_t *row_ptr(const struct moe_quant_fmt *f, const void *w, int64_t cols, int64_t r)
{
    return (const uint8_t *)w + moe_quant_data_bytes(f->q, r, cols);
}

static const uint8_t *scale_row(const struct moe_quant_fmt *f, const void *s, int64_t rows,
                                int64_t cols, int64_t r)
{
    int64_t sr, sc;

    moe_quant_scale_shape(f, rows, cols, &sr, &sc);
    return (const uint8_t *)s + (size_t)(r / f->brows) * (size_t)sc * moe_quant_scale_size(f->q);
}

void moe_quant_dequant_span(const struct moe_quant_fmt *f, const void *wrow, const void *srow,
                            int64_t c0, int64_t n, float *out)
{
    for (int64_t c = c0; c < c0 + n; c++)
        out[c - c0] = value_at(f->q, wrow, c) * moe_quant_scale(f->q, srow, c / f->bcols);
}

void moe_quant_dequant_row(const struct moe_quant_fmt *f, const void *w, const void *s,
                           int64_t rows, int64_t cols, int64_t r, float *out)
{
    const uint8_t *wr = row_ptr(f, w, cols, r), *sr = scale_row(f, s, rows, cols, r);

    for (int64_t c = 0; c < cols; c++)
        out[c] = value_at(f->q, wr, c) * moe_quant_scale(f->q, sr, c / f->bcols);
}

void moe_quant_dequant_row_f64(const struct moe_quant_fmt *f, const void *w, const void *s,
                               int64_t rows, int64_t cols, int64_t r, double *out)
{
    const uint8_t *wr = row_ptr(f, w, cols, r), *sr = scale_row(f, s, rows, cols, r);

    for (int64_t c = 0; c < cols; c++)
        out[c] = (double)value_at(f->q, wr, c) * (double)moe_quant_scale(f->q, sr, c / f->bcols);
}

void moe_quant_row(enum moe_quant q, int group, const float *src, int64_t cols, void *dst,
                   float *scales)
{
    const int qmax = q == MOE_QUANT_INT4 ? 7 : 127;
    uint8_t *d = dst;

    if (q == MOE_QUANT_INT4)
        memset(d, 0, (size_t)(cols / 2));
    for (int64_t g = 0; g < cols / group; g++) {
        const float *x = src + g * group;
        float amax = 0.0f, s, inv;

        for (int i = 0; i < group; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        s = amax / (float)qmax;
        inv = s > 0.0f ? 1.0f / s : 0.0f;
        scales[g] = s;
        for (int i = 0; i < group; i++) {
            int64_t c = g * group + i;
            long v = lroundf(x[i] * inv);

            if (v > qmax)
                v = qmax;
            if (v < -qmax)
                v = -qmax;
            if (q == MOE_QUANT_INT4)
                d[c / 2] |= (uint8_t)((v + 8) << (4 * (c & 1)));
            else
                d[c] = (uint8_t)(int8_t)v;
        }
    }
}

/* The e2m1 code (0-15) nearest to v (ties to the even code), clamped. */
static unsigned e2m1_code(float v)
{
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float a = fabsf(v);
    unsigned k = 0;

    while (k < 7) {
        float mid = 0.5f * (mag[k] + mag[k + 1]);

        if (a < mid || (a == mid && (k & 1) == 0))
            break;
        k++;
    }
    return (signbit(v) && k ? 8u : 0u) | k;
}

void moe_quant_mxfp4_row(const float *src, int64_t cols, uint8_t *dst, uint8_t *scales)
{
    for (int64_t g = 0; g < cols / 32; g++) {
        const float *x = src + g * 32;
        float amax = 0.0f, inv;
        int s = 0;

        for (int i = 0; i < 32; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        if (amax > 0.0f) {
            int ex;
            float m = frexpf(amax / 6.0f, &ex); /* amax / 6 = m * 2^ex, m in [0.5, 1) */

            s = m == 0.5f ? ex - 1 : ex;
            s = s < -127 ? -127 : s > 127 ? 127 : s;
        }
        scales[g] = (uint8_t)(s + 127);
        inv = ldexpf(1.0f, -s);
        for (int i = 0; i < 32; i += 2)
            dst[(g * 32 + i) / 2] =
                (uint8_t)(e2m1_code(x[i] * inv) | (e2m1_code(x[i + 1] * inv) << 4));
    }
}

int moe_quant_check_scales(enum moe_quant q, const void *s, uint64_t n, const char *tensor,
                           struct moe_error *err)
{
    for (uint64_t i = 0; i < n; i++) {
        if (q == MOE_QUANT_MXFP4) {
            if (((const uint8_t *)s)[i] == 255)
                return moe_error_set(
                    err, -EINVAL, "tensor '%s': scale %" PRIu64 " is 255 (NaN in e8m0)", tensor, i);
            continue;
        }
        float v = moe_quant_scale(q, s, (int64_t)i);

        if (!isfinite(v) || v < 0.0f)
            return moe_error_set(err, -EINVAL,
                                 "tensor '%s': scale %" PRIu64
                                 " is %g: expected a finite, non-negative scale",
                                 tensor, i, (double)v);
    }
    return 0;
}
