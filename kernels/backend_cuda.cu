/*
 * The CUDA backend: struct moe_backend_ops over one device (see moe_cuda.h
 * for the contract).
 *
 * Owns: a stream, a cuBLAS handle bound to it, and three scratch buffers
 * that grow as needed and are reused across calls: device scratch for
 * activations and intermediates, device metadata and its pinned host
 * staging copy.  Every call that uses them holds `lock` and leaves the
 * stream idle on return, so the next call may overwrite them.
 *
 * grouped_ffn.  The (work item, token) pairs are laid out as rows, in
 * work-item order; items with more than `decode_max` tokens are split into
 * pieces that fit the scratch cap, and consecutive pieces form groups whose
 * outputs fit it.  For each group:
 *   1. decode pieces (few tokens per expert): one launch computes every
 *      gate and up row of every piece against the piece's tokens
 *      (a warp per weight row, 16-byte loads, fp32 activations, 8 tokens per
 *      pass) and stores act(g, u); one launch does the down rows;
 *   2. GEMM pieces: gather the rows' activations in the weight dtype, cuBLAS
 *      gate and up (one GEMM when up follows gate in memory), SwiGLU into
 *      the weight dtype, cuBLAS down; fp32 accumulation throughout;
 *      quantized pieces (FP8, INT8, INT4, MXFP4: backend_cuda_quant.cu): two
 *      decode launches of their own (qdec_*) read the packed values and
 *      scales (a warp per row, 16 values per lane and step, decoded in
 *      registers); larger pieces take the tiled kernel (qgemm: tiles
 *      dequantized into shared memory, fp32 sums; qgemm_tc on bf16 tensor
 *      cores for items of precision bf16 on sm_80 and later), gate and up
 *      with the activation in one launch, down in another;
 *      act(g, u) is silu(g) * u, or gpt-oss's clamped SwiGLU, after the
 *      gate and up biases when the expert has them; its down bias is added
 *      to y;
 *   3. combine: for each token of the group, out[t] += s_r * y_r over its
 *      rows r in row order, one thread per output element.
 * Each piece writes its own rows of y, never another's, and only the
 * combine touches out, in a fixed order: no atomics, and results do not
 * depend on timing, on the decode/GEMM choice of other items, or on how
 * the caller splits a batch into calls.
 *
 * Errors.  A CUDA error that leaves the context unusable (sticky:
 * moe_cuda_error_sticky) loses the device: the call returns
 * -ENOTRECOVERABLE, lost_msg names the error, and every later call fails at
 * once without touching CUDA (alloc returns NULL); the daemon then exits to
 * be restarted.  Other errors are cleared (cudaGetLastError) and fail only
 * their call.  Every failure path synchronises the stream and looks at
 * what that returns, so that a sticky error met inside cuBLAS or by an
 * earlier kernel is classified too.
 */
#include "expert_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "common.h"
#include "log.h"
#include "quant.h"
}

#define COMBINE_TPB 256 /* threads per block of the element kernels */
#define DEFAULT_SCRATCH (512ull << 20)
#define MM_KERNEL_MAX_TOKENS 32 /* matmul: row kernel up to here, fp32 cuBLAS above */

/* ---- scratch and errors ------------------------------------------------------------------ */

int moe_cuda_scratch(void **buf, size_t *have, size_t bytes, bool host)
{
    size_t want;
    cudaError_t e;

    if (bytes <= *have)
        return 0;
    want = bytes + bytes / 4;
    want = (want + 4095) & ~(size_t)4095;
    if (*buf) {
        if (host)
            cudaFreeHost(*buf);
        else
            cudaFree(*buf);
    }
    *buf = NULL;
    *have = 0;
    e = host ? cudaHostAlloc(buf, want, cudaHostAllocDefault) : cudaMalloc(buf, want);
    if (e != cudaSuccess) {
        /* Clear the (non-sticky) error so that later calls do not see it. */
        cudaGetLastError();
        *buf = NULL;
        return -ENOMEM;
    }
    *have = want;
    return 0;
}

extern "C" bool moe_cuda_error_sticky(int code)
{
    switch (code) {
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContained:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case 721: /* cudaErrorTensorMemoryLeak (CUDA 12.8 and later) */
    case cudaErrorMpsClientTerminated:
    case cudaErrorExternalDevice:
        return true;
    default:
        return false;
    }
}

int moe_cuda_lose(struct cuda_backend *cb, cudaError_t e, const char *what)
{
    if (!__atomic_exchange_n(&cb->losing, 1, __ATOMIC_RELAXED)) {
        snprintf(cb->lost_msg, sizeof(cb->lost_msg),
                 "CUDA device %d lost: %s (%s) in %s; the CUDA context cannot be used again",
                 cb->device, cudaGetErrorName(e), cudaGetErrorString(e), what);
        /* Release: publishes lost_msg; pairs with the acquire in
         * moe_cuda_lost(). */
        __atomic_store_n(&cb->lost, 1, __ATOMIC_RELEASE);
        moe_log(MOE_LOG_ERROR, "cuda backend: %s", cb->lost_msg);
    }
    return -ENOTRECOVERABLE;
}

const char *moe_cuda_lost(struct cuda_backend *cb)
{
    return __atomic_load_n(&cb->lost, __ATOMIC_ACQUIRE) ? cb->lost_msg : NULL;
}

