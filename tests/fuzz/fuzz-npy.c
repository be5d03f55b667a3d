/*
 * Fuzz target of the .npy and .npz readers (client/npy.c): the input is
 * parsed as an .npy image and, the same bytes, as an .npz archive from which
 * the arrays "x" and "ids" are read.  Anything accepted must be consistent
 * (count = product of shape, data present); nothing may crash or leak.
 */
#include "npy.h"

#include <stdint.h>
#include <stdlib.h>

static void check(const struct moe_npy *a)
{
    size_t count = 1;

    if (a->ndim < 0 || a->ndim > MOE_MAX_DIMS || !a->data)
        abort();
    for (int i = 0; i < a->ndim; i++) {
        if (a->shape[i] < 0)
            abort();
        count *= (size_t)a->shape[i];
    }
    if (count != a->count)
        abort();
    /* Touch the whole array so that ASan checks its size. */
    if (a->count) {
        volatile unsigned char sink = ((const unsigned char *)a->data)[a->count * 4 - 1];

        (void)sink;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const names[] = {"x", "ids"};
    struct moe_error err;
    struct moe_npy a;

    if (moe_npy_parse(data, size, "fuzz.npy", &a, &err) == 0) {
        check(&a);
        moe_npy_clear(&a);
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (moe_npz_parse_array(data, size, "fuzz.npz", names[i], &a, &err) == 0) {
            check(&a);
            moe_npy_clear(&a);
        }
    }
    return 0;
}
