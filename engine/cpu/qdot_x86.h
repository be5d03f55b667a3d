/*
 * The quantized dot kernels on fp32 activations (kernels.h moe_cpu_qdot_fn,
 * struct moe_cpu_kernel's qdot: MOE_CPU_QDOT_X86) in AVX2 + FMA + F16C,
 * included by kernels_avx2.c and kernels_avx512.c (which compile them for
 * their own instruction set; the code is the same, so both variants give
 * the same results).  No state, no locks.  Also the helpers that the
 * int8-activation kernels (qdot_a8_x86.h) share: QINLINE, qhsum256, qscale
 * and qoff (the offset terms of INT4 and MXFP4, with qgsum8, qa8_off8 and
 * qsv8).
 *
 * Each 8 values are decoded to fp32 in registers and FMA'd with the
 * activations into an 8-lane partial sum per (row, token) over the values'
 * group (groups are multiples of 32, and split where they straddle a K
 * block), which is then multiplied by the group's scale into an 8-lane
 * accumulator, so scaling costs one FMA per group (FP8 and INT8: 128
 * values); no dequantized copy of a matrix is ever made.  Decoding:
 *   FP8 e4m3   the even, then the odd bytes sign-extended and multiplied
 *              by 16 into 16-bit words in one vpmaddubsw each, masked to
 *              s 0000eeee mmm0000, and unpacked with zeros into the top
 *              halves of 32-bit lanes (vpunpck*wd): the fp32 bits of the
 *              value times 2^-120 (normal and subnormal alike), used as
 *              it is; 2 multiplies (the integer pipe), 2 and and 4
 *              shuffles per 32 values.  The lanes hold elements 0, 2, 4, 6,
 *              16, ..., 22 (then 8, ..., 30, and the odd ones likewise),
 *              the order in which the activations are laid out, times
 *              2^(120 - e) (kernels.h, moe_cpu_make_x8; e the exponent of
 *              the row's largest |x|), so the products are w x / 2^e,
 *              never near fp32's limits, and each dot is multiplied by
 *              2^e at the end (all exact: as if w had been decoded exactly
 *              and x taken as it is).
 *              NaN bytes (0x7f, 0xff) decode as +-480 instead: the loader
 *              does not scan weights for them.
 *   INT8       sign-extended, converted.
 *   INT4       each value's byte shuffled (vpshufb) into the top byte of its
 *              32-bit lane and masked to its nibble, converted: a high
 *              nibble (after xor 0x80, the value in two's complement) as the
 *              value times 2^28, a low one as the value plus 8 (0..15)
 *              times 2^24; the lanes are multiplied by 2^-28 and 2^-24
 *              (exact) before they are summed, and the 8 is taken off at
 *              the end of the row: -8 times the dot of the group scales
 *              with the sums of the activations at the even columns
 *              (qgsum, once per call and token where they fit on the
 *              stack).
 *   MXFP4      nibbles split and interleaved, looked up (vpshufb) as 2 x e2m1
 *              in int8, so the scale is multiplied by 0.5 (exact).
 * Tiles: rows x tokens with at most 6 accumulators: 4 x 1, 3 x 2 and 2 x 3
 * for decode, whose rows are nr / R apart (each tile's weight streams run
 * through whole rows in order, as moe_cpu_dot_tiles' decode tiles do), then
 * for prefill (more than 8 tokens) INT4 and MXFP4 in 1 x 6 chunks of tokens,
 * a row's 32 values decoded once per tile, and FP8 and INT8 in 2 x 3 tiles
 * on panels of 32 rows decoded once per K block for all the tokens (qpre;
 * 1.25x at 64 tokens, 1.8x at 512).  The arithmetic per output element does
 * not depend on the tile: K
 * is summed in MOE_CPU_KBLOCK blocks, each reduced horizontally and added to
 * y in order (INT4 then adds its offset's term).
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
        /* vpmaddubsw of the 32 bytes (signed) with 16 at the even bytes
         * (then the odd ones) and 0 at the others: each value's byte
         * sign-extended times 16 in a 16-bit word, masked to s 0000 eeee
         * mmm 0000, the top half of the fp32 bits of the value times 2^-120
         * (a subnormal for e = 0); the words to the top halves of 32-bit
         * lanes (vpunpck*wd with zeros): elements 0, 2, 4, 6, 16, ..., 22;
         * 8, ..., 14, 24, ..., 30; then the odd ones likewise, the order of
         * the activations (kernels.h, moe_cpu_make_x8, which also carry the
         * 2^120) */
        const __m256i b = _mm256_loadu_si256((const __m256i *)(wrow + c0));
        const __m256i keep = _mm256_set1_epi16((short)0x87f0), z = _mm256_setzero_si256();
        __m256i e = _mm256_and_si256(_mm256_maddubs_epi16(_mm256_set1_epi16(16), b), keep);
        __m256i o = _mm256_and_si256(_mm256_maddubs_epi16(_mm256_set1_epi16(16 << 8), b), keep);

        out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, e));
        out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, e));
        out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, o));
        out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, o));
        break;
    }
    case MOE_QUANT_INT8:
        for (int i = 0; i < 4; i++)
            out[i] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wrow + c0 + 8 * i))));
        break;
    case MOE_QUANT_INT4: {
        /* 16 bytes, element 2j the low nibble of byte j, 2j + 1 the high
         * one, each n + 8; xor 0x80 makes a high nibble n in two's
         * complement.  Each element's byte is shuffled into the top byte of
         * its 32-bit lane (the rest zero) and masked to its nibble: an even
         * lane holds the low nibble, n + 8, times 2^24 (qtile starts its
         * partial sums at -8 times the activations' to take the 8 off), an
         * odd lane the high one, n times 2^28 as an int32; converted
         * exactly (qtile multiplies the lanes by 2^-24 and 2^-28 before
         * summing them). */
        const __m256i mk =
            _mm256_setr_epi32(0x0f000000, (int)0xf0000000u, 0x0f000000, (int)0xf0000000u,
                              0x0f000000, (int)0xf0000000u, 0x0f000000, (int)0xf0000000u);
        __m256i b = _mm256_xor_si256(
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wrow + c0 / 2))),
            _mm256_set1_epi8((char)0x80));

