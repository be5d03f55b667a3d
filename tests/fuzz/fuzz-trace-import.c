/*
 * Fuzz target of the routing import (engine/trace_import.c): the first byte
 * picks the format (even: csv, odd: jsonl) and the shape (4 layers, of
 * which layer 1 is dense, 8 experts, top-2 or top-3), the rest is the input.
 * Anything accepted must hold what the trace reader promises (every layer <
 * n_layers and not dense, every expert < n_experts and distinct within its
 * record, no lookahead); a refusal must say why; nothing may crash or leak.
 */
#include "trace_import.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const bool is_moe[4] = {true, false, true, true};
    struct moe_trace_info info = {.n_layers = 4, .n_experts = 8, .expert_bytes = 4096};
    enum moe_trace_import_format fmt;
    struct moe_error err;
    struct moe_trace *t;
    int k;

    if (size < 1)
        return 0;
    fmt = data[0] & 1 ? MOE_TRACE_IMPORT_JSONL : MOE_TRACE_IMPORT_CSV;
    info.top_k = data[0] & 2 ? 3 : 2;
    if (moe_trace_import(data + 1, size - 1, fmt, &info, is_moe, "fuzz", &t, &err) < 0) {
        if (!err.msg[0])
            abort(); /* a refusal says why */
        return 0;
    }
    k = t->info.top_k;
    if (k != info.top_k || t->info.lookahead || t->next)
        abort();
    for (uint64_t i = 0; i < t->n_records; i++) {
        if (t->layer[i] >= 4 || !is_moe[t->layer[i]])
            abort();
        for (int j = 0; j < k; j++) {
            if (t->expert[i * k + j] >= 8)
                abort();
            for (int q = 0; q < j; q++)
                if (t->expert[i * k + q] == t->expert[i * k + j])
                    abort();
        }
    }
    moe_trace_free(t);
    return 0;
}
