/*
 * The quantized dot kernels on int8 activations (prepared by kernels.h's
 * moe_cpu_prep_a8; struct moe_cpu_kernel's qdot_a8: MOE_CPU_QDOT_A8_X86)
 * for INT8, INT4 and MXFP4 weights, in AVX2 + FMA + F16C, included by
 * kernels_avx2.c and kernels_avx512.c after qdot_x86.h, whose helpers
 * (QINLINE, qhsum256, qscale, qoff with qa8_off8) they use.  No state, no
 * locks.
 *
 * Per block of 32 the weights and the int8 activations are multiplied by
 * vpmaddubsw and vpmaddwd (vpdpbusd where the including file is compiled
 * with AVX-512 VNNI: qa8_dot4), exactly in int32, then scaled in fp32 by the
 * block's d times the group's scale (qtile_a8_ says how); INT4 and MXFP4
 * take off their offset at the end of the row (qoff).  Tiles as
 * qdot_x86.h's: 4 x 1, 3 x 2 and 2 x 3 for decode, then 1 x 6 chunks of
 * tokens for prefill, with the same arithmetic per output element in each.
 */
#ifndef MOED_ENGINE_CPU_QDOT_A8_X86_H
#define MOED_ENGINE_CPU_QDOT_A8_X86_H

#include <immintrin.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "qdot_x86.h"
#include "quant.h"

/* int8 activations: the scales d of blocks [b0, b0 + 8) of x[0, k) (those
 * from k / 32 on 0), to dst[8]. */
QINLINE void qa8_d8(const uint8_t *x, int64_t k, int64_t b0, float *dst)
{
    for (int j = 0; j < 8; j++) {
        dst[j] = 0.0f;
        if ((b0 + j) * 32 < k)
            memcpy(&dst[j], x + (b0 + j) * MOE_CPU_A8_BLOCK + MOE_CPU_A8_SCALE, 4);
    }
}

/* Per token, what the tiles take from the call (kernels.h's layout,
 * gathered): the blocks' scales d (qa8_d8, nb8 = ceil(k / 256) x 8 of
 * them), then INT4's offsets per group (qa8_off8, ceil(ng / 8) x 8). */
QINLINE int64_t qa8_nb8(int64_t k)
{
    return (k + 255) / 256 * 8;
}

QINLINE int64_t qa8_stride(enum moe_quant q, int64_t k, int bc)
{
    return qa8_nb8(k) + (q != MOE_QUANT_INT8 ? ((k + bc - 1) / bc + 7) / 8 * 8 : 0);
}

/* Those of n tokens' rows, token t's at xc + t * qa8_stride(). */
QINLINE void qa8_prep(enum moe_quant q, const uint8_t *const *x, int n, int64_t k, int bc,
                      float *xc)
{
    int64_t ng = (k + bc - 1) / bc, nb8 = qa8_nb8(k), xs = qa8_stride(q, k, bc);

    for (int t = 0; t < n; t++) {
        for (int64_t b0 = 0; b0 < nb8; b0 += 8)
            qa8_d8(x[t], k, b0, xc + t * xs + b0);
        if (q != MOE_QUANT_INT8)
            for (int64_t g0 = 0; g0 < ng; g0 += 8)
                qa8_off8(x[t], k, g0, bc, xc + t * xs + nb8 + g0);
    }
}

/* The group scales of row sr's blocks [c0 / 32, c0 / 32 + 8) (the first nb
 * of them in the row, the rest repeating the last), as qscale.  gp: for
 * float scales in groups of 64, 128 or 256 columns, log2(bc), and gi each
 * block's group less the first's (c0 a multiple of 256); -1 otherwise. */
QINLINE __m256 qa8_vs8(enum moe_quant sq, const uint8_t *sr, int64_t c0, int nb, int bc, int64_t sc,
                       int gp, __m256i gi)
{
    float v[8];

    if (nb == 8 && sq != MOE_QUANT_MXFP4) {
        if (bc == 32)
            return _mm256_loadu_ps((const float *)sr + c0 / 32);
        if (gp >= 0) {
            int64_t g0 = c0 >> gp;
            __m256 s = g0 + 8 <= sc
                           ? _mm256_loadu_ps((const float *)sr + g0)
                           : _mm256_maskload_ps(
                                 (const float *)sr + g0,
                                 _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(sc - g0)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));

            return _mm256_permutevar8x32_ps(s, gi);
        }
    }
    if (nb == 8 && bc == 32)
        return _mm256_mul_ps(
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sr + c0 / 32))), 23)),
            _mm256_set1_ps(0.5f));
    for (int j = 0; j < 8; j++)
        v[j] = qscale(sq, sr, (c0 + 32 * MOE_MIN(j, nb - 1)) / bc);
    return _mm256_loadu_ps(v);
}