#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            /* lanes 0-3: bytes 4j, 4j, 4j + 1, 4j + 1; lanes 4-7: 4j + 2, 4j + 2, 4j + 3, 4j + 3 */
            const __m256i m = _mm256_setr_epi32(
                (int)(0x808080u | (4u * j) << 24), (int)(0x808080u | (4u * j) << 24),
                (int)(0x808080u | (4u * j + 1) << 24), (int)(0x808080u | (4u * j + 1) << 24),
                (int)(0x808080u | (4u * j + 2) << 24), (int)(0x808080u | (4u * j + 2) << 24),
                (int)(0x808080u | (4u * j + 3) << 24), (int)(0x808080u | (4u * j + 3) << 24));

            out[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, m), mk));
        }
        break;
    }
    default: { /* MXFP4: 16 bytes, element 2j low nibble, 2j + 1 high */
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

/* INT4: the sum of the activations at the even columns (those of the low
 * nibbles) of columns [c0, c1), in a fixed order. */
QINLINE float qgsum(const float *x, int64_t c0, int64_t c1)
{
    __m256 v = _mm256_setzero_ps();
    float a[8];

    for (int64_t c = c0; c < c1; c += 32)
        v = _mm256_add_ps(
            v,
            _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(x + c), _mm256_load_ps(x + c + 8)),
                          _mm256_add_ps(_mm256_load_ps(x + c + 16), _mm256_load_ps(x + c + 24))));
    _mm256_storeu_ps(a, v);
    return (a[0] + a[2]) + (a[4] + a[6]);
}

/* qgsum of groups [g0, g0 + 8) of bc columns of x[0, k) (those from
 * ceil(k / bc) on 0), to dst[8]. */
QINLINE void qgsum8(const float *x, int64_t k, int64_t g0, int bc, float *dst)
{
    for (int j = 0; j < 8; j++) {
        int64_t c0 = (g0 + j) * bc;

        dst[j] = c0 < k ? qgsum(x, c0, MOE_MIN(k, c0 + bc)) : 0.0f;
    }
}

