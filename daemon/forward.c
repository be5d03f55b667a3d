/*
 * The check of a moe.v1.ForwardRequest (see forward.h).  Everything a
 * remote caller controls is checked before anything is sized from it:
 * the shape against the model and MOE_MAX_TOKENS, the byte count against
 * the shape, the routing's counts against the shape; nothing is trusted.
 */
#include "forward.h"

#include "dtype.h"
#include "layer.h"
#include "model.h"
#include "router.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moed_fwd_input_clear(struct moed_fwd_input *in)
{
    free(in->x);
    free(in->ids);
    free(in->weights);
    memset(in, 0, sizeof(*in));
}

static int check(const Moe__V1__ForwardRequest *q, const struct moe_model *m,
                 struct moed_fwd_input *in, char *msg, size_t len)
{
    const Moe__V1__Tensor *t = q->hidden;
    const char *model = q->model ? q->model : "";
    size_t esz, n;

    in->hidden = m->cfg.hidden;
    in->top_k = m->cfg.top_k;
    if (q->layer >= (uint32_t)m->cfg.n_layers || !m->layers[q->layer].is_moe) {
        snprintf(msg, len, "model '%s' has no MoE layer %u (layers 0 to %d; %d of them are MoE)",
                 model, q->layer, m->cfg.n_layers - 1, m->n_moe_layers);
        return -EINVAL;
    }
    if (!t) {
        snprintf(msg, len, "ForwardRequest.hidden is missing");
        return -EINVAL;
    }
    if (t->n_shape != 2 || t->shape[1] != in->hidden || t->shape[0] < 1 ||
        t->shape[0] > MOE_MAX_TOKENS) {
        snprintf(msg, len,
                 "hidden: shape [%s%lld%s%lld%s]: expected [tokens, %d] with 1 to %d "
                 "tokens",
                 "", t->n_shape > 0 ? (long long)t->shape[0] : -1LL, ", ",
                 t->n_shape > 1 ? (long long)t->shape[1] : -1LL, t->n_shape > 2 ? ", ..." : "",
                 in->hidden, MOE_MAX_TOKENS);
        return -EINVAL;
    }
    if (t->dtype != MOE__V1__DTYPE__DTYPE_F32 && t->dtype != MOE__V1__DTYPE__DTYPE_BF16 &&
        t->dtype != MOE__V1__DTYPE__DTYPE_F16) {
        snprintf(msg, len, "hidden: dtype %d: expected DTYPE_F32, DTYPE_BF16 or DTYPE_F16",
                 (int)t->dtype);
        return -EINVAL;
    }
    in->n_tokens = (int)t->shape[0];
    in->dtype = t->dtype;
    esz = t->dtype == MOE__V1__DTYPE__DTYPE_F32 ? 4 : 2;
    n = (size_t)in->n_tokens * (size_t)in->hidden;
    if (t->data.len != n * esz) {
        snprintf(msg, len, "hidden: %zu data bytes: shape [%d, %d] of %s needs %zu", t->data.len,
                 in->n_tokens, in->hidden,
                 esz == 4                                     ? "f32"
                 : t->dtype == MOE__V1__DTYPE__DTYPE_BF16 ? "bf16"
                                                              : "f16",
                 n * esz);
        return -EINVAL;
    }
    in->x = malloc(n * sizeof(float));
    if (!in->x) {
        snprintf(msg, len, "out of memory for %d tokens", in->n_tokens);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;

        if (esz == 4) {
            memcpy(&in->x[i], t->data.data + 4 * i, 4);
        } else {
            memcpy(&h, t->data.data + 2 * i, 2);
            in->x[i] =
                t->dtype == MOE__V1__DTYPE__DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
        }
    }
    if (q->routing) {
        const Moe__V1__Routing *rt = q->routing;
        size_t tk = (size_t)in->n_tokens * (size_t)in->top_k;
        struct moe_error e;

        if (rt->top_k != (uint32_t)in->top_k || rt->n_expert_ids != tk || rt->n_weights != tk) {
            snprintf(msg, len,
                     "routing: top_k %u with %zu ids and %zu weights: expected top_k %d and %zu "
                     "of each ([tokens, top_k])",
                     rt->top_k, rt->n_expert_ids, rt->n_weights, in->top_k, tk);
            return -EINVAL;
        }
        in->ids = malloc(tk * sizeof(int32_t));
        in->weights = malloc(tk * sizeof(float));
        if (!in->ids || !in->weights) {
            snprintf(msg, len, "out of memory");
            return -ENOMEM;
        }
        memcpy(in->ids, rt->expert_ids, tk * sizeof(int32_t));
        memcpy(in->weights, rt->weights, tk * sizeof(float));
        /* validated here, so the error names this request, not its batch */
        if (moe_routing_validate(m->cfg.n_experts, in->top_k, in->n_tokens, in->ids, in->weights,
                                 &e) < 0) {
            snprintf(msg, len, "routing: %s", e.msg);
            return -EINVAL;
        }
    }
    /* Checked here although the engine checks too: in a batch, one request's
     * NaN would fail every request batched with it. */
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(in->x[i])) {
            snprintf(msg, len, "hidden: token %zu, element %zu is not finite",
                     i / (size_t)in->hidden, i % (size_t)in->hidden);
            return -EINVAL;
        }
    }
    return 0;
}

int moed_forward_request_check(const Moe__V1__ForwardRequest *q, const struct moe_model *m,
                               struct moed_fwd_input *in, char *msg, size_t len)
{
    int r;

    memset(in, 0, sizeof(*in));
    r = check(q, m, in, msg, len);
    if (r < 0)
        moed_fwd_input_clear(in);
    return r;
}
