/*
 * Fuzz target of the sharded-checkpoint index parser (engine/safetensors.c):
 * the input is model.safetensors.index.json.  Anything accepted must be
 * consistent: entries sorted, each naming a valid file, files distinct,
 * sorted, and plain shard names (no path can escape the checkpoint).
 */
#include "safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void check(const struct moe_st_index *idx)
{
    static const char suffix[] = ".safetensors";

    if (idx->n_entries == 0 || idx->n_files == 0 || idx->n_files > idx->n_entries)
        abort();
    for (size_t i = 0; i < idx->n_files; i++) {
        const char *f = idx->files[i];
        size_t n = strlen(f);

        if (i > 0 && strcmp(idx->files[i - 1], f) >= 0)
            abort();
        if (strchr(f, '/') || n <= sizeof(suffix) - 1 ||
            strcmp(f + n - (sizeof(suffix) - 1), suffix) != 0)
            abort();
    }
    for (size_t i = 0; i < idx->n_entries; i++) {
        const struct moe_st_index_entry *e = &idx->entries[i];

        if (i > 0 && strcmp(idx->entries[i - 1].tensor, e->tensor) >= 0)
            abort();
        if (e->file < 0 || (size_t)e->file >= idx->n_files)
            abort();
        if (moe_st_index_find(idx, e->tensor) != e->file)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_st_index *idx = NULL;
    struct moe_error err;

    if (moe_st_index_parse((const char *)data, size, "fuzz.index.json", &idx, &err) == 0) {
        check(idx);
        moe_st_index_free(idx);
    } else if (err.code >= 0 || !err.msg[0]) {
        abort();
    }
    return 0;
}
