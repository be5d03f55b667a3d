/*
 * The CPU backend's kernel table (internal to engine/cpu/).  One table per
 * instruction-set variant, each in its own file compiled for that variant:
 * kernels_generic.c (portable C), kernels_avx2.c (AVX2 + FMA + F16C),
 * kernels_avx512.c (AVX-512 F/BW/VL/DQ + BF16 + VNNI).  backend_cpu.c
 * picks one at run time and must only call a variant the CPU supports.
 *
 * The dot kernels compute y[t, r] = sum_k W[r, k] * x_t[k] over a block of
 * weight rows and a list of activation rows.  Activations are first
 * "prepared" into the layout the variant's dot kernel for that weight dtype
 * reads (for example bf16 hi/lo pairs for vdpbf16ps).  Every layout takes 4
 * bytes per element, is padded with zeros to a multiple of MOE_CPU_KPAD
 * elements, and is local to aligned MOE_CPU_KPAD-element blocks: element k
 * lives inside bytes [4 * (k / KPAD) * KPAD, 4 * (k / KPAD + 1) * KPAD), so a
 * row may be prepared piecewise in KPAD-aligned chunks.
 *
 * Determinism: the arithmetic producing one y[t, r] depends only on K and on
 * the inputs, never on nr, nt or the element's position in the block, so any
 * partition of rows and tokens gives bit-identical results.
 */
#ifndef MOED_ENGINE_CPU_KERNELS_H
#define MOED_ENGINE_CPU_KERNELS_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Prepared rows are padded to a multiple of this many elements. */
#define MOE_CPU_KPAD 32
/* K is processed in blocks of this many elements; each block's partial sum
 * is reduced and added to y in order (fixed, so results are reproducible). */
#define MOE_CPU_KBLOCK 1024

/* Rounds k up to a multiple of MOE_CPU_KPAD. */
static inline int64_t moe_cpu_kpad(int64_t k)
{
    return (k + MOE_CPU_KPAD - 1) / MOE_CPU_KPAD * MOE_CPU_KPAD;
}

/*
 * Prepares activations: src[0, n) fp32 into dst, which covers n_pad elements
 * (n <= n_pad, n_pad a multiple of MOE_CPU_KPAD); elements n..n_pad-1 are
 * written as zeros.  dst is 64-byte aligned.
 */
typedef void (*moe_cpu_prep_fn)(const float *src, int64_t n, int64_t n_pad, void *dst);

/*
 * y[t * ldy + r] = sum_{k < K} W[r, k] * x[t][k] for r < nr, t < nt
 * (overwritten).  w points at row 0 of the block, rows ldw elements apart,
 * of the variant's dtype; x[t] are prepared rows of moe_cpu_kpad(K)
 * elements, 64-byte aligned.
 */
typedef void (*moe_cpu_dot_fn)(const void *w, int64_t ldw, int nr, int64_t k, const void *const *x,
                               int nt, float *y, int64_t ldy);

/*
 * Rounds a row prepared by the same variant's prep for the same dtype
 * (n_pad elements, or a KPAD-aligned piece of one) to bf16 activations in
 * place, as if its source had been rounded to bf16 first, into the layout
 * the variant's dot_b16 reads (which may differ from prep's: AVX-512's bf16
 * weights): compute_precision bf16.
 */
typedef void (*moe_cpu_round_fn)(void *prepared, int64_t n_pad);

/* The round function of every plain fp32 prepared layout (tiling.c). */
void moe_cpu_round_f32(void *prepared, int64_t n_pad);

/* out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i], i < n. */
typedef void (*moe_cpu_swiglu_fn)(const float *g, const float *u, int64_t n, float *out);

/*
 * gpt-oss's clamped SwiGLU (MOE_ACT_SWIGLU_CLAMP, backend.h), i < n:
 *   gc = min(g[i], limit), uc = clamp(u[i], -limit, limit),
 *   out[i] = (uc + 1) * gc / (1 + exp(-alpha * gc)).
 * out may be g.
 */
