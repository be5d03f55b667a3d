/*
 * The quantized expert kernels' device code (C++ only, included by
 * backend_cuda_quant.cu): decoding FP8 e4m3, INT8, INT4 and MXFP4 values and their
 * scales (the formats of engine/quant.h, read exactly as its scalar
 * reference and the CPU kernels read them), the decode rows (a warp per
 * weight row) and the tiled kernel of larger batches.
 *
 * Nothing is ever dequantized to a copy in device memory: each kernel reads
 * the packed bytes and the scales where the cache or the staging put them
 * (any alignment: a safetensors tensor may start at any byte; aligned
 * matrices take 16-, 8- or 4-byte loads, others byte loads) and decodes them
 * in registers.  Sums are fp32.
 *
 * Decoding, as engine/cpu/qdot_x86.h does (so both backends give the same
 * dequantized weights, bit for bit):
 *   FP8 e4m3  each byte's bits (s eeee mmm) moved to f16 bits
 *             (s 0eeee mmm0000000) and converted: the value times 2^-8,
 *             normal and subnormal alike, so the scale is multiplied by 2^8
 *             (exact).  NaN bytes (0x7f, 0xff) decode as +-480 (the loader
 *             does not scan weights for them).  Integer ops only: the same
 *             code on every architecture the build targets (sm_80, sm_90).
 *   INT8      sign-extended, converted.
 *   INT4      nibbles in element order (element 2j low, 2j + 1 high), minus 8.
 *   MXFP4     e2m1 nibbles in the same order, as twice their value (integers
 *             0..12), so the e8m0 scale 2^(e - 127), built from its bits
 *             (e = 0 gives 0 as on the CPU), is multiplied by 0.5 (exact).
 * A value times its scale is then the reference's fp32 product exactly.
 */
#ifndef MOED_KERNELS_QUANT_CUDA_H
#define MOED_KERNELS_QUANT_CUDA_H

#include "expert_cuda.h" /* struct qmat */

extern "C" {
#include "common.h"
}

/* Four bytes from any address, little-endian. */
static __device__ __forceinline__ uint32_t q_bytes4(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The first value of row r (cols values per row). */
template <int Q>
static __device__ __forceinline__ const uint8_t *q_row(const qmat &m, int r, int cols)
{
    const bool nib = Q == MOE_QUANT_INT4 || Q == MOE_QUANT_MXFP4;

    return m.w + (nib ? (size_t)r * (size_t)(cols / 2) : (size_t)r * (size_t)cols);
}

/* The scale of element (r, c), with the decoder's factor folded in. */
template <int Q> static __device__ __forceinline__ float q_scale(const qmat &m, int r, int c)
{
    const size_t j = (size_t)(r / m.brows) * (size_t)m.sc + (size_t)(c / m.bcols);

    if (Q == MOE_QUANT_MXFP4)
        return __uint_as_float((uint32_t)m.s[j] << 23) * 0.5f;

    const uint8_t *p = m.s + 4 * j;
    const float s = m.sal ? *reinterpret_cast<const float *>(p) : __uint_as_float(q_bytes4(p));

    return Q == MOE_QUANT_FP8 ? s * 256.0f : s;
}

/* The values of one 32-bit word, in element order: 4 (FP8, INT8) or 8
 * (INT4, MXFP4), before scaling. */
template <int Q> static __device__ __forceinline__ void q_word(uint32_t w, float *f)
{
    if (Q == MOE_QUANT_FP8) {
        /* bytes 0, 1 and 2, 3 into the high halves of 16-bit lanes, then
         * s eeee mmm 00000000 -> s 0eeee mmm 0000000 in each lane */
        const uint32_t t[2] = {__byte_perm(w, 0, 0x1404), __byte_perm(w, 0, 0x3424)};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const uint32_t h = ((t[i] >> 1) & 0x3f803f80u) | (t[i] & 0x80008000u);
            const __half2 v = *reinterpret_cast<const __half2 *>(&h);
            const float2 x = __half22float2(v);

            f[2 * i] = x.x;
            f[2 * i + 1] = x.y;
        }
    } else if (Q == MOE_QUANT_INT8) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            f[i] = (float)(int8_t)(uint8_t)(w >> (8 * i));
    } else if (Q == MOE_QUANT_INT4) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            f[i] = (float)((int)((w >> (4 * i)) & 0xfu) - 8);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t nib = (w >> (4 * i)) & 0xfu, em = nib & 7u;
            /* twice the e2m1 value: m for exponent 0, (2 + m) << (e - 1) else */
            const uint32_t v2 = em < 2u ? em : (2u | (em & 1u)) << ((em >> 1) - 1u);

            f[i] = nib & 8u ? -(float)v2 : (float)v2;
        }
    }
}