int moe_cuda_fail(struct cuda_backend *cb, cudaError_t e, const char *what)
{
    snprintf(cb->last_error, sizeof(cb->last_error), "%s: %s", what, cudaGetErrorString(e));
    if (moe_cuda_error_sticky(e))
        return moe_cuda_lose(cb, e, what);
    cudaGetLastError();
    return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

/* After a failed call (lock held): waits for the stream, and when that
 * shows a sticky error (met by cuBLAS or a kernel before the failure was
 * seen) loses the device.  r, or -ENOTRECOVERABLE. */
static int fail_sync(struct cuda_backend *cb, int r, const char *what)
{
    cudaError_t e = cudaStreamSynchronize(cb->stream);

    if (e != cudaSuccess && moe_cuda_error_sticky(e))
        return moe_cuda_lose(cb, e, what);
    if (e != cudaSuccess)
        cudaGetLastError();
    return moe_cuda_lost(cb) ? -ENOTRECOVERABLE : r;
}

static int blas_fail(struct cuda_backend *cb, cublasStatus_t s, const char *what)
{
    snprintf(cb->last_error, sizeof(cb->last_error), "%s: cuBLAS status %d", what, (int)s);
    return s == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -EIO;
}

/* ---- kernels ------------------------------------------------------------------------------- */

/* acc[j] += dot(w[0..K), xr[j][0..K)) for j < nt, partial per lane. */
template <typename T, bool VEC>
static __device__ __forceinline__ void
rows_dot2(const T *w0, const T *w1, int K, const float *const *xr, int nt, float *a0, float *a1)
{
    const int lane = threadIdx.x & 31;

    if (VEC) {
        constexpr int V = wvec<T>::N;
#pragma unroll 2
        for (int c = lane * V; c < K; c += 32 * V) {
            float g[V], u[V];

            wvec<T>::load(w0 + c, g);
            if (w1)
                wvec<T>::load(w1 + c, u);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j < nt) {
                    float xv[V];
#pragma unroll
                    for (int q = 0; q < V; q += 4) {
                        float4 t = *reinterpret_cast<const float4 *>(xr[j] + c + q);
                        xv[q] = t.x;
                        xv[q + 1] = t.y;
                        xv[q + 2] = t.z;
                        xv[q + 3] = t.w;
                    }
#pragma unroll
                    for (int v = 0; v < V; v++) {
                        a0[j] = fmaf(g[v], xv[v], a0[j]);
                        if (w1)
                            a1[j] = fmaf(u[v], xv[v], a1[j]);
                    }
                }
            }
        }
    } else {
        for (int c = lane; c < K; c += 32) {
            float g = to_f32(w0[c]), u = w1 ? to_f32(w1[c]) : 0.0f;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j < nt) {
                    a0[j] = fmaf(g, xr[j][c], a0[j]);
                    if (w1)
                        a1[j] = fmaf(u, xr[j][c], a1[j]);
                }
            }
        }
    }
}

template <typename T>
static __device__ void gate_up_row(const dec_piece &p, int f, const float *x, int H,
                                   const int32_t *tok, float *act)
{
    const int lane = threadIdx.x & 31;
    const T *g = static_cast<const T *>(p.gate) + (size_t)f * H;
    const T *u = static_cast<const T *>(p.up) + (size_t)f * H;

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
        if (p.vec_gu)
            rows_dot2<T, true>(g, u, H, xr, nt, ag, au);
        else
            rows_dot2<T, false>(g, u, H, xr, nt, ag, au);
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

template <typename T>
static __device__ void down_row(const dec_piece &p, int h, int H, const float *act, float *y)
{
    const int lane = threadIdx.x & 31;
    const T *d = static_cast<const T *>(p.down) + (size_t)h * p.F;

    for (int t0 = 0; t0 < p.n; t0 += NT) {
        const int nt = min(NT, p.n - t0);
        const float *ar[NT];
        float acc[NT];

#pragma unroll
        for (int j = 0; j < NT; j++) {
            ar[j] = act + p.act_off + (int64_t)(t0 + (j < nt ? j : 0)) * p.F;
            acc[j] = 0.0f;
        }
        if (p.vec_d)
            rows_dot2<T, true>(d, (const T *)nullptr, p.F, ar, nt, acc, acc);
        else
            rows_dot2<T, false>(d, (const T *)nullptr, p.F, ar, nt, acc, acc);
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

static __global__ void __launch_bounds__(WARPS * 32)
    dec_gate_up(const dec_piece *pcs, int n_pcs, const float *x, int H, const int32_t *tok,
                float *act)
{
    const dec_piece &p = pcs[find_piece(pcs, n_pcs, blockIdx.x, false)];
    const int f = (blockIdx.x - p.blk0) * WARPS + threadIdx.x / 32;

    if (f >= p.F)
        return;
    switch (p.dtype) {
    case MOE_DTYPE_BF16:
        gate_up_row<__nv_bfloat16>(p, f, x, H, tok, act);
        break;
    case MOE_DTYPE_F16:
        gate_up_row<__half>(p, f, x, H, tok, act);
        break;
    default:
        gate_up_row<float>(p, f, x, H, tok, act);
        break;
    }
}

static __global__ void __launch_bounds__(WARPS * 32)
    dec_down(const dec_piece *pcs, int n_pcs, int H, const float *act, float *y)
{
    const dec_piece &p = pcs[find_piece(pcs, n_pcs, blockIdx.x, true)];
    const int h = (blockIdx.x - p.dblk0) * WARPS + threadIdx.x / 32;

    if (h >= H)
        return;
    switch (p.dtype) {
    case MOE_DTYPE_BF16:
        down_row<__nv_bfloat16>(p, h, H, act, y);
        break;
    case MOE_DTYPE_F16:
        down_row<__half>(p, h, H, act, y);
        break;
    default:
        down_row<float>(p, h, H, act, y);
        break;
    }
}

/* y[t, r] = W[r, :] . x[t, :] for a few tokens: a warp per row of W. */
template <typename T, bool VEC>
static __global__ void __launch_bounds__(WARPS * 32)
    mm_rows(const T *W, int rows, int cols, const float *x, int n, float *y)
{
    const int r = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;

    if (r >= rows)
        return;
    for (int t0 = 0; t0 < n; t0 += NT) {
        const int nt = min(NT, n - t0);
        const float *xr[NT];
        float acc[NT];

#pragma unroll
        for (int j = 0; j < NT; j++) {
            xr[j] = x + (size_t)(t0 + (j < nt ? j : 0)) * cols;
            acc[j] = 0.0f;
        }
        rows_dot2<T, VEC>(W + (size_t)r * cols, (const T *)nullptr, cols, xr, nt, acc, acc);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j < nt) {
                float a = warp_sum(acc[j]);

                if (lane == 0)
                    y[(size_t)(t0 + j) * rows + r] = a;
            }
        }
    }
}

/* Widens n weights to fp32. */
template <typename T> static __global__ void widen(const T *w, size_t n, float *out)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = to_f32(w[i]);
}