/* int8 activations, INT4 and MXFP4: the sums of the blocks' offsets (kernels.h,
 * MOE_CPU_A8_OFF) over groups [g0, g0 + 8) of bc columns of x[0, k)
 * (those from ceil(k / bc) on 0), each in block order, to dst[8]. */
QINLINE void qa8_off8(const uint8_t *x, int64_t k, int64_t g0, int bc, float *dst)
{
    for (int j = 0; j < 8; j++) {
        int64_t c0 = (g0 + j) * bc, c1 = MOE_MIN(k, c0 + bc);
        float s = 0.0f, o;

        for (int64_t c = c0; c < c1; c += 32) {
            memcpy(&o, x + c / 32 * MOE_CPU_A8_BLOCK + MOE_CPU_A8_OFF, 4);
            s += o;
        }
        dst[j] = s;
    }
}

/* The scales of groups [g0, g0 + 8) of row sr (those from sc on 0), as
 * qscale; m: the lanes below sc - g0. */
QINLINE __m256 qsv8(enum moe_quant sq, const uint8_t *sr, int64_t g0, int64_t sc, __m256i m)
{
    float v[8];

    if (sq != MOE_QUANT_MXFP4)
        return _mm256_maskload_ps((const float *)sr + g0, m);
    if (g0 + 8 <= sc)
        return _mm256_mul_ps(
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sr + g0))), 23)),
            _mm256_set1_ps(0.5f));
    for (int j = 0; j < 8; j++)
        v[j] = g0 + j < sc ? qscale(sq, sr, g0 + j) : 0.0f;
    return _mm256_loadu_ps(v);
}

/*
 * The rows' offset terms (INT4's 8, MXFP4's 12 with int8 activations):
 * sum[i][t] += f x the dot of row i's group scales (qsv8, as sq) with
 * token t's per-group values, 8 groups at a time, for R rows x T tokens:
 * ec[t] + g0 where the call gathered them (ec non-NULL), else made here
 * per 8 groups from x[t] (A8: qa8_off8 of int8 activations, else qgsum8).
 */
QINLINE void qoff(enum moe_quant sq, const uint8_t *const *sr, const int R, const void *const *x,
                  const float *const *ec, const bool A8, const int T, int64_t k, int bc, float f,
                  float sum[6][6])
{
    const int64_t ng = (k + bc - 1) / bc;
    __m256 d[6][6];

#pragma GCC unroll 6
    for (int i = 0; i < R; i++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            d[i][t] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += 8) {
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)MOE_MIN(8, ng - g0)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 e[6];

#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            if (ec) {
                e[t] = _mm256_load_ps(ec[t] + g0);
            } else {
                float eb[8];

                if (A8)
                    qa8_off8((const uint8_t *)x[t], k, g0, bc, eb);
                else
                    qgsum8((const float *)x[t], k, g0, bc, eb);
                e[t] = _mm256_loadu_ps(eb);
            }
        }
#pragma GCC unroll 6
        for (int i = 0; i < R; i++) {
            __m256 sv = qsv8(sq, sr[i], g0, ng, m);

#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                d[i][t] = _mm256_fmadd_ps(sv, e[t], d[i][t]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < R; i++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            sum[i][t] += f * qhsum256(d[i][t]);
}

/* The weights and the scales of rows r, r + rs, ... (R of them, relative
 * to w->row0) of a matrix of k columns and scales of ss bytes, for the
 * tiles. */
QINLINE void qtile_rows(enum moe_quant q, const struct moe_cpu_qw *w, int r, int rs, const int R,
                        int64_t k, size_t ss, const uint8_t **wr, const uint8_t **sr)
{
    const int64_t sc = (k + w->f.bcols - 1) / w->f.bcols;

#pragma GCC unroll 6
    for (int i = 0; i < R; i++) {
        int64_t row = w->row0 + r + (int64_t)i * rs;

        wr[i] = w->w + moe_quant_data_bytes(q, row, k);
        sr[i] = w->s + (size_t)(row / w->f.brows) * (size_t)sc * ss;
    }
}

