/*
 * Shared between the CUDA sources of kernels/ (C++ only, not installed):
 * the backend's private state, error helpers and the small device helpers
 * every kernel uses (16-bit float loads, warp sums).
 */
#ifndef MOED_KERNELS_CUDA_INTERNAL_H
#define MOED_KERNELS_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <pthread.h>

#include "moe_cuda.h"

/* One device's backend.  lock serialises the calls that use stream,
 * blas and the scratch buffers (matmul, grouped_ffn, routing). */
struct cuda_backend {
    struct moe_backend self; /* first: the engine's handle */
    int device;
    int decode_max;       /* tokens per expert computed by the decode kernels */
    int cc_major;         /* compute capability (8: bf16 tensor cores for quantized prefill) */
    uint64_t scratch_cap; /* soft cap on per-call scratch */
    cudaStream_t stream;  /* every copy and kernel of this backend */
    cublasHandle_t blas;  /* bound to stream */
    pthread_mutex_t lock;
    void *dscratch; /* device scratch (activations, intermediates); guarded by lock */
    size_t dscratch_bytes;
    void *dmeta; /* device copy of per-call metadata; guarded by lock */
    size_t dmeta_bytes;
    void *hmeta; /* pinned host staging for that metadata; guarded by lock */
    size_t hmeta_bytes;
    char last_error[256]; /* the last CUDA failure, for logs; guarded by lock */
    /* The device is lost (moe_cuda_error_sticky): set once by
     * moe_cuda_lose, never cleared; every call then fails at once with
     * -ENOTRECOVERABLE.  lost_msg is written before lost is set (release,
     * __atomic builtins: the struct is calloc'd C data) and read after
     * loading it (acquire), in moe_cuda_lost. */
    int losing; /* the one caller that writes lost_msg */
    int lost;
    char lost_msg[256];
};

static inline struct cuda_backend *cuda_of(struct moe_backend *b)
{
    return (struct cuda_backend *)b;
}

/* Grows a scratch buffer (device or pinned host) to at least bytes; the old
 * contents are lost.  0 or -ENOMEM.  Caller holds cb->lock and the stream is
 * idle (synchronised). */
int moe_cuda_scratch(void **buf, size_t *have, size_t bytes, bool host);

/* Records a CUDA failure in cb->last_error and maps it to -errno
 * (-ENOMEM for allocation failures, -ENOTRECOVERABLE for a sticky error,
 * which loses the device: moe_cuda_lose; -EIO otherwise). */
int moe_cuda_fail(struct cuda_backend *cb, cudaError_t e, const char *what);

/* Marks cb's device lost after sticky error e in what (the first call
 * only: later ones keep the first reason) and logs it.  Returns
 * -ENOTRECOVERABLE.  Any thread, lock held or not. */
int moe_cuda_lose(struct cuda_backend *cb, cudaError_t e, const char *what);

/* Why cb's device is lost, or NULL while it works.  Any thread. */
const char *moe_cuda_lost(struct cuda_backend *cb);

/* ---- device helpers --------------------------------------------------------------------- */

/* Widens 16 bytes of weights (8 bf16/f16 or 4 f32) to floats. */
template <typename T> struct wvec;

template <> struct wvec<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void load(const __nv_bfloat16 *p, float *f)
    {
        uint4 v = *reinterpret_cast<const uint4 *>(p);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};

template <> struct wvec<__half> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void load(const __half *p, float *f)
    {
        uint4 v = *reinterpret_cast<const uint4 *>(p);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2 h = *reinterpret_cast<const __half2 *>(&w[i]);
            float2 t = __half22float2(h);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
};

template <> struct wvec<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void load(const float *p, float *f)
    {
        float4 v = *reinterpret_cast<const float4 *>(p);
        f[0] = v.x;
        f[1] = v.y;
        f[2] = v.z;
        f[3] = v.w;
    }
};

static __device__ __forceinline__ float to_f32(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
static __device__ __forceinline__ float to_f32(__half v)
{
    return __half2float(v);
}
static __device__ __forceinline__ float to_f32(float v)
{
    return v;
}

template <typename T> static __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v)
{
    return __float2half_rn(v);
}
template <> __device__ __forceinline__ float from_f32<float>(float v)
{
    return v;
}

static __device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#endif
