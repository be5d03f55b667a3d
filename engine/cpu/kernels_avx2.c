/*
 * AVX2 kernels of the CPU backend (compiled with -mavx2 -mfma -mf16c; only
 * called when the CPU has all three).  Owns no state and takes no locks.
 *
 * Same structure as kernels_avx512.c with 8-lane vectors and 16 registers:
 * register tiles of up to 3 weight rows x 4 tokens (12 accumulators, 3
 * weight registers, 1 activation register; for decode see dec_b16),
 * one 8-lane fp32 accumulator per (row, token), reduced horizontally at the
 * end of each K block.  The 3 x 4 tile does 12 FMAs per 3 weight
 * conversions and 4 activation loads: about 1.25x the 4 x 2 tile's prefill
 * speed per CPU second on a Zen 3 (68% of the FMA peak against 54%,
 * measured).  Every tile does the same arithmetic per element.  Weights
 * are converted to fp32 on load and multiplied with fp32 activations by
 * FMA.  f16: vcvtph2ps, 8 at a time; the prepared layout is plain fp32.
 * bf16: 16 weights per 32-byte load, as 8 dwords each holding an even
 * element in its low half and the next odd one in its high half: a shift
 * left by 16 makes the even elements fp32, masking off the low halves the
 * odd ones, 3 instructions per 16 weights where widening 8 at a time took
 * 6; that matters where decode of a few tokens per expert runs short of
 * instructions rather than of memory bandwidth (2 cores).  The prepared
 * layout for bf16 weights matches: each 16-element block of x as its 8 even
 * elements, then its 8 odd ones (prep_bf16).
 *
 * K tails: AVX2 has no masked 16-bit loads, so the last partial vector of
 * each row is copied into a zero-padded buffer first; no row is read past
 * its end.
 */
#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dtype.h"
#include "kernels.h"
#include "qdot_x86.h"
#include "qdot_a8_x86.h"

#define RMAX 3
#define TMAX 4
/* decode tiles: up to RDEC rows, for up to DMAX tokens */
#define RDEC 4
#define DMAX 6
/* decode tiles' software prefetch distance, elements */
#define DEC_PF 512

#define INLINE static inline __attribute__((always_inline))

enum wtype { W_F32, W_F16, W_BF16 };

typedef moe_cpu_tile_fn tile_fn;

INLINE float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights at p (dtype wt) as fp32. */
INLINE __m256 load_w8(const void *p, enum wtype wt)
{
    switch (wt) {
    case W_BF16:
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    case W_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    default:
        return _mm256_loadu_ps((const float *)p);
    }
}

INLINE void tile(const void *w, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                 float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T,
                 const enum wtype wt)
{
    const size_t esz = wt == W_F32 ? 4 : 2;
    const char *wb = w;
    const float *x[DMAX];
    __m256 acc[RDEC][DMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();

    for (k = k0; k + 8 <= k1; k += 8) {
        __m256 wr[RDEC];

        for (int r = 0; r < R; r++)
            wr[r] = load_w8(wb + (size_t)(r * ldw + k) * esz, wt);
        for (int t = 0; t < T; t++) {
            __m256 xt = _mm256_load_ps(x[t] + k);

            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(wr[r], xt, acc[r][t]);
        }
    }
    if (k < k1) {
        _Alignas(32) unsigned char buf[RDEC][32];
        __m256 wr[RDEC];

        for (int r = 0; r < R; r++) {
            memset(buf[r], 0, sizeof(buf[r]));
            memcpy(buf[r], wb + (size_t)(r * ldw + k) * esz, (size_t)(k1 - k) * esz);
            wr[r] = load_w8(buf[r], wt);
        }
        for (int t = 0; t < T; t++) {
            __m256 xt = _mm256_load_ps(x[t] + k);

            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(wr[r], xt, acc[r][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        for (int r = 0; r < R; r++) {
            float s = hsum256(acc[r][t]);

            y[t * ldy + r * ys] = first ? s : y[t * ldy + r * ys] + s;
        }
    }
}

/* acc[t] += the 16 bf16 weights in v (8 dwords: an even element low, the
 * next odd one high) times x[t]'s prepared block at k (8 even, 8 odd). */
INLINE void fma_b16(__m256i v, const float *const *x, int64_t k, __m256 *acc, const int T)
{
    __m256 ev = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    __m256 od = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));

    for (int t = 0; t < T; t++) {
        acc[t] = _mm256_fmadd_ps(ev, _mm256_load_ps(x[t] + k), acc[t]);
        acc[t] = _mm256_fmadd_ps(od, _mm256_load_ps(x[t] + k + 8), acc[t]);
    }
}

/* The bf16 tile: weights 16 at a time, x prepared even/odd per 16-block
 * (prep_bf16).  Same products and the same order of accumulation for
 * every R and T. */
INLINE void tile_b16(const void *w, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                     float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T)
{
    const uint16_t *wb = w;
    const float *x[DMAX];
    __m256 acc[RDEC][DMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();

    for (k = k0; k + 16 <= k1; k += 16)
        for (int r = 0; r < R; r++)
            fma_b16(_mm256_loadu_si256((const __m256i *)(wb + (size_t)r * ldw + k)), x, k, acc[r],
                    T);
    if (k < k1) {
        /* the last partial block, through a zero-padded copy (x is zero
         * past the row's end) */
        for (int r = 0; r < R; r++) {
            _Alignas(32) uint16_t buf[16] = {0};

            memcpy(buf, wb + (size_t)r * ldw + k, (size_t)(k1 - k) * 2);
            fma_b16(_mm256_load_si256((const __m256i *)buf), x, k, acc[r], T);
        }
    }
    for (int t = 0; t < T; t++) {
        for (int r = 0; r < R; r++) {
            float s = hsum256(acc[r][t]);

            y[t * ldy + r * ys] = first ? s : y[t * ldy + r * ys] + s;
        }
    }
}

/* One 16-element step of dec_b16: w[r] points at row r's 16 weights. */
INLINE void dec_step(const uint16_t *const *w, const float *const *x, int64_t k,
                     __m256 acc[RDEC][DMAX], const int R, const int T)
{
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 cv[RDEC];

    for (int r = 0; r < R; r++)
        cv[r] =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)w[r]), 16));
    for (int t = 0; t < T; t++) {
        __m256 xt = _mm256_load_ps(x[t] + k);

        /* keeps the compiler from folding the load into each FMA */
        __asm__("" : "+x"(xt));
        for (int r = 0; r < R; r++)
            acc[r][t] = _mm256_fmadd_ps(cv[r], xt, acc[r][t]);
    }
    for (int r = 0; r < R; r++)
        cv[r] =
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)w[r]), hi));
    for (int t = 0; t < T; t++) {
        __m256 xt = _mm256_load_ps(x[t] + k + 8);

        __asm__("" : "+x"(xt));
        for (int r = 0; r < R; r++)
            acc[r][t] = _mm256_fmadd_ps(cv[r], xt, acc[r][t]);
    }
}

