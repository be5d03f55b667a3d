/*
 * Where a cluster's experts live (docs/cluster.md): pure functions of the
 * members, the layer and expert, and the measured load, so that every node
 * computes the same map from the same inputs.  No state, no locks; the
 * cluster (cluster.c) keeps the members, the loads and the hot sets.
 *
 * Members are numbered 0..n-1 in the order of their sorted names.  The
 * experts of a layer go round-robin over the members from an offset of the
 * layer (expert + layer mod n owns it); a hot expert has `replicas` more
 * holders, the members after its owner.
 */
#ifndef MOED_DAEMON_PLACEMENT_H
#define MOED_DAEMON_PLACEMENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Holders of (layer, expert) among n_members (>= 1), owner first, into ret
 * (room for 1 + replicas); hot adds up to replicas more, never one twice.
 * Returns how many. */
int moed_placement_holders(int n_members, int layer, int expert, bool hot, int replicas, int *ret);

/* Whether member m can take calls now (this node always can). */
typedef bool (*moed_placement_up_fn)(const void *arg, int m);

/* The member to send a slot to: one of the n holders h (spread over them
 * by salt) that is up and is not skip (-1: none skipped), else self,
 * which pages the expert in itself. */
int moed_placement_pick(const int *h, int n, uint32_t salt, int skip, moed_placement_up_fn up,
                        const void *arg, int self);

/*
 * The hot set of n experts from their loads (token rows routed through
 * each): at most ceil(fraction * n) of the most loaded, each with a load of
 * at least twice the mean plus one (under an even load a replica costs
 * cache room and brings nothing), ties taken in index order.  Writes hot[n]
 * (0 or 1); returns how many are hot.
 */
size_t moed_placement_hot(const uint32_t *load, size_t n, double fraction, uint8_t *hot);

#endif