/* xc[i, :] = x[tok[i], :] in T, for i < n. */
template <typename T>
static __global__ void gather(const float *x, int H, const int32_t *tok, int n, T *xc)
{
    const int i = blockIdx.x;
    const float *src = x + (size_t)tok[i] * H;
    T *dst = xc + (size_t)i * H;

    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < H; c += gridDim.y * blockDim.x)
        dst[c] = from_f32<T>(src[c]);
}

/* The expert's activation parameters, for the GEMM path's kernels. */
struct act_params {
    const float *gb, *ub; /* gate and up biases [F] or NULL */
    int act;              /* enum moe_activation */
    float alpha, limit;
};

/* a[i, f] = act(g[i, f] + gb[f], u[i, f] + ub[f]) in T; g and u rows ld
 * floats apart. */
template <typename T>
static __global__ void swiglu(const float *g, const float *u, int64_t ld, int F, int n,
                              act_params ap, T *a)
{
    const int i = blockIdx.x;

    for (int f = blockIdx.y * blockDim.x + threadIdx.x; f < F; f += gridDim.y * blockDim.x) {
        float gv = g[i * ld + f], uv = u[i * ld + f];

        if (ap.gb)
            gv += ap.gb[f];
        if (ap.ub)
            uv += ap.ub[f];
        a[(size_t)i * F + f] = from_f32<T>(expert_act(gv, uv, ap.act, ap.alpha, ap.limit));
    }
}

/* y[i, h] += b[h] for i < n, h < H. */
static __global__ void add_bias(float *y, const float *b, int H, int n)
{
    const int i = blockIdx.x;

    for (int h = blockIdx.y * blockDim.x + threadIdx.x; h < H; h += gridDim.y * blockDim.x)
        y[(size_t)i * H + h] += b[h];
}

/* out[utok[k], c] += sum over rows r in rows[start[k] .. start[k+1]) of
 * scale[r] * y[r, c], in that order. */
static __global__ void combine(const int32_t *utok, const int32_t *start, const int32_t *rows,
                               const float *scale, const float *y, int H, float *out)
{
    const int k = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;

    if (c >= H)
        return;
    float *o = out + (size_t)utok[k] * H + c;
    float acc = *o;

    for (int i = start[k]; i < start[k + 1]; i++) {
        const int r = rows[i];

        acc = fmaf(scale[r], y[(size_t)r * H + c], acc);
    }
    *o = acc;
}

/* ---- host side ------------------------------------------------------------------------------ */

