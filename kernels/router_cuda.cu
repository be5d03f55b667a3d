/*
 * Routing on the device (moe_cuda_route, see moe_cuda.h): the rules of
 * engine/router.c reimplemented for the GPU, one thread block per token.
 *
 *   softmax: select the top_k logits (softmax is increasing in the logit);
 *            weights exp(l - max) / (sum of the k, or of all experts),
 *            computed in double and rounded once, times the scaling factor.
 *   sigmoid: c = sigmoid(l) + bias selects; with n_group > 1 and
 *            topk_group < n_group only experts of the topk_group groups with
 *            the best sum of their two largest c are candidates; weights
 *            sigmoid(l) of the picks in double, renormalised iff
 *            norm_topk_prob and top_k > 1 (denominator + 1e-20), times the
 *            scaling factor.
 * Selection is k rounds of a block-wide arg-max ordered by (value
 * descending, id ascending), which picks the same set, in the same order,
 * as the CPU's running top-k list; the k entries are then sorted by weight
 * (ties: lower id).  Owns nothing between calls; uses the backend's stream,
 * scratch and lock.
 */
#include "cuda_internal.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "common.h"
}

#define RT_THREADS 256
#define RT_MAX_EXPERTS 4096
#define RT_MAX_TOP_K 64

struct rparams {
    int sigmoid, E, K, norm, G, TG;
    float scale;
};

/* Better in selection order: larger value, then lower id. */
static __device__ __forceinline__ bool better(float v, int i, float bv, int bi)
{
    return v > bv || (v == bv && i < bi);
}

/* Arg-max of v[0..n) over the block; every thread gets the answer. */
static __device__ void block_argmax(const float *v, int n, float *ret_v, int *ret_i)
{
    __shared__ float sv[RT_THREADS / 32];
    __shared__ int si[RT_THREADS / 32];
    float bv = -INFINITY;
    int bi = INT_MAX;

    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (better(v[i], i, bv, bi)) {
            bv = v[i];
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);

        if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        sv[threadIdx.x / 32] = bv;
        si[threadIdx.x / 32] = bi;
    }
    __syncthreads();
    bv = sv[0];
    bi = si[0];
    for (int w = 1; w < (int)(blockDim.x / 32); w++) {
        if (better(sv[w], si[w], bv, bi)) {
            bv = sv[w];
            bi = si[w];
        }
    }
    *ret_v = bv;
    *ret_i = bi;
}

template <typename T, typename Op> static __device__ T block_reduce(T v, Op op)
{
    __shared__ T s[RT_THREADS / 32];

#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        s[threadIdx.x / 32] = v;
    __syncthreads();
    v = s[0];
    for (int w = 1; w < (int)(blockDim.x / 32); w++)
        v = op(v, s[w]);
    return v;
}

struct fmax_op {
    __device__ float operator()(float a, float b) const
    {
        return fmaxf(a, b);
    }
};
struct dsum_op {
    __device__ double operator()(double a, double b) const
    {
        return a + b;
    }
};
struct ior_op {
    __device__ int operator()(int a, int b) const
    {
        return a | b;
    }
};