/* Tokens per chunk with their qgsum8 values on the stack (6 x 2048 floats,
 * 48 KiB), for up to QCORR_G groups in a row; beyond, each tile computes
 * them. */
#define QCORR_T 6
#define QCORR_G 2048

/*
 * R rows r, r + rs, r + 2 rs, ... (relative to w->row0) x T tokens from x,
 * over all of k; results to y[t * ldy + row].  R * T <= 6: the partial
 * sums, 4 decoded weight vectors (one row at a time) and an activation fit
 * in the 16 registers (the accumulators and scales, used once per group,
 * need not).  The values of
 * a row's group are multiplied with the activations unscaled, summed in 8
 * lanes, and the 8 partial sums multiplied by the group's scale into the
 * accumulator: one multiply per group instead of one per value.
 */
QINLINE void qtile_(enum moe_quant q, const struct moe_cpu_qw *w, int r, int rs, const int R,
                    const float *const *x, const bool XC, const float *const *xc, const int T,
                    int64_t k, float *y, int64_t ldy)
{
    const size_t ss = q == MOE_QUANT_MXFP4 ? 1 : 4;
    const int bc = w->f.bcols;
    /* partial sums over whole groups (FP8 and INT8, groups of 128 as a
     * rule); INT4 and MXFP4 (groups of 32 or 64) scale each 32 values'
     * sum: the partial sums would take as many registers again as the
     * accumulators (measured: 5% slower with 8 tokens) */
    const bool GS = q == MOE_QUANT_FP8 || q == MOE_QUANT_INT8;
    const uint8_t *wr[6], *sr[6];
    float sum[6][6] = {{0}};

    qtile_rows(q, w, r, rs, R, k, ss, wr, sr);
    for (int64_t kb = 0; kb < k; kb += MOE_CPU_KBLOCK) {
        int64_t ke = MOE_MIN(k, kb + MOE_CPU_KBLOCK);
        int64_t g = kb / bc, gend = (g + 1) * bc;
        __m256 acc[6][6], p[6][6], vs[6];

#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                acc[i][t] = p[i][t] = _mm256_setzero_ps();
#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
            vs[i] = _mm256_set1_ps(qscale(q, sr[i], g));
        for (int64_t c = kb; c < ke; c += 32) {
            if (c == gend) {
                /* the group's sums times its scale; the next group (one
                 * straddling a K block is split) */
#pragma GCC unroll 6
                for (int i = 0; i < R && GS; i++)
#pragma GCC unroll 6
                    for (int t = 0; t < T; t++) {
                        acc[i][t] = _mm256_fmadd_ps(p[i][t], vs[i], acc[i][t]);
                        p[i][t] = _mm256_setzero_ps();
                    }
                g++;
                gend += bc;
#pragma GCC unroll 6
                for (int i = 0; i < R; i++)
                    vs[i] = _mm256_set1_ps(qscale(q, sr[i], g));
            }
#pragma GCC unroll 6
            for (int i = 0; i < R; i++) {
                __m256 wv[4];

                qdecode32(q, wr[i], c, wv);
#pragma GCC unroll 6
                for (int t = 0; t < T; t++) {
                    __m256 s = GS ? _mm256_fmadd_ps(wv[0], _mm256_load_ps(x[t] + c), p[i][t])
                                  : _mm256_mul_ps(wv[0], _mm256_load_ps(x[t] + c));

                    s = _mm256_fmadd_ps(wv[1], _mm256_load_ps(x[t] + c + 8), s);
                    s = _mm256_fmadd_ps(wv[2], _mm256_load_ps(x[t] + c + 16), s);
                    s = _mm256_fmadd_ps(wv[3], _mm256_load_ps(x[t] + c + 24), s);
                    if (GS)
                        p[i][t] = s;
                    else
                        acc[i][t] = _mm256_fmadd_ps(s, vs[i], acc[i][t]);
                }
            }
        }
#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++) {
                if (GS)
                    acc[i][t] = _mm256_fmadd_ps(p[i][t], vs[i], acc[i][t]);
                if (q == MOE_QUANT_INT4) /* the decoder's factors, exactly */
                    acc[i][t] = _mm256_mul_ps(
                        acc[i][t], _mm256_setr_ps(0x1p-24f, 0x1p-28f, 0x1p-24f, 0x1p-28f, 0x1p-24f,
                                                  0x1p-28f, 0x1p-24f, 0x1p-28f));
                sum[i][t] += qhsum256(acc[i][t]);
            }
    }
    if (q == MOE_QUANT_INT4) /* the low nibbles' offset: -8 x the groups' qgsum */
        qoff(q, sr, R, (const void *const *)x, XC ? xc : NULL, false, T, k, bc, -8.0f, sum);
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++)
            /* FP8: the activations' 2^e (kernels.h, moe_cpu_make_x8) */
            y[(size_t)t * ldy + r + (int64_t)i * rs] =
                q == MOE_QUANT_FP8 ? sum[i][t] * x[t][moe_cpu_kpad(k)] : sum[i][t];
}

