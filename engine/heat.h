/*
 * Expert heat files: each routed expert's uses, which moed saves in its
 * state directory at stop and reads at start to page the hottest experts in
 * before the first request (a warm start, moe_cache_warm).
 *
 * The format is text, one expert per line, only experts with heat > 0:
 *
 *   # any comment line
 *   moed-heat 1 LAYERS EXPERTS
 *   LAYER EXPERT HEAT
 *   ...
 *
 * LAYER < LAYERS, EXPERT < EXPERTS, HEAT a finite number >= 0; an expert
 * named twice is an error.  Written to a temporary file, synced and renamed,
 * so a file is whole or absent.
 */
#ifndef MOED_ENGINE_HEAT_H
#define MOED_ENGINE_HEAT_H

#include "common.h"

#include <stddef.h>

#define MOE_HEAT_MAX_BYTES (64u << 20)

/* Parses buf (len bytes; where names it in errors) into heat[n_layers *
 * n_experts] (zeroed first) for a model of that shape.  0, or -EINVAL with
 * err naming the line and what is wrong (a file of another shape included:
 * err says both shapes). */
int moe_heat_parse(const char *buf, size_t len, const char *where, int n_layers, int n_experts,
                   double *heat, struct moe_error *err);

/* Reads path (a regular file of at most MOE_HEAT_MAX_BYTES) and parses it.
 * 0, -ENOENT when there is none, or -errno with err. */
int moe_heat_read(const char *path, int n_layers, int n_experts, double *heat,
                  struct moe_error *err);

/* Writes heat as path (atomically: path.tmp, fsync, rename).  0 or -errno
 * with err. */
int moe_heat_write(const char *path, int n_layers, int n_experts, const double *heat,
                   struct moe_error *err);

#endif