typedef void (*moe_cpu_swiglu_clamp_fn)(const float *g, const float *u, int64_t n, float alpha,
                                        float limit, float *out);

/* The scalar form of moe_cpu_swiglu_clamp_fn, for the variants' tails. */
static inline float moe_cpu_swiglu_clamp1(float g, float u, float alpha, float limit)
{
    float gc = g < limit ? g : limit;
    float uc = u < -limit ? -limit : u > limit ? limit : u;

    return (uc + 1.0f) * (gc / (1.0f + expf(-alpha * gc)));
}

/*
 * A register tile of a vectorised variant: y[t * ldy + r * ys] (+)= the dot
 * of weight row r (rows ldw elements apart from w) with prepared activation
 * row x[t] over elements [k0, k1); overwrites when first, adds otherwise.
 * The row and token counts are fixed per function.
 */
typedef void (*moe_cpu_tile_fn)(const void *w, int64_t ldw, const void *const *x, int64_t k0,
                                int64_t k1, float *y, int64_t ldy, int64_t ys, bool first);

/* A variant's register tiles for one weight dtype, for moe_cpu_dot_tiles(). */
struct moe_cpu_tiling {
    int rmax;                     /* largest tile, rows */
    int tmax;                     /* largest tile, tokens */
    size_t esz;                   /* bytes per weight element */
    const moe_cpu_tile_fn *tiles; /* [rmax * tmax]: r rows x t tokens at (r-1) * tmax + t-1 */
    int dmax;                     /* decode tiles for 1..dmax tokens (dmax >= tmax) */
    const moe_cpu_tile_fn *dec;   /* [dmax]: decode tile for t tokens ... */
    const int *dec_rows;          /* [dmax]: ... and its rows (>= 1; may exceed rmax) */
};

/*
 * The loop order shared by the vectorised variants: walks the
 * (nr rows x nt tokens x K) block of a moe_cpu_dot_fn call in register tiles.
 *
 * Few tokens (nt <= dmax, decode) are memory-bound: decode tile j takes rows
 * j, j + s, j + 2s, ... (s = nr / dec_rows[nt - 1]) and walks them over all
 * of K, so each of its weight loads streams through a contiguous stretch of s
 * rows.  A few long sequential reads per thread run at close to full memory
 * bandwidth; tiles of adjacent rows would make many short ones (a row of a
 * Mixtral gate is only 8 KiB), which the hardware prefetchers serve about 20%
 * slower (measured).  The remaining nr % dec_rows rows take ordinary tiles.
 *
 * Many tokens (prefill) are compute-bound: K blocks outermost, so the
 * activations of tmax tokens over one K block stay in L1 while the block's
 * weight rows (in L2) are swept past them.
 *
 * Every order does the same arithmetic per element.
 */
void moe_cpu_dot_tiles(const struct moe_cpu_tiling *tl, const void *w, int64_t ldw, int nr,
                       int64_t k, const void *const *x, int nt, float *y, int64_t ldy);

/*
 * A quantized weight matrix (quant.h) for a moe_cpu_qdot_fn: the rows
 * [row0, row0 + nr) of a matrix of k columns (k a multiple of 32).
 */
struct moe_cpu_qw {
    struct moe_quant_fmt f;
    const uint8_t *w; /* row 0 of the matrix */
    const uint8_t *s; /* its scales, [ceil(rows / f.brows), k / f.bcols] */
    int64_t row0;     /* the first row of the block */
};

/*
 * y[t * ldy + r] = sum_{c < k} W[row0 + r, c] * x[t][c] for r < nr, t < nt
 * (overwritten), W dequantized inside the kernel (each value times its
 * scale in fp32, fp32 accumulation), never as a copy of the matrix.  x[t]
 * are plain fp32 prepared rows (prep[MOE_DTYPE_F32]), 64-byte aligned; for
 * FP8 in the layout of moe_cpu_make_x8 (below).  As for dot: y[t, r]
 * depends only on k and the inputs.
 */