/* qtile with xc (INT4: qgsum8 values for its tokens) or without (NULL). */
QINLINE void qtile(enum moe_quant q, const struct moe_cpu_qw *w, int r, int rs, const int R,
                   const float *const *x, const float *const *xc, const int T, int64_t k, float *y,
                   int64_t ldy)
{
    if (q == MOE_QUANT_INT4 && xc)
        qtile_(q, w, r, rs, R, x, true, xc, T, k, y, ldy);
    else
        qtile_(q, w, r, rs, R, x, false, NULL, T, k, y, ldy);
}

/* Decode tiles of R rows x T tokens over nr rows: tile j takes rows j, j +
 * s, j + 2s, ... (s = nr / R), so that each weight stream runs through s
 * whole rows in order (as moe_cpu_dot_tiles does); the rest one at a
 * time. */
#define QDEC(q, w, nr, R, x, xc, T, k, y, ldy)                                                     \
    do {                                                                                           \
        int s_ = (nr) / (R), r_ = 0;                                                               \
                                                                                                   \
        for (; r_ < s_; r_++)                                                                      \
            qtile(q, w, r_, s_, R, x, xc, T, k, y, ldy);                                           \
        for (r_ = s_ * (R); r_ < (nr); r_++)                                                       \
            qtile(q, w, r_, 1, 1, x, xc, T, k, y, ldy);                                            \
    } while (0)

/* Prefill: row r x n tokens (1 <= n <= 6), n made a constant for the
 * unrolling. */
QINLINE void qrow(enum moe_quant q, const struct moe_cpu_qw *w, int r, const float *const *x,
                  const float *const *xc, int n, int64_t k, float *y, int64_t ldy)
{
    switch (n) {
    case 6:
        qtile(q, w, r, 1, 1, x, xc, 6, k, y, ldy);
        break;
    case 5:
        qtile(q, w, r, 1, 1, x, xc, 5, k, y, ldy);
        break;
    case 4:
        qtile(q, w, r, 1, 1, x, xc, 4, k, y, ldy);
        break;
    case 3:
        qtile(q, w, r, 1, 1, x, xc, 3, k, y, ldy);
        break;
    case 2:
        qtile(q, w, r, 1, 1, x, xc, 2, k, y, ldy);
        break;
    default:
        qtile(q, w, r, 1, 1, x, xc, 1, k, y, ldy);
        break;
    }
}

/* Tokens [t, t + n) (n <= QCORR_T) of a kernel call: INT4's qgsum8
 * values to cb (QCORR_T x QCORR_G floats, 32-byte aligned, where the groups
 * fit) and xc pointing at them; NULL otherwise. */
QINLINE const float *const *qcorr_chunk(enum moe_quant q, const struct moe_cpu_qw *w,
                                        const float *const *x, int n, int64_t k, float *cb,
                                        const float **xc)
{
    int64_t ng = (k + w->f.bcols - 1) / w->f.bcols;

    if (q != MOE_QUANT_INT4 || ng > QCORR_G)
        return NULL;
    for (int t = 0; t < n; t++) {
        xc[t] = cb + (size_t)t * QCORR_G;
        for (int64_t g0 = 0; g0 < ng; g0 += 8)
            qgsum8(x[t], k, g0, w->f.bcols, cb + (size_t)t * QCORR_G + g0);
    }
    return xc;
}

