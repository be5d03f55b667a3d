/*
 * The CUDA build works on this machine: finds the devices and runs a small
 * kernel, checking its result.  Skips (77) with the reason where there is no
 * GPU or no driver.
 */
#include "cuda_probe.h"

#include <stdio.h>

int main(void)
{
    char msg[256];
    int n = moe_cuda_probe(msg, sizeof(msg));

    printf("%s\n", msg);
    if (n <= 0) {
        printf("SKIP: no CUDA device on this machine; the GPU tests need one\n");
        return 77;
    }
    if (moe_cuda_selftest(msg, sizeof(msg)) != 0) {
        fprintf(stderr, "FAIL: %s\n", msg);
        return 1;
    }
    printf("%s\n", msg);
    return 0;
}
