/*
 * The CUDA backend's quantized expert kernels (FP8 e4m3, INT8, INT4, MXFP4;
 * the formats of engine/quant.h, decoded by quant_cuda.h): the decode rows
 * of small batches (qdec_*: a warp per weight row, 16 values per lane and
 * step, decoded in registers) and the tiled kernel of larger ones (qgemm:
 * tiles dequantized into shared memory, fp32 sums; qgemm_tc on bf16 tensor
 * cores), with their launchers (expert_cuda.h).  backend_cuda.cu groups the
 * work, fills the decode pieces and calls these on its stream, lock held;
 * nothing here allocates, synchronises or checks errors (the caller does,
 * after all launches of a group).
 */
#include "expert_cuda.h"
#include "quant_cuda.h"

#include <mma.h>

extern "C" {
#include "common.h"
#include "quant.h"
}

/* ---- decode rows ------------------------------------------------------------------------ */

/* gate_up_row of a quantized expert. */
template <int Q>
static __device__ void qgate_up_row(const dec_piece &p, int f, const float *x, int H,
                                    const int32_t *tok, float *act)
{
    const int lane = threadIdx.x & 31;

    for (int t0 = 0; t0 < p.n; t0 += NT) {
        const int nt = min(NT, p.n - t0);
        const float *xr[NT];
        float ag[NT], au[NT];

#pragma unroll
        for (int j = 0; j < NT; j++) {
            xr[j] = x + (size_t)tok[p.row0 + t0 + (j < nt ? j : 0)] * H;
            ag[j] = 0.0f;
            au[j] = 0.0f;
        }
        q_rows_dot<Q, NT>(p.qg, &p.qu, f, H, xr, nt, p.vec_gu != 0, ag, au);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j < nt) {
                float a = warp_sum(ag[j]), b = warp_sum(au[j]);

                if (lane == 0) {
                    if (p.gb)
                        a += p.gb[f];
                    if (p.ub)
                        b += p.ub[f];
                    act[p.act_off + (int64_t)(t0 + j) * p.F + f] =
                        expert_act(a, b, p.act, p.alpha, p.limit);
                }
            }
        }
    }
}

/* down_row of a quantized expert. */
template <int Q>
static __device__ void qdown_row(const dec_piece &p, int h, int H, const float *act, float *y)
{
    const int lane = threadIdx.x & 31;

    for (int t0 = 0; t0 < p.n; t0 += NT) {
        const int nt = min(NT, p.n - t0);
        const float *ar[NT];
        float acc[NT];

#pragma unroll
        for (int j = 0; j < NT; j++) {
            ar[j] = act + p.act_off + (int64_t)(t0 + (j < nt ? j : 0)) * p.F;
            acc[j] = 0.0f;
        }
        q_rows_dot<Q, NT>(p.qd, nullptr, h, p.F, ar, nt, true, acc, acc);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j < nt) {
                float a = warp_sum(acc[j]);

                if (lane == 0)
                    y[(size_t)(p.row0 + t0 + j) * H + h] = p.db ? a + p.db[h] : a;
            }
        }
    }
}

/* dec_gate_up and dec_down of quantized pieces (p.q != MOE_QUANT_NONE). */
static __global__ void __launch_bounds__(WARPS * 32)
    qdec_gate_up(const dec_piece *pcs, int n_pcs, const float *x, int H, const int32_t *tok,
                 float *act)
{
    const dec_piece &p = pcs[find_piece(pcs, n_pcs, blockIdx.x, false)];
    const int f = (blockIdx.x - p.blk0) * WARPS + threadIdx.x / 32;

    if (f >= p.F)
        return;
    switch (p.q) {
    case MOE_QUANT_FP8:
        qgate_up_row<MOE_QUANT_FP8>(p, f, x, H, tok, act);
        break;
    case MOE_QUANT_INT8:
        qgate_up_row<MOE_QUANT_INT8>(p, f, x, H, tok, act);
        break;
    case MOE_QUANT_INT4:
        qgate_up_row<MOE_QUANT_INT4>(p, f, x, H, tok, act);
        break;
    default:
        qgate_up_row<MOE_QUANT_MXFP4>(p, f, x, H, tok, act);
        break;
    }
}