/* The bf16 decode tile: the same products and order of accumulation as
 * tile_b16, but each 16-weight step converts the R rows' even elements,
 * then loads each token's even activations once for all R rows, then the
 * same for the odd elements: 2R + 2T loads (the odd elements' conversion
 * reloads its row from L1) per 2RT FMAs, where tile_b16 makes 1 + 2T per
 * 2T.  On a Zen 3 that measured 5-8% faster from L2 with 4-6 tokens, but
 * streaming from memory (huge pages) only 5 tokens gained (about 7%; 4
 * tokens about 3% slower than tile_b16's 3 rows, which the registers do
 * not allow here): with the prefetch below, an 8-token decode's dots took
 * 0.98-0.99 of tile_b16's time.  What bounds 4-5 tokens is FMA issue (the
 * R x T accumulator chains), not loads. */
INLINE void dec_b16(const void *w, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                    float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T)
{
    const uint16_t *wb = w;
    const float *x[DMAX];
    const uint16_t *row[RDEC];
    __m256 acc[RDEC][DMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();

    for (k = k0; k + 16 <= k1; k += 16) {
        for (int r = 0; r < R; r++)
            row[r] = wb + (size_t)r * ldw + k;
        /* from 3 tokens, the line 1 KiB ahead (past a row's end, that is
         * the next tile's row, or harmless): about 2% on a Zen 3 with
         * huge pages (6% with 4 KiB pages); none for 1-2 tokens */
        if (T >= 3 && !(k & 31))
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(row[r] + DEC_PF), _MM_HINT_T0);
        dec_step(row, x, k, acc, R, T);
    }
    if (k < k1) {
        /* the last partial block, through zero-padded copies (x is zero
         * past the row's end) */
        _Alignas(32) uint16_t buf[RDEC][16];

        for (int r = 0; r < R; r++) {
            memset(buf[r], 0, sizeof(buf[r]));
            memcpy(buf[r], wb + (size_t)r * ldw + k, (size_t)(k1 - k) * 2);
            row[r] = buf[r];
        }
        dec_step(row, x, k, acc, R, T);
    }
    for (int t = 0; t < T; t++) {
        for (int r = 0; r < R; r++) {
            float s = hsum256(acc[r][t]);

            y[t * ldy + r * ys] = first ? s : y[t * ldy + r * ys] + s;
        }
    }
}

#define DEF_DEC(R, T)                                                                              \
    static void dec_bf16_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,   \
                                   int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)      \
    {                                                                                              \
        dec_b16(w, ldw, x, k0, k1, y, ldy, ys, first, R, T);                                       \
    }

