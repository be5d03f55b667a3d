/*
 * Shared by the CUDA backend's two sources (C++ only, not installed):
 * backend_cuda.cu (the backend, plain experts, grouping and combining) and
 * backend_cuda_quant.cu (the quantized experts' kernels: FP8, INT8, INT4,
 * MXFP4).  The decode pieces both sides fill and read, the expert's
 * activation, and the launchers of the quantized kernels, which run on the
 * backend's stream with its lock held (cuda_internal.h).
 */
#ifndef MOED_KERNELS_EXPERT_CUDA_H
#define MOED_KERNELS_EXPERT_CUDA_H

#include "cuda_internal.h"

extern "C" {
#include "backend.h"
}

#define WARPS 8 /* warps per block of the row kernels */
#define NT 8    /* tokens per pass of the row kernels */

/* One quantized matrix [rows, cols] in device memory (quant.h's layout):
 * the values row-major, the scales [ceil(rows / brows), sc] row-major. */
struct qmat {
    const uint8_t *w; /* values */
    const uint8_t *s; /* scales */
    int brows, bcols; /* the scale block */
    int sc;           /* scales per scale row: ceil(cols / bcols) */
    int wal;          /* w is 16-byte aligned (vector loads) */
    int sal;          /* s is 4-byte aligned (F32 scales loaded as floats) */
};

/* One decode piece: some tokens of one expert. */
struct dec_piece {
    const void *gate, *up, *down;
    const float *gb, *ub, *db; /* biases (gpt-oss) or NULL */
    float alpha, limit;        /* act MOE_ACT_SWIGLU_CLAMP's */
    int act;                   /* enum moe_activation */
    int64_t act_off;           /* floats into act: [n, F] act(g, u) */
    int F;
    int row0;   /* first row of the piece in the group */
    int n;      /* tokens */
    int blk0;   /* first block of the gate/up launch */
    int dblk0;  /* first block of the down launch */
    int dtype;  /* enum moe_dtype */
    int vec_gu; /* 16-byte loads allowed on gate/up rows and x (quantized: on x) */
    int vec_d;  /* ... on down rows and act */
    int q;      /* enum moe_quant: MOE_QUANT_NONE, or gate, up and down are qg, qu, qd */
    qmat qg, qu, qd;
};

/* The expert's activation of gate value g and up value u (backend.h). */
static __device__ __forceinline__ float expert_act(float g, float u, int act, float alpha,
                                                   float limit)
{
    if (act == MOE_ACT_SWIGLU_CLAMP) {
        const float gc = fminf(g, limit), uc = fminf(fmaxf(u, -limit), limit);

        return (uc + 1.0f) * (gc / (1.0f + expf(-alpha * gc)));
    }
    return g / (1.0f + expf(-g)) * u;
}

/* The piece that block blk belongs to: the last with start <= blk. */
static __device__ __forceinline__ int find_piece(const dec_piece *p, int n, int blk, bool down)
{
    int lo = 0, hi = n - 1;

    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        int s = down ? p[mid].dblk0 : p[mid].blk0;

        if (s <= blk)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static inline bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

/* ---- backend_cuda_quant.cu ---------------------------------------------------------------- */

/* Matrix [rows, cols] of quantized expert w: values v, scales s. */
qmat moe_cuda_qmat(const struct moe_expert_weights *w, const void *v, const void *s, int64_t cols);

/* The decode launches of quantized pieces pcs[0, n_pcs) (device memory,
 * p.q != MOE_QUANT_NONE, blocks numbered from 0): blocks of gate and up
 * rows into act, then dblocks of down rows into y. */
void moe_cuda_qdec(struct cuda_backend *cb, const dec_piece *pcs, int n_pcs, int blocks,
                   int dblocks, const float *x, int H, const int32_t *tok, float *act, float *y);

/* The tiled kernels of quantized expert w on n tokens (rows tok of x, device
 * memory): act [n, F] (scratch) = act(gate x, up x), then y [n, H] = down
 * act; tc: on bf16 tensor cores (sm_80 and later). */
void moe_cuda_qgemm(struct cuda_backend *cb, const struct moe_expert_weights *w, const float *x,
                    int H, const int32_t *tok, int n, bool tc, float *act, float *y);

#endif
