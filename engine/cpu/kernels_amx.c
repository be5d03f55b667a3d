/*
 * AMX tiles for bf16 weights in the grouped FFN (compiled with the AVX-512
 * flags and -mamx-tile -mamx-bf16; only called where the CPU has AMX-BF16
 * and Linux has granted this process the tile state, moe_cpu_amx_enable(),
 * by the "amx" kernel table: kernels_avx512.c's with .amx set).
 *
 * One TDPBF16PS multiplies a tile A of 16 rows x 32 bf16 by a tile B of 16
 * bf16 pairs x 16 columns into 16 x 16 fp32 sums in about 16 cycles,
 * whatever the number of columns used: 1 KiB of weights per 5 ns on a
 * Sapphire Rapids core for up to 16 tokens at once, against 0.54 ns per
 * 16 multiplies of a 512-bit FMA.
 *
 * A is the weights as stored, 16 rows (ldw apart) x 32 columns, no packing.
 * B holds the activations: for each 32 elements of K, column n is one
 * activation row's 16 pairs (B[p][n] = x[2p], x[2p+1]).  The backend builds
 * every B tile once per work item (moe_cpu_amx_btiles: x before phase 1,
 * each phase-1 task its block of SwiGLU rows), since transposing them in
 * the dot itself, per call, starved the tile loads' memory stream (half
 * the speed at 5 tokens, measured).  Exact precision splits each fp32
 * activation into three bf16 parts, x = hi + mid + lo (hi = bf16(x), mid =
 * bf16(x - hi), lo = bf16(x - hi - mid): all 24 bits of a normal x), in
 * three columns, so a group takes 5 tokens (15 columns); compute_precision
 * bf16 takes x as bf16 already (rounded by round[], the fp32 one), one
 * column a token, 16 a group.  Every product of a bf16 weight and a bf16
 * part is exact in fp32, and the tile sums them in fp32 in K order as an
 * FMA chain would; a token's three sums are added as (hi + mid) + lo at the
 * end of each K block of MOE_CPU_KBLOCK.
 *
 * The dot walks K blocks, then panels of 32 rows (2 A tiles) by pairs of
 * token groups (2 B tiles) into 4 C tiles, 2 tile loads a TDPBF16PS:
 * panels outermost, their A tiles reused from L2 by every pair, or with
 * more than 16 groups pairs outermost, so that B tiles past L2 are read
 * once a K block.
 *
 * Every element's sum depends only on its row's weights, its token's
 * activations and K, not on its tile position or on the other rows and
 * tokens, so any partition gives bit-identical results (kernels.h): a
 * token alone equals it in a batch (tests/unit/test-cpu-backend.c).  AMX
 * treats bf16 denormals (below 2^-126) as zero and flushes denormal sums;
 * in exact precision an infinite activation gives NaN (inf - inf in the
 * split).
 *
 * K tails (K not a multiple of 32) and row tails (fewer than 16 rows) go
 * through a zero-padded copy of the tile, so no row is read past its end.
 * The tile configuration (8 tiles of 16 rows x 64 bytes) is loaded at the
 * start of each call and released at its end, so that other AMX users
 * (oneDNN) on the same thread find the state as they left it.
 */
#include <errno.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "kernels.h"

#if defined(__linux__)
#include <sys/syscall.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Rows per tile, K elements per tile row. */
#define TROWS 16
#define TK 32

struct tile_cfg {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

int moe_cpu_amx_enable(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return -errno;
    return 0;
#else
    return -ENOTSUP;
#endif
}

/* 8 tiles of 16 rows x 64 bytes.  A constant: GCC 12 does not see that
 * ldtilecfg reads its operand and dropped the stores to a local one. */
static const struct tile_cfg tile_cfg = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {TROWS, TROWS, TROWS, TROWS, TROWS, TROWS, TROWS, TROWS},
};

static void tiles_configure(void)
{
    _tile_loadconfig(&tile_cfg);
}

