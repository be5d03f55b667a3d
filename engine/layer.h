/*
 * One MoE layer's forward pass, in process: route the tokens (or take the
 * caller's routing), read the experts they need, run the grouped FFN on the
 * backend, add the shared experts.
 *
 *   out[t] = sum_j w[t,j] * E_{id[t,j]}(x[t])  +  g[t] * S(x[t])
 * where E are the routed experts, S the shared expert(s) (absent for
 * mixtral, qwen3_moe, olmoe), g[t] = sigmoid(shared_expert_gate . x[t]) for
 * qwen2_moe and 1 for deepseek_v3.
 *
 * struct moe_engine ties a model to a backend and an expert cache (cache.h),
 * and keeps each layer's router (and bias, shared expert) once read.  Routed
 * experts come from the cache: resident ones at once, missing ones paged in
 * while the resident ones compute.  The output does not depend on what was
 * resident (experts are summed in a fixed order).
 * Thread safety: forwards may run concurrently on one engine, on any layers.
 */
#ifndef MOED_ENGINE_LAYER_H
#define MOED_ENGINE_LAYER_H

#include "common.h"

struct moe_model;
struct moe_backend;
struct moe_engine;
struct moe_cache;
struct moe_cache_config;
struct moe_trace_writer;

#define MOE_MAX_TOKENS (1 << 20)

/* What one forward did. */
struct moe_forward_stats {
    uint64_t route_ns;   /* router matmul + selection */
    uint64_t load_ns;    /* waiting for experts being paged in */
    uint64_t compute_ns; /* grouped FFN + shared experts */
    int experts_used;    /* distinct routed experts */
    int hits;            /* of those, resident when asked for */
    int misses;          /* paged in (or joined a page-in) */
    uint64_t bytes_read; /* expert bytes of the misses */
};

/*
 * The engine does not own m or b; both must outlive it.
 * moe_engine_init: a private cache large enough for every expert (LRU, no
 * prefetch).  moe_engine_init_cache: a private cache from cfg (host_bytes 0:
 * every expert).  moe_engine_attach: a cache shared with other engines, in
 * which m is registered as model (moe_cache_add_model); not owned.
 */
int moe_engine_init(struct moe_model *m, struct moe_backend *b, struct moe_engine **ret);
int moe_engine_init_cache(struct moe_model *m, struct moe_backend *b,
                          const struct moe_cache_config *cfg, struct moe_engine **ret,
                          struct moe_error *err);
int moe_engine_attach(struct moe_model *m, struct moe_backend *b, struct moe_cache *cache,
                      int model, struct moe_engine **ret);
void moe_engine_free(struct moe_engine *e);

struct moe_cache *moe_engine_cache(struct moe_engine *e);
const struct moe_model *moe_engine_model(const struct moe_engine *e);
int moe_engine_model_id(struct moe_engine *e);
/* Bytes a cache needs to hold every routed expert of m. */
uint64_t moe_engine_all_experts_bytes(const struct moe_model *m);
/* Records the routing of every later forward to w (NULL stops), its token
 * numbers from 0.  Safe while forwards run: once it returns no forward
 * writes to the previous writer, which the caller may then close. */
void moe_engine_set_trace(struct moe_engine *e, struct moe_trace_writer *w);

/*
 * x: [n_tokens, hidden] fp32 host memory; out: same shape, overwritten.
 * ids_in/weights_in: caller's routing [n_tokens, top_k], or both NULL to
 * route with the model's router.  ret_ids/ret_weights (may be NULL): the
 * routing used.  Returns 0, or -EINVAL (dense layer, layer out of range,
 * bad routing, non-finite input, or a finite input whose output row
 * overflowed to inf or NaN: err says which, naming the row; out is then
 * undefined), -EIO or -EBADMSG (an
 * expert's page-in failed: read error, file truncated, checksum), -ENOSPC
 * (the cache has no room: everything in it is pinned), -ENOMEM.
 */
int moe_layer_forward(struct moe_engine *e, int layer, const float *x, int n_tokens,
                      const int32_t *ids_in, const float *weights_in, float *out, int32_t *ret_ids,
                      float *ret_weights, struct moe_forward_stats *st, struct moe_error *err);

/* Flags of moe_layer_forward_ex. */
#define MOE_FWD_PARTIAL                                                                            \
    1u                         /* caller routing may hold -1: that slot is left out (its           \
                                * expert is computed elsewhere, e.g. another node) */
#define MOE_FWD_SKIP_SHARED 2u /* leave the shared experts out (computed elsewhere) */

/* One forward of a layer, or of a part of one: the arguments of
 * moe_layer_forward_ex, and of a scheduler request (scheduler.h), as
 * moe_layer_forward takes them. */
struct moe_layer_args {
    int layer;
    const float *x; /* [n_tokens, hidden] fp32 host memory */
    int n_tokens;
    const int32_t *ids;   /* caller's routing [n_tokens, top_k], or NULL */
    const float *weights; /* its weights; NULL exactly when ids is */
    unsigned flags;       /* MOE_FWD_* */
    float *out;           /* [n_tokens, hidden], overwritten */
    int32_t *ret_ids;     /* the routing used [n_tokens, top_k], may be NULL */
    float *ret_weights;   /* its weights, may be NULL */
};

/*
 * moe_layer_forward with flags: a part of a layer, for expert parallelism.
 * The sum of the outputs of forwards that split a token's slots (and its
 * shared experts) between them is the whole layer's output, up to the
 * order of the additions.  MOE_FWD_PARTIAL needs caller routing.
 */
int moe_layer_forward_ex(struct moe_engine *e, const struct moe_layer_args *a,
                         struct moe_forward_stats *st, struct moe_error *err);

/*
 * Routing only: the experts the model's router picks for each of the
 * n_tokens rows of x at layer (ids, weights [n_tokens, top_k]).  Same checks
 * and errors as moe_layer_forward.  Reads no expert.
 */
int moe_layer_route(struct moe_engine *e, int layer, const float *x, int n_tokens, int32_t *ids,
                    float *weights, struct moe_error *err);

#endif
