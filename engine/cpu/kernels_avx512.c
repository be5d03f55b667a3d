/*
 * AVX-512 kernels of the CPU backend (compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mf16c -mfma; only called
 * when the CPU has all of them: every CPU with AVX-512 BF16 so far, Intel
 * Cooper Lake and Sapphire Rapids on, AMD Zen 4 on, has VNNI too).  Owns no
 * state and takes no locks.  The quantized kernels are qdot_x86.h's and
 * qdot_a8_x86.h's (AVX2 code), the latter multiplying int8 activations by
 * vpdpbusd here.
 *
 * Dot products use the dot-product formulation: a register tile of R weight
 * rows x T tokens keeps one 16-lane accumulator per (row, token), the inner
 * loop walks K, and each accumulator is reduced horizontally at the end of a
 * K block.  Weights are read straight from their row-major storage (no
 * packing), so a decode call streams every weight once, and a prefill call
 * reuses each weight vector loaded into a register for T tokens and each
 * token vector for R rows.
 *
 * BF16 weights, exact activations: each 32-bit lane of a 64-byte load holds
 * an even element low and the next odd one high, so a shift makes 16 even
 * elements fp32 and a mask the 16 odd ones; they multiply fp32 activations
 * prepared as each 32-element block's even elements, then its odd ones, by
 * FMA: fp32 products and sums, as the AVX2 and generic kernels.  (Until
 * 2026-12 this path split x into two bf16 halves for vdpbf16ps, which kept
 * 16 of x's 24 bits: 30x the AVX2 kernel's error, and on a Xeon (Sapphire
 * Rapids, KVM) vdpbf16ps issued at 0.6x the FMA rate, measured, so the two
 * instructions per 32 weights and token cost more than the two FMAs.)
 * compute_precision bf16 rounds x to bf16 (round_bf16 stores the block's 32
 * bf16 values in order) and its tiles (b16h) multiply by vdpbf16ps, one
 * instruction per 32 weights and token.
 *
 * F16 and F32 weights: converted to fp32 on load (vcvtph2ps) and multiplied
 * with fp32 activations by FMA; the prepared layout is plain fp32.
 *
 * K tails are read with masked loads (which never fault), so no row is read
 * past its end; the prepared activations are zero there.
 */
#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "qdot_x86.h"
#include "qdot_a8_x86.h"

/* Register tile: up to RMAX rows x TMAX tokens (24 accumulators, 4 weight
 * registers, 1-2 activation registers out of 32). */
#define RMAX 4
#define TMAX 6
/* Decode tiles (see dot_tiles) have up to RDEC rows. */
#define RDEC 6

#define INLINE static inline __attribute__((always_inline))

typedef moe_cpu_tile_fn tile_fn;

/* Stores the horizontal sums of acc[r][t] into y, or adds them. */
#define TILE_STORE(R, T)                                                                           \
    do {                                                                                           \
        _Pragma("GCC unroll 8") for (int t = 0; t < (T); t++)                                      \
        {                                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < (R); r++)                                  \
            {                                                                                      \
                float s = _mm512_reduce_add_ps(acc[r][t]);                                         \
                y[t * ldy + r * ys] = first ? s : y[t * ldy + r * ys] + s;                         \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* ---- bf16 weights, exact: widened in registers, FMA -------------------- */

/* One 32-element step of tile_bf16: w[r] points at row r's 32 weights (the
 * first n of them when tail, n < 32).  Each 32-bit lane holds an even
 * element low and the next odd one high: a shift makes the even elements
 * fp32, a mask the odd ones.  Converts the R rows' even elements, then
 * loads each token's even activations once for all R rows; then the odd
 * ones.  acc[r][t] takes the even product, then the odd one, in every tile. */
INLINE void b16_step(const uint16_t *const *w, const float *const *x, int64_t k,
                     __m512 acc[RDEC][TMAX], const int R, const int T, bool tail, int n)
{
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512i v[RDEC];
    __m512 cv[RDEC];

    for (int r = 0; r < R; r++)
        v[r] = tail ? _mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), w[r])
                    : _mm512_loadu_si512(w[r]);
    for (int r = 0; r < R; r++)
        cv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v[r], 16));
    for (int t = 0; t < T; t++) {
        __m512 xt = _mm512_load_ps(x[t] + k);

        for (int r = 0; r < R; r++)
            acc[r][t] = _mm512_fmadd_ps(cv[r], xt, acc[r][t]);
    }
    for (int r = 0; r < R; r++)
        cv[r] = _mm512_castsi512_ps(_mm512_and_si512(v[r], hi));
    for (int t = 0; t < T; t++) {
        __m512 xt = _mm512_load_ps(x[t] + k + 16);

        for (int r = 0; r < R; r++)
            acc[r][t] = _mm512_fmadd_ps(cv[r], xt, acc[r][t]);
    }
}