static __global__ void __launch_bounds__(RT_THREADS)
    route_kernel(rparams p, const float *logits, const float *bias, int32_t *ids, float *weights,
                 int *bad)
{
    __shared__ float c[RT_MAX_EXPERTS];
    __shared__ float gscore[RT_MAX_EXPERTS / 2];
    __shared__ int pick[RT_MAX_TOP_K];
    const int t = blockIdx.x, E = p.E, K = p.K;
    const float *l = logits + (size_t)t * E;
    float m = -INFINITY;
    int nonfinite = 0;

    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float v = l[e];

        nonfinite |= !isfinite(v);
        m = fmaxf(m, v);
        /* The CPU's fp32 operations, with an exponential rounded once from
         * double (glibc's expf is within 0.502 ulp; CUDA's up to 2 ulp), so
         * that both pick the same experts on near ties. */
        if (p.sigmoid)
            c[e] = 1.0f / (1.0f + (float)exp(-(double)v)) + (bias ? bias[e] : 0.0f);
        else
            c[e] = v;
    }
    nonfinite = block_reduce(nonfinite, ior_op());
    if (nonfinite) {
        if (threadIdx.x == 0)
            atomicMin(bad, t);
        return;
    }
    m = block_reduce(m, fmax_op());

    /* Softmax without renormalisation divides by the sum over all experts. */
    double denom_all = 0;
    if (!p.sigmoid && !p.norm) {
        double part = 0;

        for (int e = threadIdx.x; e < E; e += blockDim.x)
            part += (double)(float)exp((double)(l[e] - m));
        denom_all = block_reduce(part, dsum_op());
    }

    if (p.sigmoid && p.G > 1 && p.TG < p.G) {
        const int gsize = E / p.G;

        __syncthreads();
        for (int g = threadIdx.x; g < p.G; g += blockDim.x) {
            float b1 = -INFINITY, b2 = -INFINITY;

            for (int i = 0; i < gsize; i++) {
                float v = c[g * gsize + i];

                if (v > b1) {
                    b2 = b1;
                    b1 = v;
                } else if (v > b2) {
                    b2 = v;
                }
            }
            gscore[g] = b1 + b2;
        }
        __syncthreads();
        /* Pick the kept groups: each pick is recorded in pick[], then taken
         * out of the next rounds with -inf. */
        for (int j = 0; j < p.TG; j++) {
            float bv;
            int bi;

            block_argmax(gscore, p.G, &bv, &bi);
            __syncthreads();
            if (threadIdx.x == 0) {
                pick[j] = bi;
                gscore[bi] = -INFINITY;
            }
            __syncthreads();
        }
        /* gscore becomes a keep mask: 1 for kept groups. */
        for (int g = threadIdx.x; g < p.G; g += blockDim.x)
            gscore[g] = 0.0f;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int j = 0; j < p.TG; j++)
                gscore[pick[j]] = 1.0f;
        }
        __syncthreads();
        /* Experts of dropped groups are no candidates at all. */
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            if (gscore[e / gsize] == 0.0f)
                c[e] = -INFINITY;
        }
    }
    __syncthreads();
    for (int j = 0; j < K; j++) {
        float bv;
        int bi;

        block_argmax(c, E, &bv, &bi);
        __syncthreads();
        if (threadIdx.x == 0) {
            pick[j] = bi;
            c[bi] = -INFINITY;
        }
        __syncthreads();
    }
    if (threadIdx.x != 0)
        return;

    int32_t id[RT_MAX_TOP_K];
    float w[RT_MAX_TOP_K];
    double v[RT_MAX_TOP_K], denom = 0;

    for (int j = 0; j < K; j++) {
        id[j] = pick[j];
        if (p.sigmoid)
            v[j] = 1.0 / (1.0 + exp(-(double)l[id[j]]));
        else
            v[j] = exp((double)l[id[j]] - m);
        denom += v[j];
    }
    for (int j = 0; j < K; j++) {
        double x = v[j];

        if (p.sigmoid) {
            if (p.norm && K > 1)
                x /= denom + 1e-20;
        } else {
            x /= p.norm ? denom : denom_all;
        }
        w[j] = (float)(x * p.scale);
    }
    /* Descending weight, equal weights by id. */
    for (int i = 1; i < K; i++) {
        int32_t ii = id[i];
        float vv = w[i];
        int j = i;

        while (j > 0 && (w[j - 1] < vv || (w[j - 1] == vv && id[j - 1] > ii))) {
            id[j] = id[j - 1];
            w[j] = w[j - 1];
            j--;
        }
        id[j] = ii;
        w[j] = vv;
    }
    for (int j = 0; j < K; j++) {
        ids[(size_t)t * K + j] = id[j];
        weights[(size_t)t * K + j] = w[j];
    }
}

static int check(const struct moe_cuda_router_params *p, struct moe_error *err)
{
    int gsize;

    if (!p)
        return moe_error_set(err, -EINVAL, "router parameters are NULL");
    if (p->n_experts < 1 || p->n_experts > RT_MAX_EXPERTS)
        return moe_error_set(err, -EINVAL, "router parameter n_experts is %d, expected 1..%d",
                             p->n_experts, RT_MAX_EXPERTS);
    if (p->top_k < 1 || p->top_k > MOE_MIN(p->n_experts, RT_MAX_TOP_K))
        return moe_error_set(err, -EINVAL, "router parameter top_k is %d, expected 1..%d", p->top_k,
                             MOE_MIN(p->n_experts, RT_MAX_TOP_K));
    if (p->n_group < 1 || p->n_experts % p->n_group != 0)
        return moe_error_set(err, -EINVAL,
                             "router parameter n_group is %d, expected a divisor >= 1 of "
                             "n_experts %d",
                             p->n_group, p->n_experts);
    if (p->n_group > 1 && !p->sigmoid)
        return moe_error_set(err, -EINVAL,
                             "router parameter n_group is %d with softmax scores, expected 1",
                             p->n_group);
    gsize = p->n_experts / p->n_group;
    if (p->n_group > 1 && gsize < 2)
        return moe_error_set(err, -EINVAL,
                             "router parameter n_group is %d, giving groups of 1 expert; "
                             "expected groups of at least 2",
                             p->n_group);
    if (p->topk_group < 1 || p->topk_group > p->n_group)
        return moe_error_set(err, -EINVAL,
                             "router parameter topk_group is %d, expected 1..n_group %d",
                             p->topk_group, p->n_group);
    if (p->top_k > p->topk_group * gsize)
        return moe_error_set(err, -EINVAL,
                             "router parameter top_k is %d, but the kept groups hold only %d "
                             "experts",
                             p->top_k, p->topk_group * gsize);
    if (!isfinite(p->routed_scaling_factor) || !(p->routed_scaling_factor > 0))
        return moe_error_set(err, -EINVAL,
                             "router parameter routed_scaling_factor is %g, expected a finite "
                             "value > 0",
                             (double)p->routed_scaling_factor);
    if (p->bias && !p->sigmoid)
        return moe_error_set(err, -EINVAL,
                             "router parameter bias is set with softmax scores, expected NULL");
    for (int e = 0; p->bias && e < p->n_experts; e++) {
        if (!isfinite(p->bias[e]))
            return moe_error_set(err, -EINVAL,
                                 "router parameter bias[%d] is %g, expected a finite value", e,
                                 (double)p->bias[e]);
    }
    return 0;
}