/* Values c .. c + 15 of a row (c % 16 == 0), before scaling. */
template <int Q>
static __device__ __forceinline__ void q_load16(const qmat &m, const uint8_t *row, int c, float *f)
{
    if (Q == MOE_QUANT_FP8 || Q == MOE_QUANT_INT8) {
        const uint8_t *p = row + c;
        uint32_t w[4];

        if (m.wal) {
            const uint4 v = *reinterpret_cast<const uint4 *>(p);

            w[0] = v.x;
            w[1] = v.y;
            w[2] = v.z;
            w[3] = v.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = q_bytes4(p + 4 * i);
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
            q_word<Q>(w[i], f + 4 * i);
    } else {
        const uint8_t *p = row + c / 2;
        uint32_t w[2];

        if (m.wal) {
            const uint2 v = *reinterpret_cast<const uint2 *>(p);

            w[0] = v.x;
            w[1] = v.y;
        } else {
            w[0] = q_bytes4(p);
            w[1] = q_bytes4(p + 4);
        }
        q_word<Q>(w[0], f);
        q_word<Q>(w[1], f + 8);
    }
}

/* Values c .. c + 7 of a row (c % 8 == 0), before scaling. */
template <int Q>
static __device__ __forceinline__ void q_load8(const qmat &m, const uint8_t *row, int c, float *f)
{
    if (Q == MOE_QUANT_FP8 || Q == MOE_QUANT_INT8) {
        const uint8_t *p = row + c;
        uint32_t w0, w1;

        if (m.wal) {
            const uint2 v = *reinterpret_cast<const uint2 *>(p);

            w0 = v.x;
            w1 = v.y;
        } else {
            w0 = q_bytes4(p);
            w1 = q_bytes4(p + 4);
        }
        q_word<Q>(w0, f);
        q_word<Q>(w1, f + 4);
    } else {
        const uint8_t *p = row + c / 2;

        q_word<Q>(m.wal ? *reinterpret_cast<const uint32_t *>(p) : q_bytes4(p), f);
    }
}

/* 4 floats of an activation row at c (c % 4 == 0); al: 16-byte aligned. */
static __device__ __forceinline__ float4 q_x4(const float *x, int c, bool al)
{
    if (al)
        return *reinterpret_cast<const float4 *>(x + c);
    return make_float4(x[c], x[c + 1], x[c + 2], x[c + 3]);
}

/*
 * acc[j] += dot(row r of m, xr[j][0, K)) for j < nt, this lane's part: lane
 * l takes values 16 l .. 16 l + 15 of every 512, the warp reads 512 (FP8,
 * INT8) or 256 (INT4, MXFP4) consecutive bytes per step; each 16 values'
 * products are summed, then multiplied by their scale.  With m2, the same
 * for row r of m2 into acc2 (gate and up share the activations).
 */
template <int Q, int NTOK>
static __device__ __forceinline__ void q_rows_dot(const qmat &m, const qmat *m2, int r, int K,
                                                  const float *const *xr, int nt, bool xal,
                                                  float *acc, float *acc2)
{
    const int lane = threadIdx.x & 31;
    const uint8_t *w = q_row<Q>(m, r, K);
    const uint8_t *w2 = m2 ? q_row<Q>(*m2, r, K) : nullptr;

    for (int c = lane * 16; c < K; c += 32 * 16) {
        float a[16], b[16];
        float sa = q_scale<Q>(m, r, c), sb = 0.0f;

        q_load16<Q>(m, w, c, a);
        if (m2) {
            q_load16<Q>(*m2, w2, c, b);
            sb = q_scale<Q>(*m2, r, c);
        }
#pragma unroll
        for (int j = 0; j < NTOK; j++) {
            if (j < nt) {
                float pa = 0.0f, pb = 0.0f;
#pragma unroll
                for (int q = 0; q < 16; q += 4) {
                    const float4 xv = q_x4(xr[j], c + q, xal);

                    pa = fmaf(a[q], xv.x, pa);
                    pa = fmaf(a[q + 1], xv.y, pa);
                    pa = fmaf(a[q + 2], xv.z, pa);
                    pa = fmaf(a[q + 3], xv.w, pa);
                    if (m2) {
                        pb = fmaf(b[q], xv.x, pb);
                        pb = fmaf(b[q + 1], xv.y, pb);
                        pb = fmaf(b[q + 2], xv.z, pb);
                        pb = fmaf(b[q + 3], xv.w, pb);
                    }
                }
                acc[j] = fmaf(sa, pa, acc[j]);
                if (m2)
                    acc2[j] = fmaf(sb, pb, acc2[j]);
            }
        }
    }
}

/* ---- the tiled kernel ------------------------------------------------------------------- */

#define QT_M 64    /* weight rows per tile */
#define QT_N 64    /* tokens per tile */
#define QT_K 32    /* columns per step: one scale per row and step (bcols % 32 == 0) */
#define QT_TPB 256 /* threads: 16 x 16, each 4 rows x 4 tokens */

/* One launch of the tiled kernel: out[i, r] for tokens i < n and rows
 * r < rows of a (and b). */
struct qgemm_args {
    qmat a, b;           /* GU: gate and up; else one matrix (down) */
    int rows, K;         /* of each matrix */
    const float *x;      /* activations, rows of K floats */
    const int32_t *tok;  /* the row of x of token i, or NULL: row i */
    int n;               /* tokens */
    int xal;             /* x 16-byte aligned (K % 4 == 0 always) */
    float *out;          /* out[i * ldo + r] */
    int64_t ldo;         /* floats between tokens' rows of out */
    const float *bias_a; /* [rows] added to a's sums, or NULL */
    const float *bias_b; /* [rows] added to b's, or NULL */
    int act;             /* GU: enum moe_activation */
    float alpha, limit;
};

#endif