static cudaDataType_t cuda_type(enum moe_dtype t)
{
    return t == MOE_DTYPE_BF16 ? CUDA_R_16BF : t == MOE_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* Y[i, r] (row-major, ldy) = sum_c W[r, c] X[i, c]: column-major
 * Y^T[rows, n] = (W^T)^T[rows, cols] X^T[cols, n]. */
static cublasStatus_t gemm_rows(struct cuda_backend *cb, enum moe_dtype t, const void *W,
                                int64_t rows, int64_t cols, const void *X, int n, float *Y,
                                int64_t ldy)
{
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t ct = cuda_type(t);

    return cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, n, (int)cols, &one, W, ct,
                        (int)cols, X, ct, (int)cols, &zero, Y, CUDA_R_32F, (int)ldy,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

static void cuda_free_backend(struct moe_backend *b)
{
    struct cuda_backend *cb = cuda_of(b);

    if (!cb)
        return;
    cudaSetDevice(cb->device);
    if (cb->stream)
        cudaStreamSynchronize(cb->stream);
    if (cb->blas)
        cublasDestroy(cb->blas);
    cudaFree(cb->dscratch);
    cudaFree(cb->dmeta);
    cudaFreeHost(cb->hmeta);
    if (cb->stream)
        cudaStreamDestroy(cb->stream);
    pthread_mutex_destroy(&cb->lock);
    free(cb);
}

static void *cuda_alloc(struct moe_backend *b, size_t bytes)
{
    struct cuda_backend *cb = cuda_of(b);
    void *p = NULL;

    cudaError_t e;

    if (moe_cuda_lost(cb))
        return NULL;
    cudaSetDevice(cb->device);
    /* cudaMalloc returns 256-byte aligned blocks; never NULL for 0 bytes. */
    e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        if (moe_cuda_error_sticky(e))
            moe_cuda_lose(cb, e, "allocating device memory");
        else
            cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cuda_mem_free(struct moe_backend *b, void *p)
{
    if (!p)
        return;
    cudaSetDevice(cuda_of(b)->device);
    cudaFree(p);
}

static int cuda_copy(struct moe_backend *b, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb = cuda_of(b);
    cudaError_t e;

    if (moe_cuda_lost(cb))
        return -ENOTRECOVERABLE;
    if (bytes == 0)
        return 0;
    cudaSetDevice(cb->device);
    e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cb->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(cb->stream);
    if (e != cudaSuccess) {
        if (moe_cuda_error_sticky(e))
            return moe_cuda_lose(cb, e, "a copy to or from the device");
        cudaGetLastError();
        return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
    }
    return 0;
}

static int cuda_matmul(struct moe_backend *b, const void *w, enum moe_dtype dtype, int64_t rows,
                       int64_t cols, const float *x, int n_tokens, float *y)
{
    struct cuda_backend *cb = cuda_of(b);
    cudaError_t e;
    int r = 0;

    if (rows <= 0 || cols <= 0 || rows > INT32_MAX || cols > INT32_MAX || n_tokens < 0)
        return -EINVAL;
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16)
        return -EINVAL;
    if (n_tokens == 0)
        return 0;
    if (!w || !x || !y)
        return -EINVAL;
    if (moe_cuda_lost(cb))
        return -ENOTRECOVERABLE;
    pthread_mutex_lock(&cb->lock);
    cudaSetDevice(cb->device);
    if (n_tokens <= MM_KERNEL_MAX_TOKENS) {
        /* fp32 activations against the weights as stored. */
        const size_t V = dtype == MOE_DTYPE_F32 ? 4 : 8;
        const bool vec = cols % (int64_t)V == 0 && aligned16(w) && aligned16(x);
        const unsigned blocks = (unsigned)((rows + WARPS - 1) / WARPS);
        const int R = (int)rows, C = (int)cols;

        switch (dtype) {
        case MOE_DTYPE_BF16:
            if (vec)
                mm_rows<__nv_bfloat16, true><<<blocks, WARPS * 32, 0, cb->stream>>>(
                    (const __nv_bfloat16 *)w, R, C, x, n_tokens, y);
            else
                mm_rows<__nv_bfloat16, false><<<blocks, WARPS * 32, 0, cb->stream>>>(
                    (const __nv_bfloat16 *)w, R, C, x, n_tokens, y);
            break;
        case MOE_DTYPE_F16:
            if (vec)
                mm_rows<__half, true><<<blocks, WARPS * 32, 0, cb->stream>>>((const __half *)w, R,
                                                                             C, x, n_tokens, y);
            else
                mm_rows<__half, false><<<blocks, WARPS * 32, 0, cb->stream>>>((const __half *)w, R,
                                                                              C, x, n_tokens, y);
            break;
        default:
            if (vec)
                mm_rows<float, true>
                    <<<blocks, WARPS * 32, 0, cb->stream>>>((const float *)w, R, C, x, n_tokens, y);
            else
                mm_rows<float, false>
                    <<<blocks, WARPS * 32, 0, cb->stream>>>((const float *)w, R, C, x, n_tokens, y);
            break;
        }
    } else {
        /* Routers pick experts by small logit differences: compute them in
         * fp32 (weights widened once per call), not in the weights' dtype. */
        const float *wf = (const float *)w;
        const size_t n = (size_t)rows * (size_t)cols;

        if (dtype != MOE_DTYPE_F32) {
            r = moe_cuda_scratch(&cb->dscratch, &cb->dscratch_bytes, n * sizeof(float), false);
            if (r < 0)
                goto out;
            unsigned blocks = (unsigned)MOE_MIN((n + 255) / 256, (size_t)65535);

            if (dtype == MOE_DTYPE_BF16)
                widen<<<blocks, 256, 0, cb->stream>>>((const __nv_bfloat16 *)w, n,
                                                      (float *)cb->dscratch);
            else
                widen<<<blocks, 256, 0, cb->stream>>>((const __half *)w, n, (float *)cb->dscratch);
            wf = (const float *)cb->dscratch;
        }
        cublasStatus_t s = gemm_rows(cb, MOE_DTYPE_F32, wf, rows, cols, x, n_tokens, y, rows);

        if (s != CUBLAS_STATUS_SUCCESS) {
            r = blas_fail(cb, s, "router matmul");
            goto out;
        }
    }
    e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(cb->stream);
    if (e != cudaSuccess)
        r = moe_cuda_fail(cb, e, "matmul");
out:
    if (r < 0)
        r = fail_sync(cb, r, "matmul");
    pthread_mutex_unlock(&cb->lock);
    return r;
}

/* ---- grouped FFN ---------------------------------------------------------------------------- */

/* A run of rows of one work item. */
struct piece {
    int item;
    int row0; /* first row, in the call's row order */
    int n;
    bool dec; /* decode kernels (else cuBLAS) */
};

static size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) & ~(a - 1);
}

