/*
 * The CUDA backend's public face, callable from C: the backend (struct
 * moe_backend_ops over one device), the GPU cache tier (struct
 * moe_tier_ops over one cudaMalloc'd region), pinning of host memory for
 * fast uploads, and the router on the device.
 *
 * Everything here is built only where nvcc is found (MOED_HAVE_CUDA); the
 * engine never includes this header, the daemon does.  Functions that can
 * fail return 0 or -errno and write a one-line reason to err.
 */
#ifndef MOED_KERNELS_MOE_CUDA_H
#define MOED_KERNELS_MOE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backend.h"
#include "tier.h"

/* Largest tokens per expert computed by the decode kernels (a GEMV per
 * weight row); above it, cuBLAS GEMMs (the tiled kernel for quantized
 * experts). */
#define MOE_CUDA_DECODE_MAX_TOKENS 8

struct moe_cuda_config {
    int device;             /* CUDA device ordinal */
    int decode_max_tokens;  /* 0: MOE_CUDA_DECODE_MAX_TOKENS; -1: never the decode kernel
                             * (always cuBLAS); larger values are capped at 64;
                             * the kernels take 8 tokens per pass over the weights */
    uint64_t scratch_bytes; /* cap on grouped_ffn scratch per call; 0: 512 MiB.  Larger
                             * batches are computed in pieces (same result). */
};

/*
 * Creates the CUDA backend on cfg->device (NULL: device 0, defaults).
 * Memory from alloc is device memory (host_memory false); copy_in and
 * copy_out accept any pointer CUDA knows (cudaMemcpyDefault), so a source
 * that is already device memory (a GPU cache tier) is copied on the device.
 *
 * grouped_ffn: x and out are device memory; the work array, each item's
 * tokens and scales, and struct moe_expert_weights are host memory, the
 * weights device memory.  Each token's sum is taken in work-item order
 * (out[t] += s_1 y_1, then += s_2 y_2 ...), in one combine pass per piece
 * of the batch, without atomics: results are bit-identical from run to run
 * and independent of how the engine splits a batch into calls.
 * Activations are rounded to the weight dtype for the cuBLAS path (bf16 or
 * f16 operands, fp32 accumulation); the decode kernels keep fp32
 * activations.  Quantized experts (FP8, INT8, INT4, MXFP4 with their
 * scales, quant.h; any alignment) are computed from the stored bytes,
 * dequantized in registers or shared memory, with fp32 activations and
 * sums, by the decode kernels up to decode_max_tokens and by a tiled
 * kernel above (no cuBLAS): fp32 multiplies, or for work items of
 * precision MOE_PRECISION_BF16 (on sm_80 and later) bf16 tensor cores,
 * the dequantized weights and the activations rounded to bf16; a layout
 * quant.h does not describe is -EINVAL.
 * Calls are serialised by a lock and synchronous (the result is in out on
 * return).
 *
 * -ENODEV when the device does not exist or cannot be used (err says why);
 * -ENOMEM when cuBLAS cannot be set up.
 */
int moe_backend_cuda_init(const struct moe_cuda_config *cfg, struct moe_backend **ret,
                          struct moe_error *err);

/* The device of a backend made by moe_backend_cuda_init; -1 for any other. */
int moe_backend_cuda_device(const struct moe_backend *b);

/* The last CUDA or cuBLAS failure of b as one line ("" when none), to log
 * beside the -errno a backend slot returned.  Valid until the next call. */
const char *moe_backend_cuda_last_error(struct moe_backend *b);

/*
 * Whether CUDA error code (a cudaError_t) is sticky: it leaves the CUDA
 * context unusable, every later CUDA call in the process fails with it, and
 * only a new process can use the device again (CUDA's documentation:
 * "To continue using CUDA, the process must be terminated and relaunched"):
 * illegal or misaligned addresses, illegal instructions, a hardware stack
 * error, an invalid PC or address space, a launch failure or timeout, a
 * device assert, uncorrectable ECC and NVLink errors, a contained
 * exception, a terminated MPS client and an external device's error.  The
 * backend (lost slot, backend.h) and the GPU tier's upload then return
 * -ENOTRECOVERABLE.  Out of memory, bad arguments and launch configuration
 * errors are not sticky.  Needs no device.
 */
bool moe_cuda_error_sticky(int code);

/*
 * A GPU cache tier of capacity bytes on device (kind "cuda", name "cuda:N",
 * host_memory false): one cudaMalloc'd region managed by a first-fit arena
 * (struct moe_arena), MOE_TIER_ALIGN-aligned blocks.  upload copies from
 * host memory (fast when it was registered with moe_cuda_host_register) on
 * the tier's own stream and waits for that copy only.  resize can shrink
 * the limit for new blocks, and grow only within the region allocated at
 * creation (-ENOSPC beyond it).  -ENOMEM with a clear message when the
 * device has not capacity bytes free; -ENODEV for a bad device.  capacity
 * 0: half the device memory free at creation.
 */
int moe_tier_cuda_create(int device, uint64_t capacity, struct moe_tier **ret,
                         struct moe_error *err);

/*
 * Pins host memory [p, p + bytes) for DMA (cudaHostRegister, portable), so
 * that uploads from it run at full PCIe speed and asynchronously; meant for
 * the host tier's range (tier->base, tier->span).  0, or -errno with err
 * (the caller may carry on unpinned: uploads still work, slower).
 * moe_cuda_host_unregister undoes it (before the memory is unmapped).
 */
int moe_cuda_host_register(void *p, size_t bytes, struct moe_error *err);
void moe_cuda_host_unregister(void *p);

#ifdef __cplusplus
}
#endif

#endif