static __global__ void __launch_bounds__(WARPS * 32)
    qdec_down(const dec_piece *pcs, int n_pcs, int H, const float *act, float *y)
{
    const dec_piece &p = pcs[find_piece(pcs, n_pcs, blockIdx.x, true)];
    const int h = (blockIdx.x - p.dblk0) * WARPS + threadIdx.x / 32;

    if (h >= H)
        return;
    switch (p.q) {
    case MOE_QUANT_FP8:
        qdown_row<MOE_QUANT_FP8>(p, h, H, act, y);
        break;
    case MOE_QUANT_INT8:
        qdown_row<MOE_QUANT_INT8>(p, h, H, act, y);
        break;
    case MOE_QUANT_INT4:
        qdown_row<MOE_QUANT_INT4>(p, h, H, act, y);
        break;
    default:
        qdown_row<MOE_QUANT_MXFP4>(p, h, H, act, y);
        break;
    }
}

/*
 * The tiled kernel of quantized experts' larger batches: a block computes
 * QT_M rows of a (and b) against QT_N tokens.  Each step dequantizes a
 * QT_M x QT_K tile of each matrix (value times scale, fp32) and the tokens'
 * QT_K activations into shared memory; each thread sums 4 rows x 4 tokens
 * in fp32.  GU: out = act(a x + bias_a, b x + bias_b) (gate and up into the
 * SwiGLU intermediate); else out = a x + bias_a (down).
 */
