/*
 * A lost CUDA device (issue 21, item 6): which CUDA errors are sticky
 * (moe_cuda_error_sticky, by code: runs without a device), and on a device a
 * real sticky error, an expert whose weights point at an unmapped address
 * (cudaErrorIllegalAddress): the grouped_ffn call returns -ENOTRECOVERABLE,
 * the backend's lost slot names the CUDA error, and every later call fails
 * at once (copies, matmul, grouped_ffn; alloc returns NULL) without
 * hanging; freeing the backend returns.  The context is unusable after it:
 * this test runs in a process of its own.  Skips (77) without a device,
 * after the classification.
 */
#include "backend.h"
#include "moe_cuda.h"
#include "tests.h"

#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdint.h>

static void test_classification(void)
{
    static const struct {
        int code;
        bool sticky;
    } cases[] = {
        {cudaErrorIllegalAddress, true},
        {cudaErrorLaunchFailure, true},
        {cudaErrorHardwareStackError, true},
        {cudaErrorIllegalInstruction, true},
        {cudaErrorMisalignedAddress, true},
        {cudaErrorInvalidAddressSpace, true},
        {cudaErrorInvalidPc, true},
        {cudaErrorECCUncorrectable, true},
        {cudaErrorNvlinkUncorrectable, true},
        {cudaErrorLaunchTimeout, true},
        {cudaErrorAssert, true},
        {cudaErrorContained, true},
        {cudaErrorMpsClientTerminated, true},
        {cudaErrorExternalDevice, true},
        {721, true}, /* cudaErrorTensorMemoryLeak */
        /* errors that fail one call only */
        {cudaSuccess, false},
        {cudaErrorInvalidValue, false},
        {cudaErrorMemoryAllocation, false},
        {cudaErrorInitializationError, false},
        {cudaErrorLaunchOutOfResources, false},
        {cudaErrorInvalidConfiguration, false},
        {cudaErrorNoDevice, false},
        {cudaErrorInvalidDevice, false},
        {cudaErrorNotReady, false},
        {cudaErrorInvalidResourceHandle, false},
        {cudaErrorUnknown, false},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++)
        if (moe_cuda_error_sticky(cases[i].code) != cases[i].sticky)
            FAIL("code %d (%s): sticky %d, expected %d", cases[i].code,
                 cudaGetErrorName((cudaError_t)cases[i].code),
                 (int)moe_cuda_error_sticky(cases[i].code), (int)cases[i].sticky);
    printf("classification of %zu CUDA errors: ok\n", MOE_ARRAY_SIZE(cases));
}

enum { H = 64, F = 64 };

int main(void)
{
    struct moe_cuda_config cfg = {.device = 0};
    struct moe_backend *b;
    struct moe_error err = {0};
    float hx[H], hy[H];
    int32_t tok = 0;
    float scale = 1.0f;
    void *gate, *up, *down;
    float *x, *out;
    int r;

    test_classification();
    r = moe_backend_cuda_init(&cfg, &b, &err);
    if (r == -ENODEV) {
        printf("SKIP: no CUDA device: %s\n", err.msg);
        return TEST_SKIP;
    }
    ASSERT_EQ(r, 0);
    ASSERT_TRUE(moe_backend_lost(b) == NULL);
    gate = b->ops->alloc(b, (size_t)F * H * 4);
    up = b->ops->alloc(b, (size_t)F * H * 4);
    down = b->ops->alloc(b, (size_t)H * F * 4);
    x = b->ops->alloc(b, H * 4);
    out = b->ops->alloc(b, H * 4);
    ASSERT_TRUE(gate && up && down && x && out);
    for (int i = 0; i < H; i++)
        hx[i] = 0.01f * (float)i;
    ASSERT_EQ(b->ops->copy_in(b, x, hx, sizeof(hx)), 0);
    ASSERT_EQ(b->ops->copy_in(b, out, hx, sizeof(hx)), 0);

    /* A valid expert first (zeros): the device works. */
    {
        float *z = calloc((size_t)F * H, 4);

        ASSERT_TRUE(z);
        ASSERT_EQ(b->ops->copy_in(b, gate, z, (size_t)F * H * 4), 0);
        ASSERT_EQ(b->ops->copy_in(b, up, z, (size_t)F * H * 4), 0);
        ASSERT_EQ(b->ops->copy_in(b, down, z, (size_t)H * F * 4), 0);
        free(z);
    }
    struct moe_expert_weights w = {
        .dtype = MOE_DTYPE_F32, .hidden = H, .ffn = F, .gate = gate, .up = up, .down = down};
    struct moe_ffn_work wk = {.w = &w, .n_tokens = 1, .tokens = &tok, .scales = &scale};

    ASSERT_EQ(b->ops->grouped_ffn(b, x, H, 1, &wk, 1, out), 0);
    ASSERT_EQ(b->ops->copy_out(b, hy, out, sizeof(hy)), 0);
    for (int i = 0; i < H; i++)
        ASSERT_EQ(hy[i], hx[i]); /* zero weights add zero */
    ASSERT_TRUE(moe_backend_lost(b) == NULL);

    /* Weights at an address nothing maps: the kernel faults. */
    w.gate = (const void *)(uintptr_t)0x1000;
    r = b->ops->grouped_ffn(b, x, H, 1, &wk, 1, out);
    printf("grouped_ffn on an unmapped address: %d, lost: %s\n", r,
           moe_backend_lost(b) ? moe_backend_lost(b) : "(null)");
    ASSERT_EQ(r, -ENOTRECOVERABLE);
    ASSERT_CONTAINS(moe_backend_lost(b), "CUDA device 0 lost: cudaError");
    ASSERT_CONTAINS(moe_backend_lost(b), "expert FFN kernels");
    /* Sticky: everything fails at once now. */
    w.gate = gate;
    ASSERT_EQ(b->ops->grouped_ffn(b, x, H, 1, &wk, 1, out), -ENOTRECOVERABLE);
    ASSERT_EQ(b->ops->copy_in(b, x, hx, sizeof(hx)), -ENOTRECOVERABLE);
    ASSERT_EQ(b->ops->copy_out(b, hy, out, sizeof(hy)), -ENOTRECOVERABLE);
    ASSERT_EQ(b->ops->matmul(b, gate, MOE_DTYPE_F32, F, H, x, 1, out), -ENOTRECOVERABLE);
    ASSERT_TRUE(b->ops->alloc(b, 256) == NULL);
    b->ops->mem_free(b, gate);
    b->ops->mem_free(b, up);
    b->ops->mem_free(b, down);
    b->ops->mem_free(b, x);
    b->ops->mem_free(b, out);
    moe_backend_free(b); /* returns: nothing waits on a lost device */
    printf("ok\n");
    return 0;
}
