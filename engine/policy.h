/*
 * Replacement policies of the expert cache (internal to engine/cache.c).
 *
 * One policy instance per tier decides which resident expert leaves when
 * room is needed.  The cache embeds a struct moe_pnode per expert per tier
 * and tells the policy what happens to it:
 *   insert  it became resident (or started paging in) in the tier;
 *   remove  it left the tier;
 *   touch   a batch used it (resident or not: counts survive eviction);
 *   victim  the next expert to evict among the resident ones for which
 *           ok() is true (not pinned, not loading), or NULL;
 *   prefer  whether a prefetch of an expert expected with probability p at
 *           the next step is worth evicting victim for.
 *
 * Policies see the routing only through struct moe_policy_env, which the
 * cache fills from what it observes: the layer order (steps until a layer
 * runs again) and the next-layer predictor.
 *
 * adaptive keeps the resident experts in both lru's and routing's order
 * and evicts by whichever of the two is winning: it replays every use into
 * two shadow caches of the same number of experts, one lru and one routing,
 * that hold only the nodes' bookkeeping (the ghost nodes the cache gives
 * each expert), and counts each one's hits, decayed over the last thousand
 * or so uses.  So it follows recency where recency pays (a working set
 * that moves) and routing's frequency and layer order where those pay (a
 * skewed load, scans larger than the cache), at the cost of two more nodes
 * per expert and the shadows' work on each use.
 */
#ifndef MOED_ENGINE_POLICY_H
#define MOED_ENGINE_POLICY_H

#include "cache.h"

struct moe_pnode {
    struct moe_pnode *prev, *next; /* lru list */
    double count;                  /* decayed uses, as of `last` */
    double last;                   /* clock of the last use */
    double key;                    /* heap order (lower leaves first) */
    int32_t heap;                  /* index in its heap, -1 when in none */
    bool resident;                 /* between insert and remove */
    int group;                     /* (model, layer) group, from the cache */
    int model, layer, expert;
    struct moe_pnode *ghost; /* adaptive: [MOE_SHADOWS] this expert's nodes in the
                              * shadow caches (the cache's memory); NULL: none */
};

/* adaptive's shadow caches: lru and routing. */
enum { MOE_SHADOW_LRU, MOE_SHADOW_ROUTING, MOE_SHADOWS };

struct moe_policy_env {
    void *ctx;
    /* Steps (MoE layers run) until group's layer runs next, >= 1. */
    double (*distance)(void *ctx, int group);
    /* MoE layers of the group's model (the length of one token's pass). */
    double (*cycle)(void *ctx, int group);
    /* Uses of group's layer so far (its pass clock). */
    double (*passes)(void *ctx, int group);
    /* The predictor's probability that expert is used at group's layer in
     * the next step, or -1 when group's layer is not the next one. */
    double (*predicted)(void *ctx, int group, int expert);
    int n_groups;
    double half_life; /* in uses of a layer */
};

struct moe_policy;

struct moe_policy_ops {
    const char *name;
    void (*insert)(struct moe_policy *p, struct moe_pnode *n);
    void (*remove)(struct moe_policy *p, struct moe_pnode *n);
    void (*touch)(struct moe_policy *p, struct moe_pnode *n);
    struct moe_pnode *(*victim)(struct moe_policy *p, bool (*ok)(struct moe_pnode *, void *),
                                void *arg);
    bool (*prefer)(struct moe_policy *p, int group, double prob, struct moe_pnode *victim);
};

/* Heap of nodes by key, for the policies. */
struct moe_pheap {
    struct moe_pnode **a;
    int n, cap;
};

struct moe_policy {
    const struct moe_policy_ops *ops;
    const struct moe_policy_env *env;
    struct moe_pnode lru;     /* lru: list head (sentinel) */
    struct moe_pheap heap;    /* freq */
    struct moe_pheap *groups; /* routing: one heap per group */
    int n_groups;
    /* adaptive */
    struct moe_policy *shadow; /* [MOE_SHADOWS], allocated (so this struct may move) */
    double score[MOE_SHADOWS]; /* the shadows' hits, decayed per use */
    int64_t resident;          /* nodes resident: this tier's, or a shadow's */
    int64_t cap;               /* the most this tier held: the shadows' capacity */
};

int moe_policy_init(struct moe_policy *p, enum moe_cache_policy kind,
                    const struct moe_policy_env *env);
void moe_policy_clear(struct moe_policy *p);
/* Makes room for n_groups (the cache added a model).  0 or -ENOMEM. */
int moe_policy_grow(struct moe_policy *p, int n_groups);
/* ghost: [MOE_SHADOWS] nodes for adaptive's shadows (initialised here too),
 * or NULL. */
void moe_pnode_init(struct moe_pnode *n, struct moe_pnode *ghost, int group, int model, int layer,
                    int expert);
/* Takes n's ghost nodes out of p's shadows (n's memory is about to go). */
void moe_policy_forget(struct moe_policy *p, struct moe_pnode *n);
/* Empties n's ghost nodes (their shadows were replaced): counts are kept. */
void moe_pnode_reset_ghosts(struct moe_pnode *n);
/* For tests and reports: the shadow adaptive follows now (MOE_SHADOW_*),
 * or -1 for another policy. */
int moe_policy_following(const struct moe_policy *p);

#endif