/* bf16 weights against fp32 activations prepared even/odd per 32-element
 * block (prep_bf16): the products and sums of fp32 FMA, exact given x. */
INLINE void tile_bf16(const void *wv, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                      float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T)
{
    const uint16_t *wr[RDEC];
    const float *x[TMAX];
    __m512 acc[RDEC][TMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();
    for (k = k0; k + 32 <= k1; k += 32) {
        for (int r = 0; r < R; r++)
            wr[r] = (const uint16_t *)wv + r * ldw + k;
        b16_step(wr, x, k, acc, R, T, false, 32);
    }
    if (k < k1) {
        for (int r = 0; r < R; r++)
            wr[r] = (const uint16_t *)wv + r * ldw + k;
        b16_step(wr, x, k, acc, R, T, true, (int)(k1 - k));
    }
    TILE_STORE(R, T);
}

/* ---- bf16 weights, bf16 activations: vdpbf16ps ----------------------------- */

/* compute_precision bf16: x rounded to bf16 by round_bf16, 32 of them per
 * block in order (then 32 unused); vdpbf16ps multiplies bf16 pairs exactly
 * and accumulates in fp32, one instruction per 32 weights and token where
 * the exact tile takes two FMAs. */
INLINE void tile_b16h(const void *wv, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                      float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T)
{
    const uint16_t *w = wv;
    const uint16_t *x[TMAX];
    __m512 acc[RDEC][TMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();

    for (k = k0; k < k1; k += 32) {
        __mmask32 m = k + 32 <= k1 ? (__mmask32)~0u : (__mmask32)((1u << (k1 - k)) - 1);
        __m512i wr[RDEC];

        for (int r = 0; r < R; r++)
            wr[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + k);
        for (int t = 0; t < T; t++) {
            __m512i xh = _mm512_load_si512(x[t] + 2 * k);

            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wr[r], (__m512bh)xh);
        }
    }
    TILE_STORE(R, T);
}

/* ---- f16 and f32 weights: convert to fp32, FMA ---------------------------- */

INLINE __m512 load_w16(const void *w, int64_t i, bool is_f16)
{
    if (is_f16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    return _mm512_loadu_ps((const float *)w + i);
}

INLINE __m512 load_w16_tail(const void *w, int64_t i, __mmask16 m, bool is_f16)
{
    if (is_f16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i));
    return _mm512_maskz_loadu_ps(m, (const float *)w + i);
}

INLINE void tile_fma(const void *w, int64_t ldw, const void *const *xv, int64_t k0, int64_t k1,
                     float *y, int64_t ldy, int64_t ys, bool first, const int R, const int T,
                     const bool is_f16)
{
    const float *x[TMAX];
    __m512 acc[RDEC][TMAX];
    int64_t k;

    for (int t = 0; t < T; t++)
        x[t] = xv[t];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();

    for (k = k0; k + 16 <= k1; k += 16) {
        __m512 wr[RDEC];

        for (int r = 0; r < R; r++)
            wr[r] = load_w16(w, r * ldw + k, is_f16);
        for (int t = 0; t < T; t++) {
            __m512 xt = _mm512_load_ps(x[t] + k);

            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_fmadd_ps(wr[r], xt, acc[r][t]);
        }
    }
    if (k < k1) {
        __mmask16 m = (__mmask16)((1u << (k1 - k)) - 1);
        __m512 wr[RDEC];

        for (int r = 0; r < R; r++)
            wr[r] = load_w16_tail(w, r * ldw + k, m, is_f16);
        for (int t = 0; t < T; t++) {
            __m512 xt = _mm512_load_ps(x[t] + k);

            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_fmadd_ps(wr[r], xt, acc[r][t]);
        }
    }
    TILE_STORE(R, T);
}

/* One non-inlined function per (dtype, R, T). */
#define DEF_TILE(R, T)                                                                             \
    static void tile_bf16_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,  \
                                    int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)     \
    {                                                                                              \
        tile_bf16(w, ldw, x, k0, k1, y, ldy, ys, first, R, T);                                     \
    }                                                                                              \
    static void tile_b16h_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,  \
                                    int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)     \
    {                                                                                              \
        tile_b16h(w, ldw, x, k0, k1, y, ldy, ys, first, R, T);                                     \
    }                                                                                              \
    static void tile_f16_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,   \
                                   int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)      \
    {                                                                                              \
        tile_fma(w, ldw, x, k0, k1, y, ldy, ys, first, R, T, true);                                \
    }                                                                                              \
    static void tile_f32_##R##_##T(const void *w, int64_t ldw, const void *const *x, int64_t k0,   \
                                   int64_t k1, float *y, int64_t ldy, int64_t ys, bool first)      \
    {                                                                                              \
        tile_fma(w, ldw, x, k0, k1, y, ldy, ys, first, R, T, false);                               \
    }

