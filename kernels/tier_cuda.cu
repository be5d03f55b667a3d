/*
 * The GPU cache tier (moe_tier_cuda_create, see moe_cuda.h) and pinning of
 * host memory for it.
 *
 * Owns one cudaMalloc'd region of the capacity asked for at creation, the
 * first-fit arena over it (engine/tier.h) and a stream for uploads.  The
 * region never moves, so blocks stay valid until freed; resize moves the
 * arena's limit within the region only.  A block holds an expert's slot as
 * the cache lays it out, bytes as stored: a quantized expert's values and
 * scales (at whatever offsets the file gives them; the kernels take any
 * alignment), never a dequantized copy, so its size is its stored size.
 *
 * Lock: `lock` guards the arena (alloc, free, resize run from any cache
 * thread).  upload takes no lock: each call waits on an event recorded
 * after its own copy, so concurrent uploads (several pager threads) overlap
 * on the stream and nobody waits for a copy it does not need.
 *
 * A sticky CUDA error (moe_cuda_error_sticky) in an upload is logged and
 * returned as -ENOTRECOVERABLE (the request that waited for the expert
 * fails with it, and the daemon exits to be restarted); other errors are
 * cleared and fail that upload only (-EIO, -ENOMEM).
 */
#include "cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>

extern "C" {
#include "common.h"
#include "log.h"
}

/* The errno of a failed CUDA call e in a tier's what: sticky errors are
 * logged (once per call: the whole process is done with CUDA) and become
 * -ENOTRECOVERABLE; others are cleared and become fallback. */
static int tier_fail(struct moe_tier *t, cudaError_t e, const char *what, int fallback)
{
    if (moe_cuda_error_sticky(e)) {
        moe_log(MOE_LOG_ERROR, "GPU tier %s: %s: %s (%s); the CUDA context cannot be used again",
                t->name, what, cudaGetErrorName(e), cudaGetErrorString(e));
        return -ENOTRECOVERABLE;
    }
    cudaGetLastError();
    return fallback;
}

struct cuda_tier {
    struct moe_tier t; /* first: the cache's handle */
    int device;
    uint8_t *region; /* [region_bytes] device memory */
    uint64_t region_bytes;
    cudaStream_t stream; /* uploads */
    pthread_mutex_t lock;
    struct moe_arena arena; /* guarded by lock */
};

static struct cuda_tier *tier_of(struct moe_tier *t)
{
    return (struct cuda_tier *)t;
}

static void *ct_alloc(struct moe_tier *t, uint64_t bytes)
{
    struct cuda_tier *ct = tier_of(t);
    uint64_t off;
    int r;

    pthread_mutex_lock(&ct->lock);
    r = moe_arena_alloc(&ct->arena, bytes, &off);
    pthread_mutex_unlock(&ct->lock);
    return r < 0 ? NULL : ct->region + off;
}

static void ct_free(struct moe_tier *t, void *p, uint64_t bytes)
{
    struct cuda_tier *ct = tier_of(t);

    if (!p)
        return;
    pthread_mutex_lock(&ct->lock);
    moe_arena_free(&ct->arena, (uint64_t)((uint8_t *)p - ct->region), bytes);
    pthread_mutex_unlock(&ct->lock);
}

static int ct_upload(struct moe_tier *t, void *dst, const void *src, uint64_t bytes)
{
    struct cuda_tier *ct = tier_of(t);
    cudaEvent_t ev;
    cudaError_t e;

    if (bytes == 0)
        return 0;
    cudaSetDevice(ct->device);
    e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventBlockingSync);
    if (e != cudaSuccess)
        return tier_fail(t, e, "creating an event for an upload", -ENOMEM);
    /* Pinned (registered) source: a DMA straight from the host tier;
     * pageable: CUDA stages it, still correct. */
    e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ct->stream);
    if (e == cudaSuccess)
        e = cudaEventRecord(ev, ct->stream);
    if (e == cudaSuccess)
        e = cudaEventSynchronize(ev);
    cudaEventDestroy(ev);
    if (e != cudaSuccess)
        return tier_fail(t, e, "uploading an expert", -EIO);
    return 0;
}

static int ct_resize(struct moe_tier *t, uint64_t capacity)
{
    struct cuda_tier *ct = tier_of(t);
    uint64_t want = (capacity + MOE_TIER_ALIGN - 1) & ~(uint64_t)(MOE_TIER_ALIGN - 1);
    int r;

    /* The region was sized at creation: growing past it needs a restart
     * with a larger gpu_cache_bytes. */
    if (want > ct->region_bytes)
        return -ENOSPC;
    pthread_mutex_lock(&ct->lock);
    r = moe_arena_resize(&ct->arena, want);
    pthread_mutex_unlock(&ct->lock);
    if (r < 0)
        return r;
    t->capacity = capacity;
    return 0;
}

