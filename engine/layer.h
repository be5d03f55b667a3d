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
 * struct moe_engine ties a model to a backend and keeps each layer's router
 * (and bias, shared expert) once read.  Routed experts are read from the
 * checkpoint on every call for now; the expert cache replaces that.
 * Thread safety: calls on one engine are serialised by its lock.
 */
#ifndef MOED_ENGINE_LAYER_H
#define MOED_ENGINE_LAYER_H

#include "common.h"

struct moe_model;
struct moe_backend;
struct moe_engine;

#define MOE_MAX_TOKENS (1 << 20)

/* What one forward did. */
struct moe_forward_stats {
    uint64_t route_ns;   /* router matmul + selection */
    uint64_t load_ns;    /* reading expert weights */
    uint64_t compute_ns; /* grouped FFN + shared experts */
    int experts_used;    /* distinct routed experts */
    uint64_t bytes_read; /* expert bytes read from the checkpoint */
};

/* The engine does not own m or b; both must outlive it. */
int moe_engine_init(struct moe_model *m, struct moe_backend *b, struct moe_engine **ret);
void moe_engine_free(struct moe_engine *e);

/*
 * x: [n_tokens, hidden] fp32 host memory; out: same shape, overwritten.
 * ids_in/weights_in: caller's routing [n_tokens, top_k], or both NULL to
 * route with the model's router.  ret_ids/ret_weights (may be NULL): the
 * routing used.  Returns 0, or -EINVAL (dense layer, layer out of range,
 * bad routing, non-finite input: err says which), -EIO (checkpoint read),
 * -ENOMEM.
 */
int moe_layer_forward(struct moe_engine *e, int layer, const float *x, int n_tokens,
                      const int32_t *ids_in, const float *weights_in, float *out, int32_t *ret_ids,
                      float *ret_weights, struct moe_forward_stats *st, struct moe_error *err);

/*
 * Routing only: the experts the model's router picks for each of the
 * n_tokens rows of x at layer (ids, weights [n_tokens, top_k]).  Same checks
 * and errors as moe_layer_forward.  Reads no expert.
 */
int moe_layer_route(struct moe_engine *e, int layer, const float *x, int n_tokens, int32_t *ids,
                    float *weights, struct moe_error *err);

#endif