/* Bytes of cuBLAS temporaries for n rows of an item. */
static size_t blas_temp(const struct moe_expert_weights *w, int n)
{
    size_t es = moe_dtype_size(w->dtype), F = (size_t)w->ffn, H = (size_t)w->hidden;

    /* quantized: the SwiGLU intermediate only (the tiled kernels read x and
     * the weights where they are) */
    if (w->quant.q != MOE_QUANT_NONE)
        return align_up((size_t)n * F * 4, 256);
    return align_up((size_t)n * H * es, 256) + align_up((size_t)n * 2 * F * 4, 256) +
           align_up((size_t)n * F * es, 256);
}

/* Runs one group: pieces [p0, p1) whose rows are [r0, r1). */
static int run_group(struct cuda_backend *cb, const float *x, int64_t H, int n_tokens,
                     const struct moe_ffn_work *work, const struct piece *pc, int p0, int p1,
                     const int32_t *tok, const float *scale, int r0, int r1, int32_t *cnt,
                     float *out)
{
    const int GR = r1 - r0;
    int n_dec = 0, n_u = 0, r;
    size_t act_floats = 0, temp = 0, off_tok, off_scale, off_pcs, off_utok, off_start, off_rows,
           meta, off_y, off_act, off_temp, dbytes;
    cudaError_t e;

    for (int i = p0; i < p1; i++) {
        const struct moe_expert_weights *w = work[pc[i].item].w;

        if (pc[i].dec) {
            n_dec++;
            act_floats += align_up((size_t)pc[i].n * (size_t)w->ffn, 4);
        } else {
            temp = MOE_MAX(temp, blas_temp(w, pc[i].n));
        }
    }
    /* Tokens of the group, and each one's rows in order (counting sort). */
    memset(cnt, 0, ((size_t)n_tokens + 1) * sizeof(*cnt));
    for (int i = r0; i < r1; i++)
        cnt[tok[i] + 1]++;
    for (int t = 0; t < n_tokens; t++)
        n_u += cnt[t + 1] > 0;

    off_tok = 0;
    off_scale = align_up(off_tok + (size_t)GR * 4, 16);
    off_pcs = align_up(off_scale + (size_t)GR * 4, 16);
    off_utok = align_up(off_pcs + (size_t)n_dec * sizeof(dec_piece), 16);
    off_start = align_up(off_utok + (size_t)n_u * 4, 16);
    off_rows = align_up(off_start + ((size_t)n_u + 1) * 4, 16);
    meta = off_rows + (size_t)GR * 4;
    off_y = 0;
    off_act = align_up((size_t)GR * (size_t)H * 4, 256);
    off_temp = off_act + align_up(act_floats * 4, 256);
    dbytes = off_temp + temp;

    r = moe_cuda_scratch(&cb->hmeta, &cb->hmeta_bytes, meta, true);
    if (r == 0)
        r = moe_cuda_scratch(&cb->dmeta, &cb->dmeta_bytes, meta, false);
    if (r == 0)
        r = moe_cuda_scratch(&cb->dscratch, &cb->dscratch_bytes, dbytes, false);
    if (r < 0) {
        snprintf(cb->last_error, sizeof(cb->last_error),
                 "out of device memory for %zu bytes of expert scratch", dbytes + meta);
        return r;
    }

    uint8_t *hm = (uint8_t *)cb->hmeta, *dm = (uint8_t *)cb->dmeta;
    int32_t *h_tok = (int32_t *)(hm + off_tok), *h_utok = (int32_t *)(hm + off_utok);
    int32_t *h_start = (int32_t *)(hm + off_start), *h_rows = (int32_t *)(hm + off_rows);
    float *h_scale = (float *)(hm + off_scale);
    dec_piece *h_pcs = (dec_piece *)(hm + off_pcs);
    uint8_t *ds = (uint8_t *)cb->dscratch;
    float *y = (float *)(ds + off_y), *act = (float *)(ds + off_act);
    uint8_t *tmp = ds + off_temp;

    memcpy(h_tok, tok + r0, (size_t)GR * 4);
    memcpy(h_scale, scale + r0, (size_t)GR * 4);
    {
        int k = 0;

        for (int t = 0; t < n_tokens; t++) {
            if (cnt[t + 1] > 0) {
                h_utok[k] = t;
                h_start[k] = 0;
                k++;
            }
        }
        /* cnt becomes the first slot of each token in h_rows. */
        int sum = 0;

        for (int t = 0; t < n_tokens; t++) {
            int c = cnt[t + 1];

            cnt[t] = sum;
            sum += c;
        }
        for (int u = 0; u < n_u; u++)
            h_start[u] = cnt[h_utok[u]];
        h_start[n_u] = GR;
        for (int i = r0; i < r1; i++)
            h_rows[cnt[tok[i]]++] = i - r0;
    }
    {
        /* plain pieces first, then quantized ones: each kind has its own
         * launches (the quantized kernels' registers would lower the plain
         * ones' occupancy), blocks numbered from 0 in each */
        int blk[2] = {0, 0}, dblk[2] = {0, 0}, k = 0, n_plain = 0;
        int64_t aoff = 0;

        for (int pass = 0; pass < 2; pass++)
            for (int i = p0; i < p1; i++) {
                const struct moe_expert_weights *w = work[pc[i].item].w;
                dec_piece *d;
                size_t V;

                if (!pc[i].dec || (w->quant.q != MOE_QUANT_NONE) != (pass == 1))
                    continue;
                n_plain += pass == 0;
                d = &h_pcs[k++];
                V = w->dtype == MOE_DTYPE_F32 ? 4 : 8;
                d->gate = w->gate;
                d->up = w->up;
                d->down = w->down;
                d->gb = w->gate_bias;
                d->ub = w->up_bias;
                d->db = w->down_bias;
                d->act = (int)w->act;
                d->alpha = w->alpha;
                d->limit = w->limit;
                d->act_off = aoff;
                d->F = (int)w->ffn;
                d->row0 = pc[i].row0 - r0;
                d->n = pc[i].n;
                d->blk0 = blk[pass];
                d->dblk0 = dblk[pass];
                d->dtype = (int)w->dtype;
                d->q = (int)w->quant.q;
                if (w->quant.q != MOE_QUANT_NONE) {
                    /* the values' alignment is in qg, qu, qd */
                    d->vec_gu = aligned16(x);
                    d->vec_d = 1;
                    d->qg = moe_cuda_qmat(w, w->gate, w->gate_s, H);
                    d->qu = moe_cuda_qmat(w, w->up, w->up_s, H);
                    d->qd = moe_cuda_qmat(w, w->down, w->down_s, w->ffn);
                } else {
                    d->vec_gu = H % (int64_t)V == 0 && aligned16(w->gate) && aligned16(w->up) &&
                                aligned16(x);
                    d->vec_d = w->ffn % (int64_t)V == 0 && aligned16(w->down);
                    memset(&d->qg, 0, sizeof(d->qg));
                    d->qu = d->qg;
                    d->qd = d->qg;
                }
                blk[pass] += (int)((w->ffn + WARPS - 1) / WARPS);
                dblk[pass] += (int)((H + WARPS - 1) / WARPS);
                aoff += (int64_t)align_up((size_t)pc[i].n * (size_t)w->ffn, 4);
            }
        e = cudaMemcpyAsync(dm, hm, meta, cudaMemcpyHostToDevice, cb->stream);
        if (e != cudaSuccess)
            return moe_cuda_fail(cb, e, "copying expert metadata");
        const dec_piece *dp = (const dec_piece *)(dm + off_pcs);
        const int32_t *dt = (const int32_t *)(dm + off_tok);

        if (n_plain > 0) {
            dec_gate_up<<<blk[0], WARPS * 32, 0, cb->stream>>>(dp, n_plain, x, (int)H, dt, act);
            dec_down<<<dblk[0], WARPS * 32, 0, cb->stream>>>(dp, n_plain, (int)H, act, y);
        }
        if (n_dec > n_plain)
            moe_cuda_qdec(cb, dp + n_plain, n_dec - n_plain, blk[1], dblk[1], x, (int)H, dt, act,
                          y);
    }
    for (int i = p0; i < p1; i++) {
        const struct moe_expert_weights *w = work[pc[i].item].w;
        const int n = pc[i].n, F = (int)w->ffn;
        const size_t es = moe_dtype_size(w->dtype);
        const int32_t *dtok = (const int32_t *)(dm + off_tok) + (pc[i].row0 - r0);
        void *xc = tmp;
        float *gu = (float *)(tmp + align_up((size_t)n * (size_t)H * es, 256));
        void *a = (uint8_t *)gu + align_up((size_t)n * 2 * (size_t)F * 4, 256);
        float *yp = y + (size_t)(pc[i].row0 - r0) * (size_t)H;
        const dim3 ggrid((unsigned)n, (unsigned)MOE_MIN((H + 255) / 256, 64));
        const dim3 sgrid((unsigned)n, (unsigned)MOE_MIN((F + 255) / 256, 64));
        /* up right after gate (the engine's staging packs them so): one GEMM
         * of 2F rows gives each token's gate then up values. */
        const bool fused = (const uint8_t *)w->up == (const uint8_t *)w->gate + (size_t)F * H * es;
        const float *g = gu, *u;
        const act_params ap = {w->gate_bias, w->up_bias, (int)w->act, w->alpha, w->limit};
        int64_t ld;
        cublasStatus_t s;

        /* quantized, precision bf16, a device with bf16 tensor cores: the
         * tensor core kernel; else the fp32 one */
        const bool tc = work[pc[i].item].precision == MOE_PRECISION_BF16 && cb->cc_major >= 8;

        if (pc[i].dec)
            continue;
        if (w->quant.q != MOE_QUANT_NONE) {
            moe_cuda_qgemm(cb, w, x, (int)H, dtok, n, tc, (float *)tmp, yp);
            continue;
        }
        switch (w->dtype) {
        case MOE_DTYPE_BF16:
            gather<<<ggrid, 256, 0, cb->stream>>>(x, (int)H, dtok, n, (__nv_bfloat16 *)xc);
            break;
        case MOE_DTYPE_F16:
            gather<<<ggrid, 256, 0, cb->stream>>>(x, (int)H, dtok, n, (__half *)xc);
            break;
        default:
            gather<<<ggrid, 256, 0, cb->stream>>>(x, (int)H, dtok, n, (float *)xc);
            break;
        }
        if (fused) {
            s = gemm_rows(cb, w->dtype, w->gate, 2 * (int64_t)F, H, xc, n, gu, 2 * (int64_t)F);
            u = gu + F;
            ld = 2 * (int64_t)F;
        } else {
            s = gemm_rows(cb, w->dtype, w->gate, F, H, xc, n, gu, F);
            if (s == CUBLAS_STATUS_SUCCESS)
                s = gemm_rows(cb, w->dtype, w->up, F, H, xc, n, gu + (size_t)n * F, F);
            u = gu + (size_t)n * F;
            ld = F;
        }
        if (s != CUBLAS_STATUS_SUCCESS)
            return blas_fail(cb, s, "expert gate/up GEMM");
        switch (w->dtype) {
        case MOE_DTYPE_BF16:
            swiglu<<<sgrid, 256, 0, cb->stream>>>(g, u, ld, F, n, ap, (__nv_bfloat16 *)a);
            break;
        case MOE_DTYPE_F16:
            swiglu<<<sgrid, 256, 0, cb->stream>>>(g, u, ld, F, n, ap, (__half *)a);
            break;
        default:
            swiglu<<<sgrid, 256, 0, cb->stream>>>(g, u, ld, F, n, ap, (float *)a);
            break;
        }
        s = gemm_rows(cb, w->dtype, w->down, H, F, a, n, yp, H);
        if (s != CUBLAS_STATUS_SUCCESS)
            return blas_fail(cb, s, "expert down GEMM");
        if (w->down_bias)
            add_bias<<<ggrid, 256, 0, cb->stream>>>(yp, w->down_bias, (int)H, n);
    }
    if (n_u > 0) {
        const dim3 cgrid((unsigned)n_u, (unsigned)((H + COMBINE_TPB - 1) / COMBINE_TPB));

        combine<<<cgrid, COMBINE_TPB, 0, cb->stream>>>(
            (const int32_t *)(dm + off_utok), (const int32_t *)(dm + off_start),
            (const int32_t *)(dm + off_rows), (const float *)(dm + off_scale), y, (int)H, out);
    }
    e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(cb->stream);
    if (e != cudaSuccess)
        return moe_cuda_fail(cb, e, "expert FFN kernels");
    return 0;
}