/* Each dword of u times s: the sum of its 4 products of an unsigned byte of
 * u and a signed byte of s, in int32.  Where the kernels are compiled with
 * AVX-512 VNNI (kernels_avx512.c), one vpdpbusd; else vpmaddubsw (pairs, to
 * 16 bits with saturation) and vpmaddwd by ones.  The same sums either way:
 * the bytes here keep every pair of products under 2^15 (u at most 128,
 * |s| at most 127). */
QINLINE __m256i qa8_dot4(__m256i u, __m256i s)
{
#ifdef __AVX512VNNI__
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Per call, on the stack (48 KiB): qa8_prep for as many tokens as fit;
 * beyond (more than QA8_C / 6 floats per token for prefill, QA8_C / nt
 * for decode), each tile computes them. */
#define QA8_C 12288

/*
 * int8 activations (kernels.h, moe_cpu_prep_a8): R rows r, r + rs, ... x T
 * tokens, INT8, INT4 or MXFP4 weights, as qtile.  Per block of 32: the
 * weights as 32 bytes in the activations' order (int4 and MXFP4: the low
 * nibbles, then the high ones, against the activations' even, then odd
 * elements; int8: as stored, against the activations in order),
 * multiplied with the int8 activations by qa8_dot4 (int8: |w| times x
 * with w's sign; int4: the nibble, unsigned 0..15; MXFP4: looked up as 2 x
 * e2m1 + 12, 0..24): exact in int32 (|sums| < 2^15 per pair);
 * converted and FMA'd into the accumulator with the block's factor: the
 * activations' scale d times the group's scale (MXFP4's e8m0 times 0.5),
 * rounded once, made for 8 blocks at a time (qa8_vs8 times the tokens' d,
 * to the stack: per 32 values and token one FMA, its factor a broadcast
 * load).  INT4 and MXFP4 then take off their offset (8, 12) at the end of
 * the row: the dot of the group scales with the groups' sums of the
 * blocks' 8 x sum(q) x d (times 1.5 for MXFP4).  xc (from the call,
 * qa8_prep: token t's at t * xcs): the d and the offsets gathered; NULL:
 * gathered here.
 */
QINLINE void qtile_a8_(enum moe_quant q, const struct moe_cpu_qw *w, int r, int rs, const int R,
                       const uint8_t *const *x, const bool XC, const float *xc, int64_t xcs,
                       const int T, int64_t k, float *y, int64_t ldy)
{
    const int64_t sc = (k + w->f.bcols - 1) / w->f.bcols;
    const int bc = w->f.bcols;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    /* 2 x e2m1 + 12, 0..24 */
    const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                         12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    /* the scales: MXFP4's e8m0 (qscale folds in the lookup's 0.5), else
     * float32 as stored */
    const enum moe_quant sq = q == MOE_QUANT_MXFP4 ? MOE_QUANT_MXFP4 : MOE_QUANT_INT8;
    const size_t ss = q == MOE_QUANT_MXFP4 ? 1 : 4;
    /* the activations' bytes: in order for INT8, else even then odd */
    const int xo = q == MOE_QUANT_INT8 ? MOE_CPU_A8_SEQ : 0;
    /* qa8_vs8's gp and gi */
    const int gp = q != MOE_QUANT_MXFP4 && (bc == 64 || bc == 128 || bc == 256)
                       ? __builtin_ctz((unsigned)bc)
                       : -1;
    const __m256i gi = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(gp >= 0 ? gp - 5 : 0));
    const uint8_t *wr[6], *sr[6];
    float sum[6][6] = {{0}};

    qtile_rows(q, w, r, rs, R, k, ss, wr, sr);
    for (int64_t kb = 0; kb < k; kb += MOE_CPU_KBLOCK) {
        int64_t ke = MOE_MIN(k, kb + MOE_CPU_KBLOCK);
        __m256 acc[6][6];

#pragma GCC unroll 6
        for (int i = 0; i < R; i++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                acc[i][t] = _mm256_setzero_ps();
        for (int64_t c0 = kb; c0 < ke; c0 += 256) {
            /* 8 blocks: each's factor, d times the group's scale */
            const int nb = (int)MOE_MIN(8, (ke - c0) / 32);
            float f[6][6][8] __attribute__((aligned(32)));
            __m256 dv[6];

#pragma GCC unroll 6
            for (int t = 0; t < T; t++) {
                if (XC) {
                    dv[t] = _mm256_load_ps(xc + t * xcs + c0 / 32);
                } else {
                    float db[8];

                    qa8_d8(x[t], k, c0 / 32, db);
                    dv[t] = _mm256_loadu_ps(db);
                }
            }
#pragma GCC unroll 6
            for (int i = 0; i < R; i++) {
                __m256 vs = qa8_vs8(sq, sr[i], c0, nb, bc, sc, gp, gi);

#pragma GCC unroll 6
                for (int t = 0; t < T; t++)
                    _mm256_store_ps(f[i][t], _mm256_mul_ps(vs, dv[t]));
            }
            for (int j = 0; j < nb; j++) {
                const int64_t c = c0 + 32 * j;
                const uint8_t *xb[6];

#pragma GCC unroll 6
                for (int t = 0; t < T; t++)
                    xb[t] = x[t] + c / 32 * MOE_CPU_A8_BLOCK;
#pragma GCC unroll 6
                for (int i = 0; i < R; i++) {
                    __m256i wv, ws = _mm256_setzero_si256();

                    if (q == MOE_QUANT_INT4 || q == MOE_QUANT_MXFP4) {
                        /* 16 bytes in both halves, the high half shifted
                         * right by 4: the low nibbles, then the high ones */
                        __m256i b = _mm256_and_si256(
                            _mm256_srlv_epi64(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                                  (const __m128i *)(wr[i] + c / 2))),
                                              _mm256_setr_epi64x(0, 0, 4, 4)),
                            m4);

                        wv = q == MOE_QUANT_INT4 ? b : _mm256_shuffle_epi8(lut, b);
                    } else {
                        ws = _mm256_loadu_si256((const __m256i *)(wr[i] + c));
                        wv = _mm256_abs_epi8(ws);
                    }
#pragma GCC unroll 6
                    for (int t = 0; t < T; t++) {
                        __m256i xq = _mm256_load_si256((const __m256i *)(xb[t] + xo)), d;

                        if (q != MOE_QUANT_INT8)
                            d = qa8_dot4(wv, xq);
                        else
                            d = qa8_dot4(wv, _mm256_sign_epi8(xq, ws));
                        acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d),
                                                    _mm256_broadcast_ss(&f[i][t][j]), acc[i][t]);
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
    if (q != MOE_QUANT_INT8) {
        /* the offset (MXFP4's 12 is 1.5 x INT4's 8) */
        const float *ec[6] = {NULL};

#pragma GCC unroll 6
        for (int t = 0; t < T && XC; t++)
            ec[t] = xc + t * xcs + qa8_nb8(k);
        qoff(sq, sr, R, (const void *const *)x, XC ? ec : NULL, true, T, k, bc,
             q == MOE_QUANT_MXFP4 ? -1.5f : -1.0f, sum);
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++)
            y[(size_t)t * ldy + r + (int64_t)i * rs] = sum[i][t];
}

/* qtile_a8_ with xc (qa8_prep's values for its tokens) or without (NULL). */
QINLINE void qtile_a8(enum moe_quant q, const struct moe_cpu_qw *w, int r, int rs, const int R,
                      const uint8_t *const *x, const float *xc, int64_t xcs, const int T, int64_t k,
                      float *y, int64_t ldy)
{
    if (xc)
        qtile_a8_(q, w, r, rs, R, x, true, xc, xcs, T, k, y, ldy);
    else
        qtile_a8_(q, w, r, rs, R, x, false, NULL, 0, T, k, y, ldy);
}

#define QDEC_A8(q, w, nr, R, x, xc, xcs, T, k, y, ldy)                                             \
    do {                                                                                           \
        int s_ = (nr) / (R), r_ = 0;                                                               \
                                                                                                   \
        for (; r_ < s_; r_++)                                                                      \
            qtile_a8(q, w, r_, s_, R, x, xc, xcs, T, k, y, ldy);                                   \
        for (r_ = s_ * (R); r_ < (nr); r_++)                                                       \
            qtile_a8(q, w, r_, 1, 1, x, xc, xcs, T, k, y, ldy);                                    \
    } while (0)

/* Prefill: row r x n tokens (1 <= n <= 6), n made a constant. */
QINLINE void qrow_a8(enum moe_quant q, const struct moe_cpu_qw *w, int r, const uint8_t *const *x,
                     const float *xc, int64_t xcs, int n, int64_t k, float *y, int64_t ldy)
{
    switch (n) {
    case 6:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 6, k, y, ldy);
        break;
    case 5:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 5, k, y, ldy);
        break;
    case 4:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 4, k, y, ldy);
        break;
    case 3:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 3, k, y, ldy);
        break;
    case 2:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 2, k, y, ldy);
        break;
    default:
        qtile_a8(q, w, r, 1, 1, x, xc, xcs, 1, k, y, ldy);
        break;
    }
}

