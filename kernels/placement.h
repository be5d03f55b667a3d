/*
 * Expert placement over several GPUs: which device(s) hold each (layer,
 * expert), balanced by measured load (tokens routed, or time) and bounded
 * by each device's bytes.  Plain C, no CUDA: the daemon computes a map from
 * the cache's per-expert statistics and the tests check it without a GPU.
 *
 * Greedy: experts in descending load (ties: lower layer, then lower expert)
 * go to the device with the least load in the expert's own layer (a layer's
 * tokens are computed together, so that is the balance that matters), then
 * the least total load, then the lowest id, among those with room.  The
 * n_replicated hottest experts are placed on up to max_replicas devices each,
 * their load shared evenly among the copies; tokens then alternate between
 * copies (moe_placement_pick).  The map is deterministic for given inputs.
 */
#ifndef MOED_KERNELS_PLACEMENT_H
#define MOED_KERNELS_PLACEMENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "common.h"

#define MOE_PLACE_MAX_DEVICES 64
#define MOE_PLACE_MAX_REPLICAS 8

struct moe_placement_input {
    int n_layers;
    int n_experts;
    const double *load;       /* [n_layers * n_experts] >= 0, or NULL: all equal */
    const uint64_t *bytes;    /* [n_layers * n_experts] or NULL: bytes_each for all */
    uint64_t bytes_each;      /* size of one expert when bytes is NULL */
    int n_devices;            /* 1..MOE_PLACE_MAX_DEVICES */
    const uint64_t *capacity; /* [n_devices] bytes each device may hold; NULL or 0: no limit */
    int n_replicated;         /* hottest experts to replicate (0: none) */
    int max_replicas;         /* copies of each of those, 1..MOE_PLACE_MAX_REPLICAS (capped at
                               * n_devices) */
};

struct moe_placement {
    int n_layers, n_experts, n_devices;
    uint8_t *n_copies;   /* [n_layers * n_experts]: devices holding the expert (>= 1) */
    int16_t *dev;        /* [n_layers * n_experts * MOE_PLACE_MAX_REPLICAS]: those devices,
                          * ascending */
    double *dev_load;    /* [n_devices] load assigned to each device */
    uint64_t *dev_bytes; /* [n_devices] bytes each device holds */
    double *layer_load;  /* [n_layers * n_devices] load per layer and device */
};

/*
 * Computes a placement.  -EINVAL for bad input (err says which), -ENOSPC
 * when the experts do not fit in the devices' capacities (err says how many
 * bytes are missing), -ENOMEM.  Free with moe_placement_free.
 */
int moe_placement_compute(const struct moe_placement_input *in, struct moe_placement **ret,
                          struct moe_error *err);
void moe_placement_free(struct moe_placement *p);

/* The device to compute (layer, expert) for a token: its only copy, or one
 * of its copies chosen by salt (e.g. the token index) so that tokens
 * spread over the copies.  -1 for an out-of-range expert. */
int moe_placement_pick(const struct moe_placement *p, int layer, int expert, uint32_t salt);

/* Worst layer's max/mean load over the devices (1.0: perfectly balanced;
 * layers without load are ignored). */
double moe_placement_imbalance(const struct moe_placement *p);

#ifdef __cplusplus
}
#endif

#endif