#define DEF_TILE_ROW(R)                                                                            \
    DEF_TILE(R, 1) DEF_TILE(R, 2) DEF_TILE(R, 3) DEF_TILE(R, 4) DEF_TILE(R, 5) DEF_TILE(R, 6)
DEF_TILE_ROW(1)
DEF_TILE_ROW(2)
DEF_TILE_ROW(3)
DEF_TILE_ROW(4)
DEF_TILE(6, 2)
DEF_TILE(6, 3)
DEF_TILE(5, 4)

#define TILE_ROW(D, R)                                                                             \
    {                                                                                              \
        tile_##D##_##R##_1, tile_##D##_##R##_2, tile_##D##_##R##_3, tile_##D##_##R##_4,            \
            tile_##D##_##R##_5, tile_##D##_##R##_6                                                 \
    }
#define TILE_TABLE(D)                                                                              \
    {                                                                                              \
        TILE_ROW(D, 1), TILE_ROW(D, 2), TILE_ROW(D, 3), TILE_ROW(D, 4)                             \
    }

static const tile_fn tiles_bf16[RMAX][TMAX] = TILE_TABLE(bf16);
static const tile_fn tiles_b16h[RMAX][TMAX] = TILE_TABLE(b16h);
static const tile_fn tiles_f16[RMAX][TMAX] = TILE_TABLE(f16);
static const tile_fn tiles_f32[RMAX][TMAX] = TILE_TABLE(f32);

/* Decode tiles by token count: rows per tile and the tile.  More rows for 2-4
 * tokens cut the activation reloads per weight byte (measured: ~5-8% more
 * bandwidth at 3-4 tokens); 4 rows are best for 1 token. */
static const int dec_rows[TMAX] = {4, 6, 6, 5, 4, 4};
#define DEC_TABLE(D)                                                                               \
    {                                                                                              \
        tile_##D##_4_1, tile_##D##_6_2, tile_##D##_6_3, tile_##D##_5_4, tile_##D##_4_5,            \
            tile_##D##_4_6                                                                         \
    }
static const tile_fn dec_bf16[TMAX] = DEC_TABLE(bf16);
static const tile_fn dec_b16h[TMAX] = DEC_TABLE(b16h);
static const tile_fn dec_f16[TMAX] = DEC_TABLE(f16);
static const tile_fn dec_f32[TMAX] = DEC_TABLE(f32);

#define TILING(D, ESZ)                                                                             \
    {                                                                                              \
        .rmax = RMAX, .tmax = TMAX, .esz = ESZ, .tiles = &tiles_##D[0][0], .dmax = TMAX,           \
        .dec = dec_##D, .dec_rows = dec_rows,                                                      \
    }
static const struct moe_cpu_tiling tiling_bf16 = TILING(bf16, 2);
static const struct moe_cpu_tiling tiling_b16h = TILING(b16h, 2);
static const struct moe_cpu_tiling tiling_f16 = TILING(f16, 2);
static const struct moe_cpu_tiling tiling_f32 = TILING(f32, 4);

static void dot_bf16(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    moe_cpu_dot_tiles(&tiling_bf16, w, ldw, nr, k, x, nt, y, ldy);
}

/* bf16 weights against rows rounded by round_bf16 (lo halves zero). */
static void dot_b16h(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x, int nt,
                     float *y, int64_t ldy)
{
    moe_cpu_dot_tiles(&tiling_b16h, w, ldw, nr, k, x, nt, y, ldy);
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

/* ---- activation preparation --------------------------------------------- */

INLINE __m512 load_src(const float *src, int64_t i, int64_t n)
{
    if (i + 16 <= n)
        return _mm512_loadu_ps(src + i);
    if (i >= n)
        return _mm512_setzero_ps();
    return _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1), src + i);
}