typedef void (*moe_cpu_qdot_fn)(const struct moe_cpu_qw *w, int nr, int64_t k, const void *const *x,
                                int nt, float *y, int64_t ldy);

/*
 * int8 activations (struct moe_cpu_config.act_int8): a row prepared by
 * moe_cpu_prep_a8 holds, for each block of 32 elements x[32b, 32b + 32),
 * the 128 bytes at 128 b (so that, like the other layouts, 4 bytes per
 * element, block-local; a row may be prepared piecewise in whole blocks):
 *   bytes 0-31   q[j] = round(x / d) as int8 (to nearest even, |q| <= 127),
 *                in the order x0, x2, ..., x30, x1, x3, ..., x31 (the order
 *                in which an int4 row's low, then high nibbles come);
 *   bytes 32-63  the same q[j] in order, x0, x1, ..., x31 (int8's);
 *   bytes 64-67  d = max |x| / 127 (float; 0 for an all-zero block, NaN
 *                when the block holds a NaN or an infinity);
 *   bytes 68-71  8 * (q[0] + ... + q[31]) * d (float, rounded once: int4's
 *                offset of 8 for the block; MXFP4's of 12 is 1.5 times it).
 * Elements n..n_pad-1 are zeros.  The dot of a row of int8, int4 or MXFP4
 * weights with such a row is exact in int32 per block (int4 and MXFP4: of
 * their values plus an offset, taken off in fp32 per group), then scaled
 * by d times the weights' group scale in fp32: the activations carry
 * int8's error (at most d / 2 per element, about 0.2% of the block's
 * largest), nothing else.
 */
#define MOE_CPU_A8_BLOCK 128
#define MOE_CPU_A8_SEQ 32
#define MOE_CPU_A8_SCALE 64
#define MOE_CPU_A8_OFF 68

/* Prepares src[0, n) as int8 activations into dst (the layout above),
 * n_pad a multiple of MOE_CPU_KPAD, dst 64-byte aligned.  Portable C: one
 * definition for every variant, so all round alike. */
void moe_cpu_prep_a8(const float *src, int64_t n, int64_t n_pad, void *dst);

/*
 * FP8 weights' activations (the qdot kernels of MOE_QUANT_FP8 read these): a
 * row of MOE_CPU_X8_ROW(n_pad) floats, the n_pad elements of a plain fp32
 * prepared row (prep[MOE_DTYPE_F32], rounded by round[] for compute_precision
 * bf16) times 2^(120 - e), each block of 32 in the order the x86 kernels
 * decode the weights (element j of a block at moe_cpu_x8_pos(j): 0, 2, 4,
 * 6, 16, 18, 20, 22, 8, 10, ..., 30, then the odd ones likewise), then 2^e
 * at element n_pad and zeros to the end of that block; e is the exponent
 * of the row's largest finite |x| (0 when it has none).  The x86 kernels
 * decode an e4m3 value as itself times 2^-120 (qdot_x86.h) and multiply
 * each dot by 2^e at the end: the products are those of x / 2^e, the
 * largest about |w|, so nothing in the sums underflows or overflows
 * whatever the scale of x, and all the factors are powers of two (exact).
 * Non-finite values stay as they are.
 */
#define MOE_CPU_X8_ROW(n_pad) ((n_pad) + MOE_CPU_KPAD)

/* The position of element j (< 32) of a block in the layout above. */
static inline int moe_cpu_x8_pos(int j)
{
    int h = (j & 15) >> 1;

    return 16 * (j & 1) + 8 * (h >> 2) + 4 * (j >> 4) + (h & 3);
}

/* Makes a plain fp32 prepared row of n_pad elements (row[0, n_pad)) the
 * layout above, in place, row holding MOE_CPU_X8_ROW(n_pad) floats.
 * Portable C: one definition for every variant. */