static int check_work(const struct moe_ffn_work *wk, int64_t hidden, int n_tokens)
{
    const struct moe_expert_weights *w = wk->w;

    if (wk->n_tokens < 0)
        return -EINVAL;
    if (wk->n_tokens == 0)
        return 0;
    if (!w || !wk->tokens || !wk->scales || !w->gate || !w->up || !w->down)
        return -EINVAL;
    if (w->quant.q != MOE_QUANT_NONE) {
        /* the layout quant.h describes (as the CPU backend checks it) */
        const struct moe_quant_fmt *f = &w->quant;

        if ((unsigned)f->q >= MOE_QUANT_COUNT || w->hidden % 32 || w->ffn % 32 || f->bcols <= 0 ||
            f->bcols % 32 || f->brows <= 0 || (f->q != MOE_QUANT_FP8 && f->brows != 1) ||
            (f->q == MOE_QUANT_MXFP4 && f->bcols != 32) || !w->gate_s || !w->up_s || !w->down_s ||
            w->dtype != moe_quant_value_dtype(f->q))
            return -EINVAL;
    } else if (w->dtype != MOE_DTYPE_F32 && w->dtype != MOE_DTYPE_F16 &&
               w->dtype != MOE_DTYPE_BF16) {
        return -EINVAL;
    }
    if (w->hidden != hidden || w->ffn <= 0 || w->ffn > INT32_MAX / 2)
        return -EINVAL;
    if (w->act != MOE_ACT_SILU && w->act != MOE_ACT_SWIGLU_CLAMP)
        return -EINVAL;
    if (w->act == MOE_ACT_SWIGLU_CLAMP &&
        !(isfinite(w->alpha) && w->alpha > 0 && isfinite(w->limit) && w->limit > 0))
        return -EINVAL;
    for (int j = 0; j < wk->n_tokens; j++) {
        if (wk->tokens[j] < 0 || wk->tokens[j] >= n_tokens)
            return -EINVAL;
    }
    return 0;
}

