/*
 * Device discovery and a self-test kernel: proves the toolkit, the driver
 * and the build's architectures agree before the real backend runs.
 */
#include "cuda_probe.h"

#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int moe_cuda_probe(char *msg, size_t msg_len)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);

    if (e != cudaSuccess) {
        snprintf(msg, msg_len, "no usable CUDA device: %s", cudaGetErrorString(e));
        return 0;
    }
    if (n == 0) {
        snprintf(msg, msg_len, "no CUDA device");
        return 0;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
        snprintf(msg, msg_len, "%d CUDA device(s), properties unreadable", n);
        return n;
    }
    snprintf(msg, msg_len, "%d CUDA device(s); device 0: %s, sm_%d%d, %.1f GiB", n, p.name,
             p.major, p.minor, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return n;
}

static __global__ void axpy(float a, const float *x, float *y, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] += a * x[i];
}

extern "C" int moe_cuda_selftest(char *msg, size_t msg_len)
{
    const int n = 1 << 16;
    float *hx = new float[n], *hy = new float[n];
    float *dx = nullptr, *dy = nullptr;
    int bad = -1, r = -1;
    cudaError_t e;

    for (int i = 0; i < n; i++) {
        hx[i] = (float)i;
        hy[i] = 1.0f;
    }
    if ((e = cudaMalloc(&dx, n * sizeof(float))) != cudaSuccess ||
        (e = cudaMalloc(&dy, n * sizeof(float))) != cudaSuccess ||
        (e = cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice)) != cudaSuccess ||
        (e = cudaMemcpy(dy, hy, n * sizeof(float), cudaMemcpyHostToDevice)) != cudaSuccess) {
        snprintf(msg, msg_len, "CUDA setup failed: %s", cudaGetErrorString(e));
        goto out;
    }
    axpy<<<(n + 255) / 256, 256>>>(2.0f, dx, dy, n);
    if ((e = cudaGetLastError()) != cudaSuccess ||
        (e = cudaMemcpy(hy, dy, n * sizeof(float), cudaMemcpyDeviceToHost)) != cudaSuccess) {
        snprintf(msg, msg_len, "CUDA kernel failed: %s", cudaGetErrorString(e));
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (hy[i] != 1.0f + 2.0f * (float)i) {
            bad = i;
            break;
        }
    }
    if (bad >= 0) {
        snprintf(msg, msg_len, "CUDA kernel result wrong at %d: %g, expected %g", bad, hy[bad],
                 1.0 + 2.0 * bad);
        goto out;
    }
    snprintf(msg, msg_len, "CUDA self-test passed on %d elements", n);
    r = 0;
out:
    cudaFree(dx);
    cudaFree(dy);
    delete[] hx;
    delete[] hy;
    return r;
}