DEF_DEC(4, 1)
DEF_DEC(4, 2)
DEF_DEC(3, 3)
DEF_DEC(2, 4)
DEF_DEC(2, 5)
DEF_DEC(2, 6)

/* f16 and f32 tiles */
#define DEF_TILE_FX(R, T)                                                                          \
    static void tile_f16_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,   \
                                   int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)      \
    {                                                                                              \
        tile(w, ldw, x, k0, k1, y, ldy, ys, first, R, T, W_F16);                                   \
    }                                                                                              \
    static void tile_f32_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,   \
                                   int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)      \
    {                                                                                              \
        tile(w, ldw, x, k0, k1, y, ldy, ys, first, R, T, W_F32);                                   \
    }
#define DEF_TILE(R, T)                                                                             \
    static void tile_bf16_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,  \
                                    int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)     \
    {                                                                                              \
        tile_b16(w, ldw, x, k0, k1, y, ldy, ys, first, R, T);                                      \
    }                                                                                              \
    DEF_TILE_FX(R, T)

DEF_TILE(1, 1)
DEF_TILE(1, 2)
DEF_TILE(1, 3)
DEF_TILE(1, 4)
DEF_TILE(2, 1)
DEF_TILE(2, 2)
DEF_TILE(2, 3)
DEF_TILE(2, 4)
DEF_TILE(3, 1)
DEF_TILE(3, 2)
DEF_TILE(3, 3)
DEF_TILE(3, 4)
DEF_TILE_FX(4, 1)
DEF_TILE_FX(4, 2)
DEF_TILE_FX(2, 5)
DEF_TILE_FX(2, 6)

#define TILE_ROW(D, R)                                                                             \
    {                                                                                              \
        tile_##D##_##R##_1, tile_##D##_##R##_2, tile_##D##_##R##_3, tile_##D##_##R##_4             \
    }
#define TILE_TABLE(D)                                                                              \
    {                                                                                              \
        TILE_ROW(D, 1), TILE_ROW(D, 2), TILE_ROW(D, 3)                                             \
    }

static const tile_fn tiles_bf16[RMAX][TMAX] = TILE_TABLE(bf16);
static const tile_fn tiles_f16[RMAX][TMAX] = TILE_TABLE(f16);
static const tile_fn tiles_f32[RMAX][TMAX] = TILE_TABLE(f32);

/* Decode tiles (see moe_cpu_dot_tiles) by token count: 4 rows for 1-2
 * tokens (more independent FMA chains per weight stream), 3 for 3-4, 2 for
 * 5-6 (an 8-token batch of top-2 of 8 gives experts up to about 5 tokens,
 * which then still stream their weights in long runs).  bf16's (dec_b16):
 * 2 rows for 4 tokens too, since its R x T accumulators, R converted
 * weights and an activation must fit the 16 registers. */
static const int dec_rows[DMAX] = {4, 4, 3, 3, 2, 2};
static const int dec_rows_bf16[DMAX] = {4, 4, 3, 2, 2, 2};
#define DEC_TABLE(D)                                                                               \
    {                                                                                              \
        tile_##D##_4_1, tile_##D##_4_2, tile_##D##_3_3, tile_##D##_3_4, tile_##D##_2_5,            \
            tile_##D##_2_6                                                                         \
    }
static const tile_fn dec_bf16[DMAX] = {dec_bf16_4_1, dec_bf16_4_2, dec_bf16_3_3,
                                       dec_bf16_2_4, dec_bf16_2_5, dec_bf16_2_6};
static const tile_fn dec_f16[DMAX] = DEC_TABLE(f16);
static const tile_fn dec_f32[DMAX] = DEC_TABLE(f32);

#define TILING(D, ESZ, ROWS)                                                                       \
    {                                                                                              \
        .rmax = RMAX, .tmax = TMAX, .esz = ESZ, .tiles = &tiles_##D[0][0], .dmax = DMAX,           \
        .dec = dec_##D, .dec_rows = ROWS,                                                          \
    }
static const struct moe_cpu_tiling tiling_bf16 = TILING(bf16, 2, dec_rows_bf16);
static const struct moe_cpu_tiling tiling_f16 = TILING(f16, 2, dec_rows);
static const struct moe_cpu_tiling tiling_f32 = TILING(f32, 4, dec_rows);

static void dot_bf16(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    moe_cpu_dot_tiles(&tiling_bf16, w, ldw, nr, k, x, nt, y, ldy);
}

static void dot_f16(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                    float *y, int64_t ldy)
{
    moe_cpu_dot_tiles(&tiling_f16, w, ldw, nr, k, x, nt, y, ldy);
}

static void dot_f32(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                    float *y, int64_t ldy)
{
    moe_cpu_dot_tiles(&tiling_f32, w, ldw, nr, k, x, nt, y, ldy);
}