static inline __m512 bf16_to_f32(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The bf16 parts of x[0, 32): parts 1 (x is bf16 already) or 3 (hi, mid,
 * lo), each 32 values in order, into col[q]. */
static inline void split32(const float *x, int parts, __m512i *col)
{
    __m512 a0 = _mm512_load_ps(x), a1 = _mm512_load_ps(x + 16);

    for (int q = 0; q < parts; q++) {
        __m512i h = (__m512i)_mm512_cvtne2ps_pbh(a1, a0);

        col[q] = h;
        if (q + 1 < parts) {
            a0 = _mm512_sub_ps(a0, bf16_to_f32(_mm512_castsi512_si256(h)));
            a1 = _mm512_sub_ps(a1, bf16_to_f32(_mm512_extracti64x4_epi64(h, 1)));
        }
    }
}

/* Transposes the 16 x 16 dwords in r (r[i] row i) in place. */
static inline void transpose16(__m512i r[16])
{
    __m512i t[16], u[16];

    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8) {
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(u[i + j], u[i + 4 + j], 0x88);
            t[i + 4 + j] = _mm512_shuffle_i32x4(u[i + j], u[i + 4 + j], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
}

/* Tile register numbers must be constants. */
#define TILE_STORE_C(i, buf)                                                                       \
    do {                                                                                           \
        switch (i) {                                                                               \
        case 0:                                                                                    \
            _tile_stored(0, (buf), 64);                                                            \
            break;                                                                                 \
        case 1:                                                                                    \
            _tile_stored(1, (buf), 64);                                                            \
            break;                                                                                 \
        case 2:                                                                                    \
            _tile_stored(2, (buf), 64);                                                            \
            break;                                                                                 \
        default:                                                                                   \
            _tile_stored(3, (buf), 64);                                                            \
            break;                                                                                 \
        }                                                                                          \
    } while (0)

void moe_cpu_amx_btiles(const float *const *x, int nt, int parts, int64_t s0, int64_t s1,
                        int32_t *b)
{
    for (int64_t s = s0; s < s1; s++) {
        int32_t *t = b + (size_t)s * 256;
        __m512i col[16];

        for (int j = 0; j < nt; j++)
            split32(x[j] + (s - s0) * TK, parts, col + j * parts);
        for (int n = nt * parts; n < 16; n++)
            col[n] = _mm512_setzero_si512();
        /* B[p][n] = column n's pair p */
        transpose16(col);
        for (int p = 0; p < 16; p++)
            _mm512_store_si512(t + p * 16, col[p]);
    }
}

/* A tile of nrows rows (ldw apart) x nk elements from w, zero-padded to
 * 16 x 32, into buf. */
static void stage_a(const uint16_t *w, int64_t ldw, int nrows, int nk, uint16_t *buf)
{
    __mmask32 m = (__mmask32)(nk >= 32 ? ~0u : (1u << nk) - 1);

    for (int r = 0; r < TROWS; r++)
        _mm512_store_si512(buf + r * 32, r < nrows
                                             ? _mm512_maskz_loadu_epi16(m, w + (size_t)r * ldw)
                                             : _mm512_setzero_si512());
}

/* Adds (or stores, when first) C tile i's sums of rows [0, rows) and the
 * tokens [0, nt) of its group (parts columns each) into y: the tile
 * transposed in registers, so that each token's rows are one vector. */
static void combine(int i, int rows, int nt, int parts, float *y, int64_t ldy, bool first)
{
    _Alignas(64) float c[TROWS * 16];
    __mmask16 m = (__mmask16)(rows >= 16 ? 0xffffu : (1u << rows) - 1);
    __m512i t[16];

    TILE_STORE_C(i, c);
    for (int n = 0; n < 16; n++)
        t[n] = _mm512_load_si512(c + n * 16);
    transpose16(t);
    for (int j = 0; j < nt; j++) {
        __m512 v = _mm512_castsi512_ps(t[j * parts]);
        float *o = y + (int64_t)j * ldy;

        if (parts == 3)
            v = _mm512_add_ps(_mm512_add_ps(v, _mm512_castsi512_ps(t[j * 3 + 1])),
                              _mm512_castsi512_ps(t[j * 3 + 2]));
        if (!first)
            v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), v);
        _mm512_mask_storeu_ps(o, m, v);
    }
}

