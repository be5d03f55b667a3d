/*
 * Fuzz target of the packed store's index parser (engine/pack.c): the input
 * is moe-pack.json.  Anything accepted must keep the invariants model.c and
 * the pager rely on: every range within data_bytes, tensors sorted by name
 * and disjoint, blobs aligned, disjoint and sorted by (layer, expert), each
 * tensor inside one blob or aligned outside all, a plain data file name.
 * Anything refused must say why.
 */
#include "pack.h"
#include "safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void check(const struct moe_pack_index *ix)
{
    const struct moe_st_header *h = ix->tensors;

    if (!ix->data_name || !*ix->data_name || strchr(ix->data_name, '/'))
        abort();
    if (ix->data_bytes % MOE_PACK_ALIGN || ix->data_bytes > MOE_PACK_MAX_DATA)
        abort();
    if (!h || h->n_tensors == 0 || !ix->tensor_xxh3 || ix->n_experts == 0 || !ix->experts)
        abort();
    if (h->file_size != ix->data_bytes)
        abort();
    for (size_t i = 0; i < ix->n_experts; i++) {
        const struct moe_pack_entry *e = &ix->experts[i];

        if (e->layer < 0 || e->expert < 0 || e->offset % MOE_PACK_ALIGN || e->nbytes == 0 ||
            e->offset + e->nbytes > ix->data_bytes)
            abort();
        if (i > 0 &&
            (ix->experts[i - 1].layer > e->layer ||
             (ix->experts[i - 1].layer == e->layer && ix->experts[i - 1].expert >= e->expert)))
            abort();
        if (moe_pack_index_find(ix, e->layer, e->expert) != e)
            abort();
        for (size_t j = 0; j < i; j++) {
            const struct moe_pack_entry *f = &ix->experts[j];

            if (e->offset < f->offset + f->nbytes && f->offset < e->offset + e->nbytes)
                abort();
        }
    }
    for (size_t i = 0; i < h->n_tensors; i++) {
        const struct moe_st_tensor *t = &h->tensors[i];
        uint64_t end = t->offset + t->nbytes;
        bool inside = false;

        if (i > 0 && strcmp(h->tensors[i - 1].name, t->name) >= 0)
            abort();
        if (moe_st_header_find(h, t->name) != t || end > ix->data_bytes || end < t->offset)
            abort();
        for (size_t j = 0; j < ix->n_experts; j++) {
            const struct moe_pack_entry *e = &ix->experts[j];

            if (t->offset < e->offset + e->nbytes && e->offset < end) {
                if (t->offset < e->offset || end > e->offset + e->nbytes)
                    abort();
                inside = true;
            }
        }
        if (!inside && t->nbytes > 0 && t->offset % MOE_PACK_ALIGN)
            abort();
        for (size_t j = 0; j < i; j++) {
            const struct moe_st_tensor *u = &h->tensors[j];

            if (t->nbytes && u->nbytes && t->offset < u->offset + u->nbytes && u->offset < end)
                abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_pack_index ix = {0};
    struct moe_error err;

    if (moe_pack_index_parse((const char *)data, size, "fuzz.moe-pack.json", &ix, &err) == 0) {
        check(&ix);
        moe_pack_index_clear(&ix);
    } else if (err.code >= 0 || !err.msg[0] || ix.tensors || ix.experts || ix.data_name) {
        abort();
    }
    return 0;
}