/* bf16 weights' layout (tile_bf16): each 32-element block as its 16 even
 * elements, then its 16 odd ones, fp32; zeros past n. */
static void prep_bf16(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    float *d = dst;

    for (int64_t i = 0; i < n_pad; i += 32) {
        __m512 a0 = load_src(src, i, n);
        __m512 a1 = load_src(src, i + 16, n);

        _mm512_store_ps(d + i, _mm512_permutex2var_ps(a0, even, a1));
        _mm512_store_ps(d + i + 16, _mm512_permutex2var_ps(a0, odd, a1));
    }
}

/* compute_precision bf16: each block of a prep_bf16 row rounded to bf16
 * (to nearest even) and stored as tile_b16h reads it, in place: its 32
 * values in order, then 32 zeros. */
static void round_bf16(void *prepared, int64_t n_pad)
{
    float *d = prepared;

    for (int64_t i = 0; i < n_pad; i += 32) {
        __m512i ev = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(d + i)));
        __m512i od = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(d + i + 16)));

        _mm512_store_si512(d + i, _mm512_or_si512(ev, _mm512_slli_epi32(od, 16)));
        _mm512_store_si512(d + i + 16, _mm512_setzero_si512());
    }
}

static void prep_f32(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    float *d = dst;

    for (int64_t i = 0; i < n_pad; i += 16)
        _mm512_store_ps(d + i, load_src(src, i, n));
}

/* ---- SwiGLU ---------------------------------------------------------------- */

/* exp(x) for x <= 88.7 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6
 * polynomial, about 1 ulp); very negative x gives 0 through scalef. */
INLINE __m512 exp512(__m512 x)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 c1 = _mm512_set1_ps(0.693359375f);
    const __m512 c2 = _mm512_set1_ps(-2.12194440e-4f);
    __m512 n, r, p;

    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
    r = _mm512_fnmadd_ps(n, c1, x);
    r = _mm512_fnmadd_ps(n, c2, r);
    p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static void swiglu(const float *g, const float *u, int64_t n, float *out)
{
    const __m512 one = _mm512_set1_ps(1.0f);

    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = i + 16 <= n ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 uv = _mm512_maskz_loadu_ps(m, u + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));

        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, uv));
    }
}

static void swiglu_clamp(const float *g, const float *u, int64_t n, float alpha, float limit,
                         float *out)
{
    const __m512 one = _mm512_set1_ps(1.0f), lim = _mm512_set1_ps(limit);
    const __m512 nlim = _mm512_set1_ps(-limit), na = _mm512_set1_ps(-alpha);

    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = i + 16 <= n ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 gv = _mm512_min_ps(_mm512_maskz_loadu_ps(m, g + i), lim);
        __m512 uv = _mm512_max_ps(_mm512_min_ps(_mm512_maskz_loadu_ps(m, u + i), lim), nlim);
        __m512 e = exp512(_mm512_mul_ps(na, gv));
        __m512 glu = _mm512_div_ps(gv, _mm512_add_ps(one, e));

        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_add_ps(uv, one), glu));
    }
}

/* The avx512 table, and the same with AMX tiles for the grouped FFN's bf16
 * weights (moe_cpu_amx_dot; the backend builds their B tiles). */
#define AVX512_KERNEL(NAME, AMX)                                                                   \
    {                                                                                              \
        .name = NAME, .prep = {prep_f32, prep_f32, prep_bf16},                                     \
        .dot = {dot_f32, dot_f16, dot_bf16},                                                       \
        .round = {moe_cpu_round_f32, moe_cpu_round_f32, round_bf16},                               \
        .dot_b16 = {dot_f32, dot_f16, dot_b16h}, .swiglu = swiglu, .swiglu_clamp = swiglu_clamp,   \
        .qdot = MOE_CPU_QDOT_X86, .qdot_a8 = MOE_CPU_QDOT_A8_X86, .amx = AMX,                      \
    }
const struct moe_cpu_kernel moe_cpu_kernel_avx512 = AVX512_KERNEL("avx512", false);
const struct moe_cpu_kernel moe_cpu_kernel_amx = AVX512_KERNEL("amx", true);