template <int Q, bool GU> static __global__ void __launch_bounds__(QT_TPB) qgemm(qgemm_args g)
{
    constexpr int NM = GU ? 2 : 1;
    __shared__ __align__(16) float ws[NM][QT_K][QT_M + 4];
    __shared__ __align__(16) float xs[QT_K][QT_N + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.x * QT_M, n0 = blockIdx.y * QT_N;
    /* what this thread loads: row (or token) lr, columns lk .. lk + 7 */
    const int lr = tid / 4, lk = (tid % 4) * 8;
    const int wr = m0 + lr, xt = n0 + lr;
    const float *xrow =
        xt < g.n ? g.x + (size_t)(g.tok ? g.tok[xt] : xt) * (size_t)g.K : (const float *)nullptr;
    float acc[NM][4][4];

#pragma unroll
    for (int m = 0; m < NM; m++)
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                acc[m][i][j] = 0.0f;

    for (int k0 = 0; k0 < g.K; k0 += QT_K) {
#pragma unroll
        for (int m = 0; m < NM; m++) {
            const qmat &qm = m ? g.b : g.a;
            float v[8];

            if (wr < g.rows) {
                const float s = q_scale<Q>(qm, wr, k0 + lk);

                q_load8<Q>(qm, q_row<Q>(qm, wr, g.K), k0 + lk, v);
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[i] *= s;
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 8; i++)
                ws[m][lk + i][lr] = v[i];
        }
        {
            float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;

            if (xrow) {
                a = q_x4(xrow, k0 + lk, g.xal != 0);
                b = q_x4(xrow, k0 + lk + 4, g.xal != 0);
            }
            xs[lk][lr] = a.x;
            xs[lk + 1][lr] = a.y;
            xs[lk + 2][lr] = a.z;
            xs[lk + 3][lr] = a.w;
            xs[lk + 4][lr] = b.x;
            xs[lk + 5][lr] = b.y;
            xs[lk + 6][lr] = b.z;
            xs[lk + 7][lr] = b.w;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < QT_K; k++) {
            const float4 xv = *reinterpret_cast<const float4 *>(&xs[k][tx * 4]);
            const float xa[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int m = 0; m < NM; m++) {
                const float4 wv = *reinterpret_cast<const float4 *>(&ws[m][k][ty * 4]);
                const float wa[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        acc[m][i][j] = fmaf(wa[i], xa[j], acc[m][i][j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = m0 + ty * 4 + i;

        if (r >= g.rows)
            continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int t = n0 + tx * 4 + j;

            if (t >= g.n)
                continue;
            float a = acc[0][i][j];

            if (g.bias_a)
                a += g.bias_a[r];
            if (GU) {
                float b = acc[NM - 1][i][j];

                if (g.bias_b)
                    b += g.bias_b[r];
                a = expert_act(a, b, g.act, g.alpha, g.limit);
            }
            g.out[(size_t)t * (size_t)g.ldo + r] = a;
        }
    }
}

/*
 * qgemm on bf16 tensor cores (sm_80 and later), for work items of
 * precision MOE_PRECISION_BF16: each step dequantizes the weights' tile
 * (value times scale, rounded to bf16) and the activations' (rounded to
 * bf16) into shared memory; 8 warps, each 16 rows x 32 tokens of a (and b)
 * with wmma 16 x 16 x 16, fp32 sums; the sums go through shared memory to
 * the epilogue (biases, activation), which writes out coalesced.
 */
#define QTC_LD (QT_K + 8)  /* bf16 per row of a shared tile (rows of 80 bytes) */
#define QTC_CLD (QT_N + 4) /* floats per row of the sums */

template <int Q, bool GU> static __global__ void __launch_bounds__(QT_TPB) qgemm_tc(qgemm_args g)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    constexpr int NM = GU ? 2 : 1;
    constexpr size_t TILES = ((size_t)NM * QT_M + QT_N) * QTC_LD * sizeof(__nv_bfloat16);
    constexpr size_t SUMS = (size_t)NM * QT_M * QTC_CLD * sizeof(float);
    __shared__ __align__(32) unsigned char smem[TILES > SUMS ? TILES : SUMS];
    __nv_bfloat16 *ws = reinterpret_cast<__nv_bfloat16 *>(smem); /* [NM][QT_M][QTC_LD] */
    __nv_bfloat16 *xs = ws + (size_t)NM * QT_M * QTC_LD;         /* [QT_N][QTC_LD] */
    float *cs = reinterpret_cast<float *>(smem);                 /* [NM][QT_M][QTC_CLD] */
    const int tid = threadIdx.x, warp = tid / 32, wm = warp % 4, wn = warp / 4;
    const int m0 = blockIdx.x * QT_M, n0 = blockIdx.y * QT_N;
    const int lr = tid / 4, lk = (tid % 4) * 8;
    const int wr = m0 + lr, xt = n0 + lr;
    const float *xrow =
        xt < g.n ? g.x + (size_t)(g.tok ? g.tok[xt] : xt) * (size_t)g.K : (const float *)nullptr;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NM][2];

#pragma unroll
    for (int m = 0; m < NM; m++) {
        wmma::fill_fragment(acc[m][0], 0.0f);
        wmma::fill_fragment(acc[m][1], 0.0f);
    }
    for (int k0 = 0; k0 < g.K; k0 += QT_K) {
#pragma unroll
        for (int m = 0; m < NM; m++) {
            const qmat &qm = m ? g.b : g.a;
            __nv_bfloat16 *d = ws + ((size_t)m * QT_M + lr) * QTC_LD + lk;
            float v[8];

            if (wr < g.rows) {
                const float s = q_scale<Q>(qm, wr, k0 + lk);

                q_load8<Q>(qm, q_row<Q>(qm, wr, g.K), k0 + lk, v);
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[i] *= s;
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 8; i++)
                d[i] = __float2bfloat16_rn(v[i]);
        }
        {
            float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
            __nv_bfloat16 *d = xs + (size_t)lr * QTC_LD + lk;

            if (xrow) {
                a = q_x4(xrow, k0 + lk, g.xal != 0);
                b = q_x4(xrow, k0 + lk + 4, g.xal != 0);
            }
            d[0] = __float2bfloat16_rn(a.x);
            d[1] = __float2bfloat16_rn(a.y);
            d[2] = __float2bfloat16_rn(a.z);
            d[3] = __float2bfloat16_rn(a.w);
            d[4] = __float2bfloat16_rn(b.x);
            d[5] = __float2bfloat16_rn(b.y);
            d[6] = __float2bfloat16_rn(b.z);
            d[7] = __float2bfloat16_rn(b.w);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < QT_K; kk += 16) {
            /* the activations' tile [token][k] is B [k][token], column-major */
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> xb[2];

            wmma::load_matrix_sync(xb[0], xs + (size_t)(wn * 32) * QTC_LD + kk, QTC_LD);
            wmma::load_matrix_sync(xb[1], xs + (size_t)(wn * 32 + 16) * QTC_LD + kk, QTC_LD);
#pragma unroll
            for (int m = 0; m < NM; m++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> wa;

                wmma::load_matrix_sync(wa, ws + ((size_t)m * QT_M + wm * 16) * QTC_LD + kk, QTC_LD);
                wmma::mma_sync(acc[m][0], wa, xb[0], acc[m][0]);
                wmma::mma_sync(acc[m][1], wa, xb[1], acc[m][1]);
            }
        }
        __syncthreads();
    }
    /* the loop ended on a barrier: the sums may take the tiles' memory */
#pragma unroll
    for (int m = 0; m < NM; m++) {
        float *c = cs + ((size_t)m * QT_M + wm * 16) * QTC_CLD + wn * 32;

        wmma::store_matrix_sync(c, acc[m][0], QTC_CLD, wmma::mem_row_major);
        wmma::store_matrix_sync(c + 16, acc[m][1], QTC_CLD, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = tid; i < QT_M * QT_N; i += QT_TPB) {
        const int rr = i % QT_M, tt = i / QT_M, r = m0 + rr, t = n0 + tt;

        if (r >= g.rows || t >= g.n)
            continue;
        float a = cs[(size_t)rr * QTC_CLD + tt];

        if (g.bias_a)
            a += g.bias_a[r];
        if (GU) {
            float b = cs[((size_t)(NM - 1) * QT_M + rr) * QTC_CLD + tt];

            if (g.bias_b)
                b += g.bias_b[r];
            a = expert_act(a, b, g.act, g.alpha, g.limit);
        }
        g.out[(size_t)t * (size_t)g.ldo + r] = a;
    }
#else
    /* never launched below sm_80 (run_group checks cc_major) */
    (void)g;
    __trap();
#endif
}

/* ---- launchers -------------------------------------------------------------------------- */

qmat moe_cuda_qmat(const struct moe_expert_weights *w, const void *v, const void *s, int64_t cols)
{
    qmat m;

    m.w = (const uint8_t *)v;
    m.s = (const uint8_t *)s;
    m.brows = w->quant.brows;
    m.bcols = w->quant.bcols;
    m.sc = (int)((cols + w->quant.bcols - 1) / w->quant.bcols);
    m.wal = aligned16(v);
    m.sal = ((uintptr_t)s & 3u) == 0;
    return m;
}

void moe_cuda_qdec(struct cuda_backend *cb, const dec_piece *pcs, int n_pcs, int blocks,
                   int dblocks, const float *x, int H, const int32_t *tok, float *act, float *y)
{
    qdec_gate_up<<<blocks, WARPS * 32, 0, cb->stream>>>(pcs, n_pcs, x, H, tok, act);
    qdec_down<<<dblocks, WARPS * 32, 0, cb->stream>>>(pcs, n_pcs, H, act, y);
}

/* moe_cuda_qgemm of quantization Q. */
template <int Q>
static void launch_qgemm(struct cuda_backend *cb, const struct moe_expert_weights *w,
                         const float *x, int H, const int32_t *tok, int n, bool tc, float *act,
                         float *y)
{
    const int F = (int)w->ffn;
    /* grid.y is at most 65535 tiles of tokens */
    const int chunk = 65535 * QT_N;
    qgemm_args gu = {}, d = {};

    gu.a = moe_cuda_qmat(w, w->gate, w->gate_s, H);
    gu.b = moe_cuda_qmat(w, w->up, w->up_s, H);
    gu.rows = F;
    gu.K = H;
    gu.x = x;
    gu.xal = aligned16(x);
    gu.ldo = F;
    gu.bias_a = w->gate_bias;
    gu.bias_b = w->up_bias;
    gu.act = (int)w->act;
    gu.alpha = w->alpha;
    gu.limit = w->limit;
    d.a = moe_cuda_qmat(w, w->down, w->down_s, F);
    d.b = d.a;
    d.rows = H;
    d.K = F;
    d.tok = NULL;
    d.xal = aligned16(act);
    d.ldo = H;
    d.bias_a = w->down_bias;
    for (int t0 = 0; t0 < n; t0 += chunk) {
        const int nc = MOE_MIN(chunk, n - t0);
        const unsigned ty = (unsigned)((nc + QT_N - 1) / QT_N);

        gu.tok = tok + t0;
        gu.n = nc;
        gu.out = act + (size_t)t0 * (size_t)F;
        d.x = gu.out;
        d.n = nc;
        d.out = y + (size_t)t0 * (size_t)H;
        const dim3 g1((unsigned)((F + QT_M - 1) / QT_M), ty);
        const dim3 g2((unsigned)((H + QT_M - 1) / QT_M), ty);

        if (tc) {
            qgemm_tc<Q, true><<<g1, QT_TPB, 0, cb->stream>>>(gu);
            qgemm_tc<Q, false><<<g2, QT_TPB, 0, cb->stream>>>(d);
        } else {
            qgemm<Q, true><<<g1, QT_TPB, 0, cb->stream>>>(gu);
            qgemm<Q, false><<<g2, QT_TPB, 0, cb->stream>>>(d);
        }
    }
}

void moe_cuda_qgemm(struct cuda_backend *cb, const struct moe_expert_weights *w, const float *x,
                    int H, const int32_t *tok, int n, bool tc, float *act, float *y)
{
    switch (w->quant.q) {
    case MOE_QUANT_FP8:
        launch_qgemm<MOE_QUANT_FP8>(cb, w, x, H, tok, n, tc, act, y);
        break;
    case MOE_QUANT_INT8:
        launch_qgemm<MOE_QUANT_INT8>(cb, w, x, H, tok, n, tc, act, y);
        break;
    case MOE_QUANT_INT4:
        launch_qgemm<MOE_QUANT_INT4>(cb, w, x, H, tok, n, tc, act, y);
        break;
    default:
        launch_qgemm<MOE_QUANT_MXFP4>(cb, w, x, H, tok, n, tc, act, y);
        break;
    }
}