static void ct_destroy(struct moe_tier *t)
{
    struct cuda_tier *ct = tier_of(t);

    if (!ct)
        return;
    cudaSetDevice(ct->device);
    if (ct->stream) {
        cudaStreamSynchronize(ct->stream);
        cudaStreamDestroy(ct->stream);
    }
    cudaFree(ct->region);
    moe_arena_clear(&ct->arena);
    pthread_mutex_destroy(&ct->lock);
    free(ct);
}

static const struct moe_tier_ops cuda_tier_ops = {
    .kind = "cuda",
    .alloc = ct_alloc,
    .free = ct_free,
    .upload = ct_upload,
    .resize = ct_resize,
    .destroy = ct_destroy,
};

extern "C" int moe_tier_cuda_create(int device, uint64_t capacity, struct moe_tier **ret,
                                    struct moe_error *err)
{
    uint64_t bytes = (capacity + MOE_TIER_ALIGN - 1) & ~(uint64_t)(MOE_TIER_ALIGN - 1);
    size_t free_b = 0, total_b = 0;
    struct cuda_tier *ct;
    cudaError_t e;
    int n = 0, r;

    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return moe_error_set(err, -ENODEV, "GPU tier cuda:%d: no usable CUDA driver or device: %s",
                             device, cudaGetErrorString(e));
    }
    if (device < 0 || device >= n)
        return moe_error_set(err, -ENODEV,
                             "GPU tier cuda:%d: no such device (%d CUDA device(s)); check gpus",
                             device, n);
    ct = (struct cuda_tier *)calloc(1, sizeof(*ct));
    if (!ct)
        return moe_error_set(err, -ENOMEM, "out of memory");
    ct->t.ops = &cuda_tier_ops;
    ct->t.priv = ct;
    ct->device = device;
    pthread_mutex_init(&ct->lock, NULL);
    snprintf(ct->t.name, sizeof(ct->t.name), "cuda:%d", device);
    e = cudaSetDevice(device);
    if (e == cudaSuccess)
        e = cudaMemGetInfo(&free_b, &total_b);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&ct->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        cudaGetLastError();
        r = moe_error_set(err, -ENODEV, "GPU tier cuda:%d: device cannot be used: %s", device,
                          cudaGetErrorString(e));
        goto fail;
    }
    if (capacity == 0) { /* the default: half of what is free now */
        bytes = (uint64_t)(free_b / 2) & ~(uint64_t)(MOE_TIER_ALIGN - 1);
        capacity = bytes;
    }
    if (bytes == 0) {
        r = moe_error_set(err, -ENOMEM, "GPU tier cuda:%d: no device memory free", device);
        goto fail;
    }
    e = cudaMalloc((void **)&ct->region, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        ct->region = NULL;
        r = moe_error_set(err, -ENOMEM,
                          "GPU tier cuda:%d: cannot allocate %llu bytes of device memory "
                          "(%zu of %zu free): %s; lower gpu_cache_bytes",
                          device, (unsigned long long)bytes, free_b, total_b,
                          cudaGetErrorString(e));
        goto fail;
    }
    r = moe_arena_init(&ct->arena, bytes);
    if (r < 0) {
        r = moe_error_set(err, r, "out of memory");
        goto fail;
    }
    ct->region_bytes = bytes;
    ct->t.capacity = capacity;
    ct->t.host_memory = false;
    /* Not host memory: nothing for the pager to register. */
    ct->t.base = NULL;
    ct->t.span = 0;
    *ret = &ct->t;
    return 0;
fail:
    ct_destroy(&ct->t);
    return r;
}

extern "C" int moe_cuda_host_register(void *p, size_t bytes, struct moe_error *err)
{
    cudaError_t e;

    if (!p || bytes == 0)
        return moe_error_set(err, -EINVAL, "nothing to register (%p, %zu bytes)", p, bytes);
    /* Portable: pinned for every device, so one host tier feeds all GPUs. */
    e = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return moe_error_set(err, e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO,
                             "pinning %zu bytes of host memory for GPU uploads failed: %s "
                             "(RLIMIT_MEMLOCK?); uploads will be slower",
                             bytes, cudaGetErrorString(e));
    }
    return 0;
}

extern "C" void moe_cuda_host_unregister(void *p)
{
    if (p && cudaHostUnregister(p) != cudaSuccess)
        cudaGetLastError();
}
