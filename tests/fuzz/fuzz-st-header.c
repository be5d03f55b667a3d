/*
 * Fuzz target of the safetensors header parser (engine/safetensors.c): the
 * input is a whole file image, an 8-byte little-endian header length N, N
 * bytes of JSON and the data.  The parser gets the claimed N and the real
 * size, so a bad N must be refused before the JSON is touched (ASan sees any
 * read past the input).  Anything accepted must be consistent: tensors sorted
 * by name, each range inside the file, matching dtype x shape, and the ranges
 * tiling the data exactly.
 */
#include "safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void check(const struct moe_st_header *h, uint64_t size)
{
    uint64_t covered = 0;

    if (h->data_start != 8 + h->header_len || h->data_start > size || h->file_size != size)
        abort();
    for (size_t i = 0; i < h->n_tensors; i++) {
        const struct moe_st_tensor *t = &h->tensors[i];
        uint64_t n = moe_dtype_size(t->dtype);

        if (i > 0 && strcmp(h->tensors[i - 1].name, t->name) >= 0)
            abort();
        if (t->ndim < 0 || t->ndim > MOE_MAX_DIMS)
            abort();
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                abort();
            n *= (uint64_t)t->shape[d];
        }
        if (n != t->nbytes || t->offset < h->data_start || t->offset > size ||
            t->nbytes > size - t->offset)
            abort();
        if (moe_st_header_find(h, t->name) != t)
            abort();
        covered += t->nbytes;
    }
    /* No overlap and no gap: the ranges add up to the data exactly. */
    if (covered != size - h->data_start)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_st_header *h = NULL;
    struct moe_error err;
    uint64_t n = 0;

    if (size < 8)
        return 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | data[i];
    if (moe_st_header_parse((const char *)data + 8, (size_t)n, size, "fuzz.safetensors", &h,
                            &err) == 0) {
        check(h, size);
        moe_st_header_free(h);
    } else if (err.code >= 0 || !err.msg[0]) {
        abort();
    }
    return 0;
}