static int cuda_grouped_ffn(struct moe_backend *b, const float *x, int64_t hidden, int n_tokens,
                            const struct moe_ffn_work *work, int n_work, float *out)
{
    struct cuda_backend *cb = cuda_of(b);
    int64_t R = 0;
    int n_pcs = 0, r = 0;
    size_t cap_pcs = 0;
    struct piece *pc = NULL;
    int32_t *tok = NULL, *cnt = NULL;
    float *scale = NULL;

    if (hidden <= 0 || hidden > INT32_MAX / 4 || n_tokens < 0 || n_work < 0)
        return -EINVAL;
    if (n_tokens == 0 || n_work == 0)
        return 0;
    if (!x || !out || !work)
        return -EINVAL;
    if (moe_cuda_lost(cb))
        return -ENOTRECOVERABLE;
    for (int i = 0; i < n_work; i++) {
        r = check_work(&work[i], hidden, n_tokens);
        if (r < 0)
            return r;
        R += work[i].n_tokens;
    }
    if (R == 0)
        return 0;
    if (R > INT32_MAX / 2)
        return -E2BIG;

    tok = (int32_t *)malloc((size_t)R * sizeof(*tok));
    scale = (float *)malloc((size_t)R * sizeof(*scale));
    cnt = (int32_t *)malloc(((size_t)n_tokens + 1) * sizeof(*cnt));
    if (!tok || !scale || !cnt) {
        r = -ENOMEM;
        goto out;
    }

    /* Rows in work-item order; items cut into pieces that fit the cap. */
    {
        int row = 0;

        for (int i = 0; i < n_work; i++) {
            const struct moe_ffn_work *wk = &work[i];
            const bool dec = wk->n_tokens <= cb->decode_max;
            int per = wk->n_tokens;

            if (wk->n_tokens == 0)
                continue;
            memcpy(tok + row, wk->tokens, (size_t)wk->n_tokens * sizeof(*tok));
            memcpy(scale + row, wk->scales, (size_t)wk->n_tokens * sizeof(*scale));
            if (!dec) {
                size_t one = blas_temp(wk->w, 1) + (size_t)hidden * 4;

                per = (int)MOE_MAX((uint64_t)1, MOE_MIN((uint64_t)per, cb->scratch_cap / 2 / one));
            }
            for (int j = 0; j < wk->n_tokens; j += per) {
                if ((size_t)n_pcs == cap_pcs) {
                    size_t nc = cap_pcs ? 2 * cap_pcs : 64;
                    struct piece *np = (struct piece *)realloc(pc, nc * sizeof(*pc));

                    if (!np) {
                        r = -ENOMEM;
                        goto out;
                    }
                    pc = np;
                    cap_pcs = nc;
                }
                pc[n_pcs].item = i;
                pc[n_pcs].row0 = row + j;
                pc[n_pcs].n = MOE_MIN(per, wk->n_tokens - j);
                pc[n_pcs].dec = dec;
                n_pcs++;
            }
            row += wk->n_tokens;
        }
    }

    pthread_mutex_lock(&cb->lock);
    cudaSetDevice(cb->device);
    /* Groups: consecutive pieces while their outputs and temporaries fit
     * the cap (at least one piece each). */
    for (int p0 = 0; p0 < n_pcs && r == 0;) {
        int p1 = p0;
        size_t rows = 0, act = 0, temp = 0;

        while (p1 < n_pcs) {
            const struct moe_expert_weights *w = work[pc[p1].item].w;
            size_t nr = rows + (size_t)pc[p1].n, na = act, nt = temp;

            if (pc[p1].dec)
                na += align_up((size_t)pc[p1].n * (size_t)w->ffn, 4) * 4;
            else
                nt = MOE_MAX(temp, blas_temp(w, pc[p1].n));
            if (p1 > p0 && nr * (size_t)hidden * 4 + na + nt > cb->scratch_cap)
                break;
            rows = nr;
            act = na;
            temp = nt;
            p1++;
        }
        r = run_group(cb, x, hidden, n_tokens, work, pc, p0, p1, tok, scale, pc[p0].row0,
                      pc[p1 - 1].row0 + pc[p1 - 1].n, cnt, out);
        p0 = p1;
    }
    if (r < 0)
        r = fail_sync(cb, r, "expert FFN kernels");
    pthread_mutex_unlock(&cb->lock);
out:
    free(pc);
    free(tok);
    free(scale);
    free(cnt);
    return r;
}