/* Prefill panels: rows per panel, 32-bit words per panel row, and the
 * tiles' rows and tokens. */
#define QP_ROWS 32
#define QP_STRIDE (MOE_CPU_KBLOCK / 2)
#define QP_R 2
#define QP_T 3

/*
 * Prefill of FP8 and INT8 (qpre): the values of rows [0, n) (n <=
 * QP_ROWS, relative to w->row0) over [kb, ke), decoded once to panel for
 * every token of the call.  Each value qdecode32 makes of them is
 * bf16-exact (its fp32 bits end in 16 zeros: integers of at most 8 bits,
 * FP8's top halves), so the panel keeps them as bf16 pairs, half the
 * bytes: per row and 32 values two vectors, lane l of vector j holding
 * out[2j][l] in its low half and out[2j + 1][l] in its high half (a shift
 * and a mask take them back, as the bf16 kernels do).  Row i at panel + i *
 * QP_STRIDE.
 */
QINLINE void qpanel(enum moe_quant q, const struct moe_cpu_qw *w, int n, int64_t k, int64_t kb,
                    int64_t ke, uint32_t *panel)
{
    for (int i = 0; i < n; i++) {
        const uint8_t *wr = w->w + moe_quant_data_bytes(q, w->row0 + i, k);
        uint32_t *pr = panel + (size_t)i * QP_STRIDE;

        for (int64_t c = kb; c < ke; c += 32) {
            __m256 wv[4];

            qdecode32(q, wr, c, wv);
#pragma GCC unroll 2
            for (int j = 0; j < 2; j++)
                _mm256_store_si256(
                    (__m256i *)(pr + (c - kb) / 2 + 8 * j),
                    _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(wv[2 * j]), 16),
                                    _mm256_castps_si256(wv[2 * j + 1])));
        }
    }
}

/*
 * Prefill, FP8 and INT8: R rows r0, r0 + 1, ... x T tokens over the K
 * block [kb, ke), the values from qpanel's panel (its row 0 being row r0),
 * with the same arithmetic per element as qtile_ over that block: the
 * block's sum added to y[t * ldy + row] (made when kb is 0: 0 + the sum, as
 * qtile_'s).  The panel feeds the FMAs in qtile_'s order (values 0-7, 8-15,
 * 16-23, 24-31 of each 32) into the group's partial sum per (row, token).
 */