/* The int8-activation kernel of one format: decode tiles as qdot_fmt's,
 * then 1 row x up to 6 tokens, row by row within chunks of tokens whose
 * qa8_prep values fit on the stack (all of them where they do not). */
QINLINE void qdot_a8_fmt(enum moe_quant q, const struct moe_cpu_qw *w, int nr, int64_t k,
                         const void *const *xv, int nt, float *y, int64_t ldy)
{
    const uint8_t *const *x = (const uint8_t *const *)xv;
    float cb[QA8_C] __attribute__((aligned(32)));
    /* tokens whose qa8_prep values fit in cb at once */
    const int64_t xcs = qa8_stride(q, k, w->f.bcols), fit = QA8_C / xcs;

    if (nt <= 8) {
        /* as qdot_fmt */
        const float *xc = NULL;

        if (fit >= nt) {
            qa8_prep(q, x, nt, k, w->f.bcols, cb);
            xc = cb;
        }
        for (int t = 0; t < nt; t += 3) {
            const uint8_t *const *xt = x + t;
            const float *xct = xc ? xc + t * xcs : NULL;
            float *yt = y + (size_t)t * ldy;

            switch (MOE_MIN(3, nt - t)) {
            case 3:
                QDEC_A8(q, w, nr, 2, xt, xct, xcs, 3, k, yt, ldy);
                break;
            case 2:
                QDEC_A8(q, w, nr, 3, xt, xct, xcs, 2, k, yt, ldy);
                break;
            default:
                QDEC_A8(q, w, nr, 4, xt, xct, xcs, 1, k, yt, ldy);
                break;
            }
        }
        return;
    }
    for (int t0 = 0; t0 < nt;) {
        /* a chunk of whole 6s of tokens whose values fit, or all */
        int n = fit >= 6 ? (int)MOE_MIN(nt - t0, fit / 6 * 6) : nt - t0;
        const float *xc = NULL;

        if (fit >= 6) {
            qa8_prep(q, x + t0, n, k, w->f.bcols, cb);
            xc = cb;
        }
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < n; t += 6)
                qrow_a8(q, w, r, x + t0 + t, xc ? xc + t * xcs : NULL, xcs, MOE_MIN(6, n - t), k,
                        y + (size_t)(t0 + t) * ldy, ldy);
        t0 += n;
    }
}

static void qdot_a8_int8(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x,
                         int nt, float *y, int64_t ldy)
{
    qdot_a8_fmt(MOE_QUANT_INT8, w, nr, k, x, nt, y, ldy);
}

static void qdot_a8_int4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x,
                         int nt, float *y, int64_t ldy)
{
    qdot_a8_fmt(MOE_QUANT_INT4, w, nr, k, x, nt, y, ldy);
}

static void qdot_a8_mxfp4(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x,
                          int nt, float *y, int64_t ldy)
{
    qdot_a8_fmt(MOE_QUANT_MXFP4, w, nr, k, x, nt, y, ldy);
}

#define MOE_CPU_QDOT_A8_X86                                                                        \
    {                                                                                              \
        NULL, NULL, qdot_a8_int8, qdot_a8_int4, qdot_a8_mxfp4                                      \
    }

#endif
