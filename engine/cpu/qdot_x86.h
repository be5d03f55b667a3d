/*
 * The quantized dot kernels (kernels.h moe_cpu_qdot_fn) in AVX2 + FMA +
 * F16C, included by kernels_avx2.c and kernels_avx512.c (which compile them
 * for their own instruction set; the code is the same, so both variants
 * give the same results).  No state, no locks.
 *
 * Each 8 values are decoded to fp32 in registers, multiplied by their scale
 * and FMA'd into one 8-lane accumulator per (row, token); no dequantized
 * copy of a matrix is ever made.  Decoding:
 *   FP8 e4m3   bits (s eeee mmm) moved to f16 bits (s 0eeee mmm0000000) by an
 *              unpack, a shift and a mask, and converted by vcvtph2ps: that is the value times 2^-8
 * (normal and subnormal alike), so the scale is multiplied by 2^8 (exact).  NaN bytes (0x7f, 0xff)
 * decode as +-480 instead: the loader does not scan weights for them. INT8       sign-extended,
 * converted. INT4       nibbles split and interleaved (low, high), 8 subtracted. MXFP4      nibbles
 * looked up (vpshufb) as 2 x e2m1 in int8, so the scale is multiplied by 0.5 (exact). Tiles: rows x
 * tokens with at most 6 accumulators: 4 x 1, 3 x 2 and 2 x 3 for decode (each row a sequential
 * stream), then 1 x 6 chunks of tokens for prefill; a row's 32 values are decoded once per tile.
 * The arithmetic per output element does not depend on the tile, K is summed in MOE_CPU_KBLOCK
 * blocks, each reduced horizontally and added to y in order.
 */
#ifndef MOED_ENGINE_CPU_QDOT_X86_H
#define MOED_ENGINE_CPU_QDOT_X86_H

#include <immintrin.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "quant.h"

#define QINLINE static inline __attribute__((always_inline))

QINLINE float qhsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The scale of a group, with the decoder's factor folded in. */
QINLINE float qscale(enum moe_quant q, const uint8_t *srow, int64_t j)
{
    float s;

    switch (q) {
    case MOE_QUANT_MXFP4: {
        /* 2^(e - 127) built from its bits (e 0 gives 0, not 2^-127; 255,
         * NaN, is refused when the scales are checked), times 0.5 */
        uint32_t u = (uint32_t)srow[j] << 23;

        memcpy(&s, &u, 4);
        return s * 0.5f;
    }
    case MOE_QUANT_FP8:
        memcpy(&s, srow + 4 * j, 4);
        return s * 256.0f;
    default:
        memcpy(&s, srow + 4 * j, 4);
        return s;
    }
}

/* 32 values of a row, from wrow (element c0, c0 % 32 == 0), as 4 x 8 fp32,
 * before scaling. */
QINLINE void qdecode32(enum moe_quant q, const uint8_t *wrow, int64_t c0, __m256 out[4])
{
    switch (q) {
    case MOE_QUANT_FP8: {
        /* each byte into the high half of a 16-bit lane (s eeee mmm, then
         * 8 zeros), shifted right arithmetically by one (the sign copied
         * into bit 14), bit 14 cleared: s 0eeee mmm0000000 */
        const __m128i zero = _mm_setzero_si128(), keep = _mm_set1_epi16((short)0xbfff);

        for (int i = 0; i < 2; i++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(wrow + c0 + 16 * i));
            __m128i lo = _mm_and_si128(_mm_srai_epi16(_mm_unpacklo_epi8(zero, b), 1), keep);
            __m128i hi = _mm_and_si128(_mm_srai_epi16(_mm_unpackhi_epi8(zero, b), 1), keep);

            out[2 * i] = _mm256_cvtph_ps(lo);
            out[2 * i + 1] = _mm256_cvtph_ps(hi);
        }
        break;
    }
    case MOE_QUANT_INT8:
        for (int i = 0; i < 4; i++)
            out[i] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wrow + c0 + 8 * i))));
        break;
    default: { /* INT4, MXFP4: 16 bytes, element 2j low nibble, 2j + 1 high */
        const __m128i mf = _mm_set1_epi8(0x0f);
        __m128i b = _mm_loadu_si128((const __m128i *)(wrow + c0 / 2));
        __m128i lo = _mm_and_si128(b, mf), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mf);
        __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);

        if (q == MOE_QUANT_INT4) {
            const __m128i m8 = _mm_set1_epi8(8);

            v0 = _mm_sub_epi8(v0, m8);
            v1 = _mm_sub_epi8(v1, m8);
        } else {
            const __m128i lut =
                _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);

            v0 = _mm_shuffle_epi8(lut, v0);
            v1 = _mm_shuffle_epi8(lut, v1);
        }
        out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
        out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
        out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
        out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
        break;
    }
    }
}

/*
 * R rows from row r (relative to w->row0) x T tokens from x, over all of k;
 * results to y[t * ldy + r].  R * T <= 6: the accumulators, 4 decoded
 * weight vectors (one row at a time), the scale and an activation fit in
 * the 16 registers.
 */