QINLINE void qpre_tile(enum moe_quant q, const struct moe_cpu_qw *w, int r0, const int R,
                       const uint32_t *panel, const float *const *x, const int T, int64_t k,
                       int64_t kb, int64_t ke, float *y, int64_t ldy)
{
    const int bc = w->f.bcols;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    int64_t g = kb / bc, gend = (g + 1) * bc;
    const uint8_t *wr[QP_R], *sr[QP_R];
    __m256 acc[QP_R][QP_T], p[QP_R][QP_T], vs[QP_R];

    /* float scales, 4 bytes (the rows' weights come from the panel) */
    qtile_rows(q, w, r0, 1, R, k, 4, wr, sr);
#pragma GCC unroll 2
    for (int i = 0; i < R; i++) {
        vs[i] = _mm256_set1_ps(qscale(q, sr[i], g));
#pragma GCC unroll 3
        for (int t = 0; t < T; t++)
            acc[i][t] = p[i][t] = _mm256_setzero_ps();
    }
    for (int64_t c = kb; c < ke; c += 32) {
        if (c == gend) {
#pragma GCC unroll 2
            for (int i = 0; i < R; i++)
#pragma GCC unroll 3
                for (int t = 0; t < T; t++) {
                    acc[i][t] = _mm256_fmadd_ps(p[i][t], vs[i], acc[i][t]);
                    p[i][t] = _mm256_setzero_ps();
                }
            g++;
            gend += bc;
#pragma GCC unroll 2
            for (int i = 0; i < R; i++)
                vs[i] = _mm256_set1_ps(qscale(q, sr[i], g));
        }
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            __m256 we[QP_R], wo[QP_R];

#pragma GCC unroll 2
            for (int i = 0; i < R; i++) {
                __m256i v = _mm256_load_si256(
                    (const __m256i *)(panel + (size_t)i * QP_STRIDE + (c - kb) / 2 + 8 * j));

                we[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                wo[i] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            }
#pragma GCC unroll 3
            for (int t = 0; t < T; t++) {
                __m256 x0 = _mm256_load_ps(x[t] + c + 16 * j);
                __m256 x1 = _mm256_load_ps(x[t] + c + 16 * j + 8);

#pragma GCC unroll 2
                for (int i = 0; i < R; i++) {
                    p[i][t] = _mm256_fmadd_ps(we[i], x0, p[i][t]);
                    p[i][t] = _mm256_fmadd_ps(wo[i], x1, p[i][t]);
                }
            }
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < R; i++)
#pragma GCC unroll 3
        for (int t = 0; t < T; t++) {
            float *yo = y + (size_t)t * ldy + r0 + i;

            acc[i][t] = _mm256_fmadd_ps(p[i][t], vs[i], acc[i][t]);
            *yo = (kb == 0 ? 0.0f : *yo) + qhsum256(acc[i][t]);
        }
}

/* qpre_tile for R rows x n tokens (1 <= n <= QP_T), n a constant. */
QINLINE void qpre_rows(enum moe_quant q, const struct moe_cpu_qw *w, int r0, const int R,
                       const uint32_t *panel, const float *const *x, int n, int64_t k, int64_t kb,
                       int64_t ke, float *y, int64_t ldy)
{
    switch (n) {
    case 3:
        qpre_tile(q, w, r0, R, panel, x, 3, k, kb, ke, y, ldy);
        break;
    case 2:
        qpre_tile(q, w, r0, R, panel, x, 2, k, kb, ke, y, ldy);
        break;
    default:
        qpre_tile(q, w, r0, R, panel, x, 1, k, kb, ke, y, ldy);
        break;
    }
}

/* The tokens of the next prefill tile, of n left: QP_T, but 2 + 2 rather
 * than 3 + 1 at the end. */
QINLINE int qp_chunk(int n)
{
    return n == 4 ? 2 : MOE_MIN(QP_T, n);
}

/*
 * Prefill of FP8 and INT8, many tokens: per panel of QP_ROWS rows and K
 * block, the rows' values decoded once (qpanel) for all the call's tokens,
 * which take them QP_T at a time (their activations in L1 over the block)
 * in tiles of QP_R rows; then FP8's factor per output.  The arithmetic per
 * element is qtile_'s, so a token gives the same bits here as in a decode
 * call.  (INT4 and MXFP4 scale every 32 values, as many FMAs as the
 * decoding saves: they keep qrow's tiles, measured no slower.)
 */
QINLINE void qpre(enum moe_quant q, const struct moe_cpu_qw *w, int nr, int64_t k,
                  const float *const *x, int nt, float *y, int64_t ldy)
{
    uint32_t panel[QP_ROWS * QP_STRIDE] __attribute__((aligned(32)));

    for (int r0 = 0; r0 < nr; r0 += QP_ROWS) {
        int n = MOE_MIN(QP_ROWS, nr - r0);
        /* the panel's rows, from row 0 */
        struct moe_cpu_qw wp = *w;

        wp.row0 = w->row0 + r0;
        for (int64_t kb = 0; kb < k; kb += MOE_CPU_KBLOCK) {
            int64_t ke = MOE_MIN(k, kb + MOE_CPU_KBLOCK);

            qpanel(q, &wp, n, k, kb, ke, panel);
            for (int t = 0, tt; t < nt; t += tt) {
                float *yt = y + (size_t)t * ldy + r0;
                int i = 0;

                tt = qp_chunk(nt - t);
                for (; i + QP_R <= n; i += QP_R)
                    qpre_rows(q, &wp, i, QP_R, panel + (size_t)i * QP_STRIDE, x + t, tt, k, kb, ke,
                              yt, ldy);
                for (; i < n; i++)
                    qpre_rows(q, &wp, i, 1, panel + (size_t)i * QP_STRIDE, x + t, tt, k, kb, ke, yt,
                              ldy);
            }
        }
    }
    for (int t = 0; q == MOE_QUANT_FP8 && t < nt; t++)
        for (int r = 0; r < nr; r++)
            /* the activations' 2^e (kernels.h, moe_cpu_make_x8) */
            y[(size_t)t * ldy + r] *= x[t][moe_cpu_kpad(k)];
}

/* One format's kernel: tiles over rows and tokens. */
QINLINE void qdot_fmt(enum moe_quant q, const struct moe_cpu_qw *w, int nr, int64_t k,
                      const void *const *xv, int nt, float *y, int64_t ldy, float *cb)
{
    const float *const *x = (const float *const *)xv;
    const float *xcp[QCORR_T];

    if (q == MOE_QUANT_MXFP4 && nt >= 4 && nt <= 6) {
        /* MXFP4, 4 to 6 tokens: its decoding (a lookup) costs more than
         * a second pass over the rows saves, so one row x all the tokens
         * (2026-12-07, 8-token decode, 5 to 1 tokens an expert: 195 ->
         * 166 ms, 1 thread; INT8, FP8 and INT4 no faster) */
        for (int r = 0; r < nr; r++)
            qrow(q, w, r, x, NULL, nt, k, y, ldy);
        return;
    }
    if (nt <= 8) {
        /* 1 token: 4 rows per tile; 2: 3 rows; more: 3 at a time (then 2
         * or 1), 2 rows per tile, the rows (in L2 after the first pass)
         * swept again per chunk; the activations of a chunk are shared by
         * the tile's rows */
        for (int t = 0; t < nt; t += 3) {
            int n = nt == 2 ? 2 : MOE_MIN(3, nt - t);
            const float *const *xt = x + t;
            const float *const *xc = qcorr_chunk(q, w, xt, n, k, cb, xcp);
            float *yt = y + (size_t)t * ldy;

            switch (n) {
            case 3:
                QDEC(q, w, nr, 2, xt, xc, 3, k, yt, ldy);
                break;
            case 2:
                QDEC(q, w, nr, 3, xt, xc, 2, k, yt, ldy);
                break;
            default:
                QDEC(q, w, nr, 4, xt, xc, 1, k, yt, ldy);
                break;
            }
        }
        return;
    }
    if (q == MOE_QUANT_FP8 || q == MOE_QUANT_INT8) {
        qpre(q, w, nr, k, x, nt, y, ldy);
        return;
    }
    /* 6 tokens at a time (the last chunk a tile of its count, a constant
     * for the unrolling), row by row: INT4 chunk by chunk (its qgsum8
     * values shared by the rows), the rest row by row (each row's values
     * decoded from L1 for every chunk) */
    if (q == MOE_QUANT_INT4) {
        for (int t = 0; t < nt; t += QCORR_T) {
            int n = MOE_MIN(QCORR_T, nt - t);
            const float *const *xc = qcorr_chunk(q, w, x + t, n, k, cb, xcp);

            for (int r = 0; r < nr; r++)
                qrow(q, w, r, x + t, xc, n, k, y + (size_t)t * ldy, ldy);
        }
        return;
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t += 6)
            qrow(q, w, r, x + t, NULL, MOE_MIN(6, nt - t), k, y + (size_t)t * ldy, ldy);
}

static void qdot_fp8(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_FP8, w, nr, k, x, nt, y, ldy, NULL);
}

static void qdot_int8(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                      float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_INT8, w, nr, k, x, nt, y, ldy, NULL);
}

static void qdot_int4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                      float *y, int64_t ldy)
{
    float cb[QCORR_T * QCORR_G] __attribute__((aligned(32)));

    qdot_fmt(MOE_QUANT_INT4, w, nr, k, x, nt, y, ldy, cb);
}

static void qdot_mxfp4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x, int nt,
                       float *y, int64_t ldy)
{
    qdot_fmt(MOE_QUANT_MXFP4, w, nr, k, x, nt, y, ldy, NULL);
}

#define MOE_CPU_QDOT_X86                                                                           \
    {                                                                                              \
        NULL, qdot_fp8, qdot_int8, qdot_int4, qdot_mxfp4                                           \
    }

#endif