static void prep_f32(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    float *d = dst;
    int64_t i = 0;

    for (; i + 8 <= n; i += 8)
        _mm256_store_ps(d + i, _mm256_loadu_ps(src + i));
    for (; i < n; i++)
        d[i] = src[i];
    for (; i < n_pad; i++)
        d[i] = 0.0f;
}

/* bf16 weights' layout: each 16-element block as its even elements, then
 * its odd ones (tile_b16); zeros past n. */
static void prep_bf16(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    float *d = dst;
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        /* a = x0..x7, b = x8..x15: evens of a and b, then odds of both */
        __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + i), even);
        __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + i + 8), even);

        _mm256_store_ps(d + i, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_store_ps(d + i + 8, _mm256_permute2f128_ps(a, b, 0x31));
    }
    for (; i < n_pad; i += 16) {
        for (int j = 0; j < 16; j++) {
            int64_t e = i + j;
            float v = e < n ? src[e] : 0.0f;

            d[i + (j & 1 ? 8 + j / 2 : j / 2)] = v;
        }
    }
}

/* exp(x), Cephes expf (about 1 ulp); x clamped to [-87.3, 88.7] so that the
 * exponent 2^n can be built directly (exp(-87.3) ~ 1e-38 stands for 0). */
INLINE __m256 exp256(__m256 x)
{
    __m256 n, r, p;
    __m256i e;

    x = _mm256_min_ps(x, _mm256_set1_ps(88.7f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* n in [-126, 128]: 2^n split as 2^(n/2) * 2^(n - n/2) to stay normal. */
    e = _mm256_cvtps_epi32(n);
    {
        __m256i h = _mm256_srai_epi32(e, 1);
        __m256 s1 =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
        __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_sub_epi32(e, h), _mm256_set1_epi32(127)), 23));

        return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    }
}

static void swiglu(const float *g, const float *u, int64_t n, float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));

        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void swiglu_clamp(const float *g, const float *u, int64_t n, float alpha, float limit,
                         float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit);
    const __m256 nlim = _mm256_set1_ps(-limit), na = _mm256_set1_ps(-alpha);
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_min_ps(_mm256_loadu_ps(g + i), lim);
        __m256 uv = _mm256_max_ps(_mm256_min_ps(_mm256_loadu_ps(u + i), lim), nlim);
        __m256 e = exp256(_mm256_mul_ps(na, gv));
        __m256 glu = _mm256_div_ps(gv, _mm256_add_ps(one, e));

        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_add_ps(uv, one), glu));
    }
    for (; i < n; i++)
        out[i] = moe_cpu_swiglu_clamp1(g[i], u[i], alpha, limit);
}

/* Rounds to bf16 (to nearest even) as moe_f32_to_bf16 does, NaNs kept
 * quiet, returned as fp32. */
INLINE __m256 round_b16(__m256 x)
{
    const __m256i top = _mm256_set1_epi32((int)0xffff0000u);
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), top);
    __m256i q = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), top);

    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q),
                            _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

static void round_f32(void *prepared, int64_t n_pad)
{
    float *p = prepared;

    /* n_pad is a multiple of MOE_CPU_KPAD, p 64-byte aligned */
    for (int64_t i = 0; i < n_pad; i += 8)
        _mm256_store_ps(p + i, round_b16(_mm256_load_ps(p + i)));
}

static void swiglu_b16(const float *g, const float *u, int64_t n, float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 gv = round_b16(_mm256_loadu_ps(g + i));
        __m256 uv = round_b16(_mm256_loadu_ps(u + i));
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        /* swiglu's silu: g / (1 + e) * 1 */
        __m256 s = round_b16(_mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), one));

        _mm256_storeu_ps(out + i, round_b16(_mm256_mul_ps(s, uv)));
    }
    for (; i < n; i++) {
        float gi = moe_bf16_to_f32(moe_f32_to_bf16(g[i]));
        float ui = moe_bf16_to_f32(moe_f32_to_bf16(u[i]));
        float s = moe_bf16_to_f32(moe_f32_to_bf16(gi / (1.0f + expf(-gi)) * 1.0f));

        out[i] = moe_bf16_to_f32(moe_f32_to_bf16(s * ui));
    }
}

const struct moe_cpu_kernel moe_cpu_kernel_avx2 = {
    .name = "avx2",
    .prep = {prep_f32, prep_f32, prep_bf16},
    .dot = {dot_f32, dot_f16, dot_bf16},
    .round = {round_f32, round_f32, round_f32},
    .dot_b16 = {dot_f32, dot_f16, dot_bf16},
    .swiglu = swiglu,
    .swiglu_clamp = swiglu_clamp,
    .swiglu_b16 = swiglu_b16,
    .qdot = MOE_CPU_QDOT_X86,
    .qdot_a8 = MOE_CPU_QDOT_A8_X86,
};