QINLINE void qtile(enum moe_quant q, const struct moe_cpu_qw *w, int r, const int R,
                   const float *const *x, const int T, int64_t k, float *y, int64_t ldy)
{
    const int64_t sc = (k + w->f.bcols - 1) / w->f.bcols;
    const size_t ss = q == MOE_QUANT_MXFP4 ? 1 : 4;
    const int bc = w->f.bcols;
    const uint8_t *wr[6], *sr[6];
    float sum[6][6] = {{0}};

#pragma GCC unroll 6
    for (int i = 0; i < R; i++) {
        int64_t row = w->row0 + r + i;

        wr[i] = w->w + moe_quant_data_bytes(q, row, k);
        sr[i] = w->s + (size_t)(row / w->f.brows) * (size_t)sc * ss;
    }
    for (int64_t kb = 0; kb < k; kb += MOE_CPU_KBLOCK) {
        int64_t ke = MOE_MIN(k, kb + MOE_CPU_KBLOCK);
        __m256 acc[6][6];

#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                acc[i][t] = _mm256_setzero_ps();
        /* groups are multiples of 32; a group straddling a K block is
         * split */
        for (int64_t c = kb; c < ke;) {
            int64_t g = c / bc, ge = MOE_MIN(ke, (g + 1) * bc);
            float scl[6];

#pragma GCC unroll 6
            for (int i = 0; i < R; i++)
                scl[i] = qscale(q, sr[i], g);
            for (; c < ge; c += 32) {
#pragma GCC unroll 6
                for (int i = 0; i < R; i++) {
                    __m256 wv[4], vs = _mm256_set1_ps(scl[i]);

                    qdecode32(q, wr[i], c, wv);
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        __m256 wj = _mm256_mul_ps(wv[j], vs);

#pragma GCC unroll 6
                        for (int t = 0; t < T; t++)
                            acc[i][t] =
                                _mm256_fmadd_ps(wj, _mm256_load_ps(x[t] + c + 8 * j), acc[i][t]);
                    }
                }
            }
        }
#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                sum[i][t] += qhsum256(acc[i][t]);
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++)
            y[(size_t)t * ldy + r + i] = sum[i][t];
}

/* One format's kernel: tiles over rows and tokens. */
QINLINE void qdot_fmt(enum moe_quant q, const struct moe_cpu_qw *w, int nr, int64_t k,
                      const void *const *xv, int nt, float *y, int64_t ldy)
{
    const float *const *x = (const float *const *)xv;
    int r = 0;

    if (nt == 1) {
        for (; r + 4 <= nr; r += 4)
            qtile(q, w, r, 4, x, 1, k, y, ldy);
        for (; r < nr; r++)
            qtile(q, w, r, 1, x, 1, k, y, ldy);
        return;
    }
    if (nt == 2) {
        for (; r + 3 <= nr; r += 3)
            qtile(q, w, r, 3, x, 2, k, y, ldy);
        for (; r < nr; r++)
            qtile(q, w, r, 1, x, 2, k, y, ldy);
        return;
    }
    if (nt == 3) {
        for (; r + 2 <= nr; r += 2)
            qtile(q, w, r, 2, x, 3, k, y, ldy);
        for (; r < nr; r++)
            qtile(q, w, r, 1, x, 3, k, y, ldy);
        return;
    }
    for (; r < nr; r++) {
        int t = 0;

        for (; t + 6 <= nt; t += 6)
            qtile(q, w, r, 1, x + t, 6, k, y + (size_t)t * ldy, ldy);
        /* the last tokens: a tile of their count (a constant, for the
         * unrolling) */
        switch (nt - t) {
        case 1:
            qtile(q, w, r, 1, x + t, 1, k, y + (size_t)t * ldy, ldy);
            break;
        case 2:
            qtile(q, w, r, 1, x + t, 2, k, y + (size_t)t * ldy, ldy);
            break;
        case 3:
            qtile(q, w, r, 1, x + t, 3, k, y + (size_t)t * ldy, ldy);
            break;
        case 4:
            qtile(q, w, r, 1, x + t, 4, k, y + (size_t)t * ldy, ldy);
            break;
        case 5:
            qtile(q, w, r, 1, x + t, 5, k, y + (size_t)t * ldy, ldy);
            break;
        default:
            break;
        }
    }
}

static void qdot_fp8(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_FP8, w, nr, k, x, nt, y, ldy);
}

static void qdot_int8(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                      float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_INT8, w, nr, k, x, nt, y, ldy);
}

static void qdot_int4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                      float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_INT4, w, nr, k, x, nt, y, ldy);
}

static void qdot_mxfp4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                       float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_MXFP4, w, nr, k, x, nt, y, ldy);
}

#define MOE_CPU_QDOT_X86                                                                           \
    {                                                                                              \
        NULL, qdot_fp8, qdot_int8, qdot_int4, qdot_mxfp4                                           \
    }

#endif
