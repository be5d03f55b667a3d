/*
 * Routing rules: from router logits to the top-k experts and their weights,
 * exactly as each model family does it.
 *
 *   softmax (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 greedy):
 *     p = softmax(logits); pick the top_k largest p; weights = p of those,
 *     divided by their sum iff norm_topk_prob (always for mixtral).
 *   sigmoid (deepseek_v3, kimi_k2, glm4_moe; topk_method "noaux_tc"):
 *     s = sigmoid(logits); c = s + bias (selection only);
 *     group score = sum of the two largest c in each of n_group groups;
 *     keep the topk_group best groups, pick the top_k largest c among their
 *     experts (as DeepSeek's inference code: experts of dropped groups never
 *     win, even against negative c); weights = s of those, divided by
 *     (their sum + 1e-20) iff norm_topk_prob and top_k > 1, times
 *     routed_scaling_factor.
 *   softmax with groups (deepseek_v2, topk_method "group_limited_greedy"):
 *     a group scores its largest p; keep the topk_group best groups, pick the
 *     top_k largest p among their experts; weights = p of those, divided by
 *     their sum iff norm_topk_prob (never in DeepSeek-V2), times
 *     routed_scaling_factor.
 *   topk_sigmoid (llama4_text): pick the top_k largest logits; weights =
 *     sigmoid of those logits (never renormalised).  Llama 4 multiplies each
 *     expert's input by its weight, not its output: the layer does that.
 *
 * Ties are broken towards the lower expert id.  Each token's k entries are
 * written in descending order of weight (ties: lower id first).
 */
#ifndef MOED_ENGINE_ROUTER_H
#define MOED_ENGINE_ROUTER_H

#include "common.h"

#define MOE_MAX_EXPERTS 4096
#define MOE_MAX_TOP_K 64

enum moe_score_func {
    MOE_SCORE_SOFTMAX = 0,
    MOE_SCORE_SIGMOID,
    MOE_SCORE_TOPK_SIGMOID, /* selection on the logits, weights sigmoid(logit) */
};

struct moe_router_params {
    enum moe_score_func score_func;
    int n_experts;               /* 1..MOE_MAX_EXPERTS */
    int top_k;                   /* 1..min(n_experts, MOE_MAX_TOP_K) */
    bool norm_topk_prob;         /* renormalise the k weights */
    int n_group;                 /* groups for group-limited selection; 1 = none */
    int topk_group;              /* groups kept; n_group = none dropped */
    float routed_scaling_factor; /* weights are multiplied by it; 1 = none */
    const float *bias;           /* [n_experts] selection bias (sigmoid only) or NULL */
};

/* Checks the parameters are consistent (n_experts % n_group == 0, top_k fits
 * in the kept groups, group size >= 2 when biased group scores are used...). */
int moe_router_check(const struct moe_router_params *p, struct moe_error *err);

/*
 * Routes n_tokens tokens.  logits: [n_tokens, n_experts] fp32 (router weight
 * times hidden state).  Writes ret_ids and ret_weights, each
 * [n_tokens, top_k].  Returns 0, or -EINVAL for bad parameters or non-finite
 * logits (err says which token).
 */
int moe_route(const struct moe_router_params *p, const float *logits, int n_tokens,
              int32_t *ret_ids, float *ret_weights, struct moe_error *err);

/*
 * Validates routing supplied by a caller: every id in [0, n_experts), no id
 * twice for one token, every weight finite.  err names the token and slot.
 */
int moe_routing_validate(int n_experts, int top_k, int n_tokens, const int32_t *ids,
                         const float *weights, struct moe_error *err);

#endif
