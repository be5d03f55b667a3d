/*
 * Where a cluster's experts live (placement.h): the map's pure functions.
 */
#include "placement.h"

#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int moed_placement_holders(int n_members, int layer, int expert, bool hot, int replicas, int *ret)
{
    int owner = (expert + layer) % n_members, k = 1;

    ret[0] = owner;
    if (hot)
        for (int r = 1; r <= replicas && r < n_members; r++)
            ret[k++] = (owner + r) % n_members;
    return k;
}

int moed_placement_pick(const int *h, int n, uint32_t salt, int skip, moed_placement_up_fn up,
                        const void *arg, int self)
{
    for (int i = 0; i < n; i++) {
        int m = h[(salt + (uint32_t)i) % (uint32_t)n];

        if (m != skip && up(arg, m))
            return m;
    }
    return self;
}

size_t moed_placement_hot(const uint32_t *load, size_t n, double fraction, uint8_t *hot)
{
    size_t want, nz = 0, k = 0;
    uint64_t sum = 0;
    uint32_t thr = UINT32_MAX;
    uint32_t *sorted;

    for (size_t i = 0; i < n; i++) {
        nz += load[i] > 0;
        sum += load[i];
    }
    want = (size_t)ceil(fraction * (double)n);
    if (want > nz)
        want = nz;
    /* The want-th largest load is the threshold (a partial sort). */
    sorted = want ? malloc(n * sizeof(*sorted)) : NULL;
    if (sorted) {
        memcpy(sorted, load, n * sizeof(*sorted));
        for (size_t j = 0; j < want; j++) {
            size_t best = j;

            for (size_t i = j + 1; i < n; i++)
                if (sorted[i] > sorted[best])
                    best = i;
            uint32_t tmp = sorted[j];

            sorted[j] = sorted[best];
            sorted[best] = tmp;
        }
        thr = sorted[want - 1];
        free(sorted);
    }
    /* Only experts well above the mean load are worth a copy. */
    if (n && thr < (uint32_t)MOE_MIN(2 * sum / n + 1, UINT32_MAX))
        thr = (uint32_t)MOE_MIN(2 * sum / n + 1, UINT32_MAX);
    for (size_t i = 0; i < n; i++) {
        hot[i] = load[i] > 0 && load[i] >= thr && k < want;
        k += hot[i];
    }
    return k;
}
