/*
 * Fuzz target of the routing trace parser (engine/trace.c): the input is
 * parsed as a trace file image.  Anything accepted must be consistent with
 * what trace.h promises (every layer < n_layers, every expert < n_experts and
 * distinct within its record), and its steps must cover the records in
 * order; nothing may crash or leak.  A small accepted trace also goes through
 * Belady's MIN at the smallest capacity it allows.
 */
#include "trace.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_trace_step *steps;
    struct moe_belady_result br;
    struct moe_trace_summary sum;
    struct moe_error err;
    struct moe_trace *t;
    uint64_t n_steps, next = 0;
    int k;

    if (moe_trace_parse(data, size, "fuzz.trace", &t, &err) < 0)
        return 0;
    k = t->info.top_k;
    if (t->info.n_layers < 1 || t->info.n_layers > MOE_TRACE_MAX_LAYERS || t->info.n_experts < 1 ||
        t->info.n_experts > MOE_TRACE_MAX_EXPERTS || k < 1 || k > MOE_TRACE_MAX_TOPK ||
        k > t->info.n_experts || t->info.model[sizeof(t->info.model) - 1] != 0)
        abort();
    for (uint64_t i = 0; i < t->n_records; i++) {
        if (t->layer[i] >= t->info.n_layers)
            abort();
        for (int j = 0; j < k; j++) {
            if (t->expert[i * k + j] >= t->info.n_experts)
                abort();
            for (int q = 0; q < j; q++)
                if (t->expert[i * k + q] == t->expert[i * k + j])
                    abort();
        }
    }
    if (moe_trace_steps(t, &steps, &n_steps) == 0) {
        for (uint64_t s = 0; s < n_steps; s++) {
            if (steps[s].first != next || steps[s].n == 0)
                abort();
            for (uint64_t i = next; i < next + steps[s].n; i++)
                if (t->layer[i] != steps[s].layer)
                    abort();
            next += steps[s].n;
        }
        if (next != t->n_records)
            abort();
        free(steps);
    }
    /* Belady allocates per (layer, expert) seen, not per possible one, so a
     * header claiming a huge shape costs nothing; keep the inputs small. */
    if (t->n_records <= 4096 && moe_trace_summarize(t, &sum) == 0 &&
        moe_trace_belady(t, sum.max_step, &br, &err) == 0) {
        if (br.accesses != sum.accesses || br.hits > br.accesses)
            abort();
    }
    moe_trace_free(t);
    return 0;
}