extern "C" int moe_cuda_route(struct moe_backend *b, const struct moe_cuda_router_params *p,
                              const float *logits, int n_tokens, int32_t *ids, float *weights,
                              struct moe_error *err)
{
    struct cuda_backend *cb;
    rparams rp;
    size_t bias_bytes, meta;
    int r, bad = INT_MAX;
    cudaError_t e;

    if (moe_backend_cuda_device(b) < 0)
        return moe_error_set(err, -EINVAL, "moe_cuda_route needs a CUDA backend");
    r = check(p, err);
    if (r < 0)
        return r;
    if (n_tokens < 0)
        return moe_error_set(err, -EINVAL, "token count is %d, expected >= 0", n_tokens);
    if (n_tokens == 0)
        return 0;
    if (!logits || !ids || !weights)
        return moe_error_set(err, -EINVAL, "router logits or outputs are NULL for %d tokens",
                             n_tokens);
    cb = cuda_of(b);
    rp.sigmoid = p->sigmoid != 0;
    rp.E = p->n_experts;
    rp.K = p->top_k;
    rp.norm = p->norm_topk_prob != 0;
    rp.G = p->n_group;
    rp.TG = p->topk_group;
    rp.scale = p->routed_scaling_factor;
    /* Metadata: the "bad token" flag, then the bias. */
    bias_bytes = p->bias ? (size_t)p->n_experts * sizeof(float) : 0;
    meta = 16 + bias_bytes;

    pthread_mutex_lock(&cb->lock);
    cudaSetDevice(cb->device);
    r = moe_cuda_scratch(&cb->hmeta, &cb->hmeta_bytes, meta, true);
    if (r == 0)
        r = moe_cuda_scratch(&cb->dmeta, &cb->dmeta_bytes, meta, false);
    if (r < 0) {
        r = moe_error_set(err, r, "out of memory for routing on CUDA device %d", cb->device);
        goto out;
    }
    memcpy(cb->hmeta, &bad, sizeof(bad));
    if (p->bias)
        memcpy((uint8_t *)cb->hmeta + 16, p->bias, bias_bytes);
    e = cudaMemcpyAsync(cb->dmeta, cb->hmeta, meta, cudaMemcpyHostToDevice, cb->stream);
    if (e == cudaSuccess) {
        route_kernel<<<n_tokens, RT_THREADS, 0, cb->stream>>>(
            rp, logits, p->bias ? (const float *)((uint8_t *)cb->dmeta + 16) : NULL, ids, weights,
            (int *)cb->dmeta);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(cb->hmeta, cb->dmeta, sizeof(int), cudaMemcpyDeviceToHost, cb->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(cb->stream);
    if (e != cudaSuccess) {
        r = moe_cuda_fail(cb, e, "routing");
        moe_error_set(err, r, "routing %d tokens on CUDA device %d failed: %s", n_tokens,
                      cb->device, cb->last_error);
        goto out;
    }
    memcpy(&bad, cb->hmeta, sizeof(bad));
    if (bad != INT_MAX)
        r = moe_error_set(err, -EINVAL,
                          "token %d: a router logit is not finite, expected finite values", bad);
out:
    if (r < 0)
        cudaStreamSynchronize(cb->stream);
    pthread_mutex_unlock(&cb->lock);
    return r;
}