static const char *cuda_lost(struct moe_backend *b)
{
    return moe_cuda_lost(cuda_of(b));
}

static const struct moe_backend_ops cuda_ops = {
    .name = "cuda",
    .host_memory = false,
    .free = cuda_free_backend,
    .alloc = cuda_alloc,
    .mem_free = cuda_mem_free,
    .copy_in = cuda_copy,
    .copy_out = cuda_copy,
    .matmul = cuda_matmul,
    .grouped_ffn = cuda_grouped_ffn,
    .lost = cuda_lost,
};

extern "C" int moe_backend_cuda_init(const struct moe_cuda_config *cfg, struct moe_backend **ret,
                                     struct moe_error *err)
{
    struct moe_cuda_config c = {};
    struct cuda_backend *cb;
    int n = 0;
    cudaError_t e;
    cublasStatus_t s;

    if (cfg)
        c = *cfg;
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return moe_error_set(err, -ENODEV, "CUDA device %d: no usable CUDA driver or device: %s",
                             c.device, cudaGetErrorString(e));
    }
    if (c.device < 0 || c.device >= n)
        return moe_error_set(err, -ENODEV, "CUDA device %d does not exist: %d device(s), 0 to %d",
                             c.device, n, n - 1);
    cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
    if (!cb)
        return moe_error_set(err, -ENOMEM, "out of memory");
    cb->self.ops = &cuda_ops;
    cb->self.priv = cb;
    cb->device = c.device;
    cb->decode_max = c.decode_max_tokens == 0  ? MOE_CUDA_DECODE_MAX_TOKENS
                     : c.decode_max_tokens < 0 ? 0
                                               : MOE_MIN(c.decode_max_tokens, 64);
    cb->scratch_cap = c.scratch_bytes ? c.scratch_bytes : DEFAULT_SCRATCH;
    pthread_mutex_init(&cb->lock, NULL);
    e = cudaSetDevice(cb->device);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&cb->cc_major, cudaDevAttrComputeCapabilityMajor, cb->device);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cuda_free_backend(&cb->self);
        return moe_error_set(err, -ENODEV, "CUDA device %d cannot be used: %s", c.device,
                             cudaGetErrorString(e));
    }
    s = cublasCreate(&cb->blas);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetStream(cb->blas, cb->stream);
    if (s != CUBLAS_STATUS_SUCCESS) {
        cuda_free_backend(&cb->self);
        return moe_error_set(err, -ENOMEM,
                             "cuBLAS could not be set up on CUDA device %d: status %d", c.device,
                             (int)s);
    }
    *ret = &cb->self;
    return 0;
}

extern "C" int moe_backend_cuda_device(const struct moe_backend *b)
{
    return b && b->ops == &cuda_ops ? ((const struct cuda_backend *)b)->device : -1;
}

extern "C" const char *moe_backend_cuda_last_error(struct moe_backend *b)
{
    return b && b->ops == &cuda_ops ? cuda_of(b)->last_error : "";
}