void moe_cpu_make_x8(float *row, int64_t n_pad);

struct moe_cpu_kernel {
    const char *name;          /* "generic", "avx2", "avx512", "amx" */
    moe_cpu_prep_fn prep[3];   /* indexed by MOE_DTYPE_F32, _F16, _BF16 */
    moe_cpu_dot_fn dot[3];     /* likewise */
    moe_cpu_round_fn round[3]; /* likewise: prepared rows to bf16 activations */
    /* The dot kernels for rows that round[] made bf16: the dot products
     * dot would compute of such values, perhaps summed in another order
     * (AVX-512's bf16 weights: vdpbf16ps, one instruction per 32 weights
     * where dot takes two FMAs).  Used for every dot of a compute_precision
     * bf16 work item, so that one precision always takes one code path. */
    moe_cpu_dot_fn dot_b16[3];
    moe_cpu_swiglu_fn swiglu;
    moe_cpu_swiglu_clamp_fn swiglu_clamp;
    /* Optional (NULL: the backend does it with swiglu and scalar rounding):
     * out[i] = bf16(bf16(silu(bf16(g[i]))) * bf16(u[i])), with swiglu's silu;
     * compute_precision bf16. */
    moe_cpu_swiglu_fn swiglu_b16;
    /* Quantized weights, indexed by enum moe_quant (slot 0, NONE, unused):
     * activations prepared by prep[MOE_DTYPE_F32] (rounded by
     * round[MOE_DTYPE_F32] for compute_precision bf16), and for FP8 then
     * made the layout of moe_cpu_make_x8. */
    moe_cpu_qdot_fn qdot[MOE_QUANT_COUNT];
    /* Optional (NULL: none), indexed likewise, INT8, INT4 and MXFP4: the same
     * dot on activations prepared by moe_cpu_prep_a8 (int8 activations). */
    moe_cpu_qdot_fn qdot_a8[MOE_QUANT_COUNT];
    /* The grouped FFN's bf16 weights on AMX tiles (moe_cpu_amx_dot). */
    bool amx;
};

extern const struct moe_cpu_kernel moe_cpu_kernel_generic;
extern const struct moe_cpu_kernel moe_cpu_kernel_avx2;
extern const struct moe_cpu_kernel moe_cpu_kernel_avx512;
/* The AVX-512 table, with AMX tiles for the grouped FFN's bf16 weights. */
extern const struct moe_cpu_kernel moe_cpu_kernel_amx;

/*
 * AMX (kernels_amx.c; only where moe_cpu_kernel.amx).  Asks Linux for this
 * process's AMX tile state (once is enough; again is harmless): 0, or
 * -errno where it refuses.
 */
int moe_cpu_amx_enable(void);

/*
 * B tiles for moe_cpu_amx_dot: one group of nt tokens (nt <= 16 / parts),
 * K steps [s0, s1) (32 elements each) into b (tile s at b + 256 * s
 * int32), from fp32 rows x[j] whose element 0 is the step s0's first.
 * parts 3: exact, each value split into three bf16 (hi, mid, lo); parts 1:
 * values already bf16 (compute_precision bf16).  x rows hold zeros past the
 * matrix's K.
 */
void moe_cpu_amx_btiles(const float *const *x, int nt, int parts, int64_t s0, int64_t s1,
                        int32_t *b);

/*
 * y[t * ldy + r] = sum_{k < K} W[r, k] * x_t[k] for r < nr, t < nt
 * (overwritten), bf16 weights rows ldw apart, the tokens' B tiles in b:
 * group g (tokens g * 16 / parts on) at b + 256 * ksteps * g, each group
 * ksteps tiles (moe_cpu_kpad(K) / 32).
 */
void moe_cpu_amx_dot(const void *w, int64_t ldw, int nr, int64_t k, const int32_t *b,
                     int64_t ksteps, int nt, int parts, float *y, int64_t ldy);

#endif
