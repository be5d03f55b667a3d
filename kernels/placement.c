/*
 * Expert placement over several devices (see placement.h).  Owns nothing
 * but the map it returns; no global state, no locks: callers compute a new
 * map and swap it in.
 */
#include "placement.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Sort key of one expert; idx indexes the [n_layers * n_experts] tables. */
struct order {
    double load;
    int32_t idx;
};

static int by_load_desc(const void *a, const void *b)
{
    const struct order *x = a, *y = b;

    if (x->load != y->load)
        return x->load > y->load ? -1 : 1;
    /* Index order is (layer, expert) order. */
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

void moe_placement_free(struct moe_placement *p)
{
    if (!p)
        return;
    free(p->n_copies);
    free(p->dev);
    free(p->dev_load);
    free(p->dev_bytes);
    free(p->layer_load);
    free(p);
}

static int check_input(const struct moe_placement_input *in, struct moe_error *err)
{
    size_t n;

    if (!in)
        return moe_error_set(err, -EINVAL, "placement input is NULL");
    if (in->n_layers < 1 || in->n_experts < 1)
        return moe_error_set(err, -EINVAL, "placement of %d layers of %d experts: expected >= 1",
                             in->n_layers, in->n_experts);
    if (!moe_mul_size((size_t)in->n_layers, (size_t)in->n_experts, &n) || n > INT32_MAX / 16)
        return moe_error_set(err, -EINVAL, "placement of %d layers of %d experts: too many",
                             in->n_layers, in->n_experts);
    if (in->n_devices < 1 || in->n_devices > MOE_PLACE_MAX_DEVICES)
        return moe_error_set(err, -EINVAL, "placement over %d devices: expected 1 to %d",
                             in->n_devices, MOE_PLACE_MAX_DEVICES);
    if (in->n_replicated < 0 || (size_t)in->n_replicated > n)
        return moe_error_set(err, -EINVAL, "placement: %d experts to replicate, expected 0 to %zu",
                             in->n_replicated, n);
    if (in->n_replicated > 0 && (in->max_replicas < 1 || in->max_replicas > MOE_PLACE_MAX_REPLICAS))
        return moe_error_set(err, -EINVAL, "placement: max_replicas %d, expected 1 to %d",
                             in->max_replicas, MOE_PLACE_MAX_REPLICAS);
    for (size_t i = 0; in->load && i < n; i++) {
        if (!isfinite(in->load[i]) || in->load[i] < 0)
            return moe_error_set(err, -EINVAL,
                                 "placement: load of layer %zu expert %zu is %g, expected a "
                                 "finite value >= 0",
                                 i / (size_t)in->n_experts, i % (size_t)in->n_experts, in->load[i]);
    }
    return 0;
}

int moe_placement_compute(const struct moe_placement_input *in, struct moe_placement **ret,
                          struct moe_error *err)
{
    struct moe_placement *p;
    struct order *order = NULL;
    size_t n;
    int D, r;

    r = check_input(in, err);
    if (r < 0)
        return r;
    n = (size_t)in->n_layers * (size_t)in->n_experts;
    D = in->n_devices;
    p = calloc(1, sizeof(*p));
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    p->n_layers = in->n_layers;
    p->n_experts = in->n_experts;
    p->n_devices = D;
    p->n_copies = calloc(n, sizeof(*p->n_copies));
    p->dev = calloc(n * MOE_PLACE_MAX_REPLICAS, sizeof(*p->dev));
    p->dev_load = calloc((size_t)D, sizeof(*p->dev_load));
    p->dev_bytes = calloc((size_t)D, sizeof(*p->dev_bytes));
    p->layer_load = calloc((size_t)in->n_layers * (size_t)D, sizeof(*p->layer_load));
    order = malloc(n * sizeof(*order));
    if (!p->n_copies || !p->dev || !p->dev_load || !p->dev_bytes || !p->layer_load || !order) {
        r = moe_error_set(err, -ENOMEM, "out of memory for a placement of %zu experts", n);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        order[i].load = in->load ? in->load[i] : 0.0;
        order[i].idx = (int32_t)i;
    }
    qsort(order, n, sizeof(*order), by_load_desc);

    for (size_t k = 0; k < n; k++) {
        const int32_t x = order[k].idx;
        const int layer = x / in->n_experts;
        const uint64_t bytes = in->bytes ? in->bytes[x] : in->bytes_each;
        const double load = in->load ? in->load[x] : 1.0;
        double *ll = p->layer_load + (size_t)layer * (size_t)D;
        int copies = 1;

        if ((size_t)k < (size_t)in->n_replicated)
            copies = in->max_replicas < D ? in->max_replicas : D;
        for (int c = 0; c < copies; c++) {
            int best = -1;

            for (int d = 0; d < D; d++) {
                bool taken = false;

                for (int j = 0; j < c; j++)
                    taken |= p->dev[(size_t)x * MOE_PLACE_MAX_REPLICAS + j] == d;
                if (taken)
                    continue;
                if (in->capacity && in->capacity[d] && p->dev_bytes[d] + bytes > in->capacity[d])
                    continue;
                if (best < 0 || ll[d] < ll[best] ||
                    (ll[d] == ll[best] && p->dev_load[d] < p->dev_load[best]))
                    best = d;
            }
            if (best < 0) {
                if (c > 0)
                    break; /* fewer copies than asked: no room for another */
                uint64_t have = 0;

                for (int d = 0; d < D; d++)
                    have += in->capacity[d] - p->dev_bytes[d];
                r = moe_error_set(err, -ENOSPC,
                                  "placement: layer %d expert %d (%llu bytes) fits on no device; "
                                  "%llu bytes free in all, but no device has room for it: "
                                  "raise gpu_cache_bytes or add devices",
                                  layer, x % in->n_experts, (unsigned long long)bytes,
                                  (unsigned long long)have);
                goto fail;
            }
            p->dev[(size_t)x * MOE_PLACE_MAX_REPLICAS + c] = (int16_t)best;
            p->n_copies[x] = (uint8_t)(c + 1);
            p->dev_bytes[best] += bytes;
        }
        /* Load shared evenly among the copies. */
        for (int c = 0; c < p->n_copies[x]; c++) {
            int d = p->dev[(size_t)x * MOE_PLACE_MAX_REPLICAS + c];

            ll[d] += load / p->n_copies[x];
            p->dev_load[d] += load / p->n_copies[x];
        }
        /* Copies ascending, so that pick() does not depend on the order
         * they were placed in. */
        for (int i = 1; i < p->n_copies[x]; i++) {
            int16_t *dv = p->dev + (size_t)x * MOE_PLACE_MAX_REPLICAS, v = dv[i];
            int j = i;

            while (j > 0 && dv[j - 1] > v) {
                dv[j] = dv[j - 1];
                j--;
            }
            dv[j] = v;
        }
    }
    free(order);
    *ret = p;
    return 0;
fail:
    free(order);
    moe_placement_free(p);
    return r;
}

int moe_placement_pick(const struct moe_placement *p, int layer, int expert, uint32_t salt)
{
    size_t x;

    if (!p || layer < 0 || layer >= p->n_layers || expert < 0 || expert >= p->n_experts)
        return -1;
    x = (size_t)layer * (size_t)p->n_experts + (size_t)expert;
    return p->dev[x * MOE_PLACE_MAX_REPLICAS + salt % p->n_copies[x]];
}

double moe_placement_imbalance(const struct moe_placement *p)
{
    double worst = 1.0;

    for (int l = 0; l < p->n_layers; l++) {
        const double *ll = p->layer_load + (size_t)l * (size_t)p->n_devices;
        double sum = 0, mx = 0;

        for (int d = 0; d < p->n_devices; d++) {
            sum += ll[d];
            mx = ll[d] > mx ? ll[d] : mx;
        }
        if (sum > 0 && mx / (sum / p->n_devices) > worst)
            worst = mx / (sum / p->n_devices);
    }
    return worst;
}