void moe_cpu_amx_dot(const void *wv, int64_t ldw, int nr, int64_t k, const int32_t *b,
                     int64_t ksteps, int nt, int parts, float *y, int64_t ldy)
{
    _Alignas(64) uint16_t st0[TROWS * TK], st1[TROWS * TK];
    const uint16_t *w = wv;
    const int per = 16 / parts;
    const int groups = (nt + per - 1) / per;
    const int64_t astride = ldw * 2;
    const int npan = (nr + 2 * TROWS - 1) / (2 * TROWS), npair = (groups + 1) / 2;
    /* 4096 tokens (about 1,000 an expert, 63 groups) 2717-2724 -> 2517-2574
     * ms with pairs outermost, 512 (8 groups) 327-328 -> 344-355: measured */
    const bool pairs_outer = groups > 16;

    tiles_configure();
    for (int64_t k0 = 0; k0 < k; k0 += MOE_CPU_KBLOCK) {
        int64_t k1 = MOE_MIN(k0 + MOE_CPU_KBLOCK, k);
        int steps = (int)((k1 - k0 + TK - 1) / TK);
        int nk_last = (int)(k1 - k0 - (int64_t)(steps - 1) * TK);

        /* passes of a 32-row panel by a pair of token groups: panels
         * outermost, each panel's A tiles reused from L2 by every pair;
         * with many groups pairs outermost, so that the K block's B tiles
         * (32 KiB a group, past L2 then) are read once, not once a panel */
        for (int p = 0; p < npan * npair; p++) {
            int r0 = 2 * TROWS * (pairs_outer ? p % npan : p / npair);
            int g0 = 2 * (pairs_outer ? p / npan : p % npair);
            int rows0 = MOE_MIN(TROWS, nr - r0), rows1 = MOE_MIN(TROWS, nr - r0 - TROWS);
            const uint16_t *w0 = w + (size_t)r0 * ldw;
            const uint16_t *w1 = rows1 > 0 ? w0 + (size_t)TROWS * ldw : w0;

            bool two = g0 + 1 < groups;
            const int32_t *b0 = b + ((size_t)g0 * ksteps + k0 / TK) * 256;
            const int32_t *b1 = two ? b0 + (size_t)ksteps * 256 : b0;

            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int s = 0; s < steps; s++) {
                int64_t kk = k0 + (int64_t)s * TK;
                bool tail = s == steps - 1 && nk_last < TK;
                const void *a0 = w0 + kk, *a1 = w1 + kk;
                int64_t s0 = astride, s1 = astride;

                if (rows0 < TROWS || tail) {
                    stage_a(w0 + kk, ldw, rows0, tail ? nk_last : TK, st0);
                    a0 = st0;
                    s0 = 64;
                }
                _tile_loadd(4, a0, s0);
                _tile_loadd(6, b0 + (size_t)s * 256, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two) {
                    _tile_loadd(7, b1 + (size_t)s * 256, 64);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (rows1 > 0) {
                    if (rows1 < TROWS || tail) {
                        stage_a(w1 + kk, ldw, rows1, tail ? nk_last : TK, st1);
                        a1 = st1;
                        s1 = 64;
                    }
                    _tile_loadd(5, a1, s1);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two)
                        _tile_dpbf16ps(3, 5, 7);
                }
            }
            for (int gi = 0; gi < 1 + two; gi++) {
                int t0 = (g0 + gi) * per, tt = MOE_MIN(per, nt - t0);

                combine(gi, rows0, tt, parts, y + (int64_t)t0 * ldy + r0, ldy, k0 == 0);
                if (rows1 > 0)
                    combine(2 + gi, rows1, tt, parts, y + (int64_t)t0 * ldy + r0 + TROWS, ldy,
                            k0 == 0);
            }
        }
    }
    _tile_release();
}
