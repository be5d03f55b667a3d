/*
 * Decoding and checking a forward request (a client's ForwardRequest or
 * shared-memory request, a peer's ForwardExpertsRequest) into struct
 * moed_fwd, and encoding its answer (forward.h).  Everything a caller controls is checked
 * before anything is sized from it: the shape against the model and
 * MOE_MAX_TOKENS, the byte count against the shape, the routing's counts
 * against the shape; nothing is trusted.  No daemon state: the fuzz target
 * runs this file alone.
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

void moed_fwd_init(struct moed_fwd *f, struct moed *d, enum moed_transport t)
{
    memset(f, 0, sizeof(*f));
    f->d = d;
    f->transport = t;
    f->t_recv = moe_now_ns();
    f->layer = -1;
}

static size_t dtype_size(Moe__V1__DType t)
{
    return t == MOE__V1__DTYPE__DTYPE_F32 ? 4 : 2;
}

static const char *dtype_name(Moe__V1__DType t)
{
    return t == MOE__V1__DTYPE__DTYPE_F32    ? "f32"
           : t == MOE__V1__DTYPE__DTYPE_BF16 ? "bf16"
                                             : "f16";
}

int moed_fwd_set_hidden(struct moed_fwd *f, int n_tokens, Moe__V1__DType dtype, const void *data,
                        bool borrow, const char *what, char *msg, size_t len)
{
    const size_t n = (size_t)n_tokens * (size_t)f->hidden;
    const uint8_t *in = data;
    const float *x;

    f->n_tokens = n_tokens;
    f->dtype = dtype;
    if (borrow && dtype == MOE__V1__DTYPE__DTYPE_F32 && (uintptr_t)data % _Alignof(float) == 0) {
        /* Private to the request already (a decoded message): no copy. */
        x = data;
    } else {
        float *own = malloc(n * sizeof(float));

        if (!own) {
            snprintf(msg, len, "out of memory for %d tokens", n_tokens);
            return -ENOMEM;
        }
        if (dtype == MOE__V1__DTYPE__DTYPE_F32) {
            memcpy(own, in, n * sizeof(float));
        } else {
            for (size_t i = 0; i < n; i++) {
                uint16_t h;

                memcpy(&h, in + 2 * i, 2);
                own[i] =
                    dtype == MOE__V1__DTYPE__DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
            }
        }
        f->x_own_ = own;
        x = own;
    }
    f->x = x;
    /* Checked here although the engine checks too: in a batch, one request's
     * NaN would fail every request batched with it. */
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) {
            snprintf(msg, len, "%s: token %zu, element %zu is not finite", what,
                     i / (size_t)f->hidden, i % (size_t)f->hidden);
            return -EINVAL;
        }
    }
    return 0;
}

int moed_fwd_set_routing(struct moed_fwd *f, const struct moe_model *m, const int32_t *ids,
                         const float *weights, bool borrow, char *msg, size_t len)
{
    size_t tk = (size_t)f->n_tokens * (size_t)f->top_k;
    struct moe_error e;

    if (borrow) {
        f->ids = ids;
        f->weights = weights;
    } else {
        f->ids_own_ = malloc(tk * sizeof(int32_t));
        f->weights_own_ = malloc(tk * sizeof(float));
        if (!f->ids_own_ || !f->weights_own_) {
            snprintf(msg, len, "out of memory for the routing");
            return -ENOMEM;
        }
        /* Copied before the check: a client's shared memory may change. */
        memcpy(f->ids_own_, ids, tk * sizeof(int32_t));
        memcpy(f->weights_own_, weights, tk * sizeof(float));
        f->ids = f->ids_own_;
        f->weights = f->weights_own_;
    }
    /* validated here, so the error names this request, not its batch */
    if (moe_routing_validate(m->cfg.n_experts, f->top_k, f->n_tokens, f->ids, f->weights, &e) < 0) {
        snprintf(msg, len, "routing: %s", e.msg);
        return -EINVAL;
    }
    return 0;
}

int moed_fwd_check_partial_routing(const struct moe_model *m, const char *model, int n_tokens,
                                   const int32_t *ids, const float *weights, char *msg, size_t len)
{
    const size_t K = (size_t)m->cfg.top_k, tk = (size_t)n_tokens * K;

    for (size_t i = 0; i < tk; i++) {
        size_t row = i / K, lo = row * K;
        bool dup = false;

        for (size_t j = lo; j < i && ids[i] >= 0; j++)
            dup |= ids[j] == ids[i];
        if (ids[i] < -1 || ids[i] >= m->cfg.n_experts || dup ||
            (ids[i] >= 0 && !isfinite(weights[i]))) {
            snprintf(msg, len,
                     "routing of row %zu slot %zu: expert %d%s (model '%s' has experts 0 to "
                     "%d; -1 leaves a slot out)",
                     row, i - lo, (int)ids[i],
                     dup ? " twice"
                     : ids[i] >= 0 && ids[i] < m->cfg.n_experts
                         ? " with a weight that is not finite"
                         : " out of range",
                     model, m->cfg.n_experts - 1);
            return -EINVAL;
        }
    }
    return 0;
}

int moed_fwd_decode_grpc(struct moed_fwd *f, const Moe__V1__ForwardRequest *q,
                         const struct moe_model *m, char *msg, size_t len)
{
    const Moe__V1__Tensor *t = q->hidden;
    const char *model = q->model ? q->model : "";
    size_t esz, n;
    int T, r;

    f->hidden = m->cfg.hidden;
    f->top_k = m->cfg.top_k;
    if (q->layer >= (uint32_t)m->cfg.n_layers || !m->layers[q->layer].is_moe) {
        snprintf(msg, len, "model '%s' has no MoE layer %u (layers 0 to %d; %d of them are MoE)",
                 model, q->layer, m->cfg.n_layers - 1, m->n_moe_layers);
        return -EINVAL;
    }
    f->layer = (int)q->layer;
    if (!t) {
        snprintf(msg, len, "ForwardRequest.hidden is missing");
        return -EINVAL;
    }
    if (t->n_shape != 2 || t->shape[1] != f->hidden || t->shape[0] < 1 ||
        t->shape[0] > MOE_MAX_TOKENS) {
        snprintf(msg, len,
                 "hidden: shape [%s%lld%s%lld%s]: expected [tokens, %d] with 1 to %d "
                 "tokens",
                 "", t->n_shape > 0 ? (long long)t->shape[0] : -1LL, ", ",
                 t->n_shape > 1 ? (long long)t->shape[1] : -1LL, t->n_shape > 2 ? ", ..." : "",
                 f->hidden, MOE_MAX_TOKENS);
        return -EINVAL;
    }
    if (t->dtype != MOE__V1__DTYPE__DTYPE_F32 && t->dtype != MOE__V1__DTYPE__DTYPE_BF16 &&
        t->dtype != MOE__V1__DTYPE__DTYPE_F16) {
        snprintf(msg, len, "hidden: dtype %d: expected DTYPE_F32, DTYPE_BF16 or DTYPE_F16",
                 (int)t->dtype);
        return -EINVAL;
    }
    T = (int)t->shape[0];
    esz = dtype_size(t->dtype);
    n = (size_t)T * (size_t)f->hidden;
    if (t->data.len != n * esz) {
        snprintf(msg, len, "hidden: %zu data bytes: shape [%d, %d] of %s needs %zu", t->data.len, T,
                 f->hidden, dtype_name(t->dtype), n * esz);
        return -EINVAL;
    }
    f->n_tokens = T;
    f->dtype = t->dtype;
    if (q->routing) {
        const Moe__V1__Routing *rt = q->routing;
        size_t tk = (size_t)T * (size_t)f->top_k;

        if (rt->top_k != (uint32_t)f->top_k || rt->n_expert_ids != tk || rt->n_weights != tk) {
            snprintf(msg, len,
                     "routing: top_k %u with %zu ids and %zu weights: expected top_k %d and %zu "
                     "of each ([tokens, top_k])",
                     rt->top_k, rt->n_expert_ids, rt->n_weights, f->top_k, tk);
            return -EINVAL;
        }
        /* The decoded message is the request's own: used where it lies. */
        r = moed_fwd_set_routing(f, m, rt->expert_ids, rt->weights, true, msg, len);
        if (r < 0)
            return r;
    }
    return moed_fwd_set_hidden(f, T, t->dtype, t->data.data, true, "hidden", msg, len);
}

int moed_fwd_decode_peer(struct moed_fwd *f, const Moe__V1__ForwardExpertsRequest *q,
                         const struct moe_model *m, char *msg, size_t len)
{
    const Moe__V1__Tensor *t = q->hidden;
    const bool nccl = q->nccl_seq || q->nccl_generation;
    bool hb;
    size_t n, tk;
    int T, r;

    f->hidden = m->cfg.hidden;
    f->top_k = m->cfg.top_k;
    if (q->layer >= (uint32_t)m->cfg.n_layers || !m->layers[q->layer].is_moe) {
        snprintf(msg, len, "model '%s' has no MoE layer %u", q->model ? q->model : "", q->layer);
        return -EINVAL;
    }
    f->layer = (int)q->layer;
    if (nccl && (!q->nccl_seq || !q->nccl_generation)) {
        snprintf(msg, len, "nccl_generation %llu, nccl_seq %llu: both or neither",
                 (unsigned long long)q->nccl_generation, (unsigned long long)q->nccl_seq);
        return -EINVAL;
    }
    /* bf16 on the wire (peer_bf16) over gRPC; NCCL carries f32. */
    hb = !nccl && t && t->dtype == MOE__V1__DTYPE__DTYPE_BF16;
    if (!t || t->n_shape != 2 || t->shape[1] != f->hidden || t->shape[0] < 1 ||
        t->shape[0] > MOE_MAX_TOKENS || (t->dtype != MOE__V1__DTYPE__DTYPE_F32 && !hb) ||
        t->data.len != (nccl ? 0 : (size_t)t->shape[0] * f->hidden * (hb ? 2 : 4))) {
        snprintf(msg, len, "hidden: expected float32%s [rows, %d] with 1 to %d rows%s",
                 nccl ? "" : " or bfloat16", f->hidden, MOE_MAX_TOKENS,
                 nccl ? " and no data (it comes over NCCL)" : "");
        return -EINVAL;
    }
    if (q->output_dtype != MOE__V1__DTYPE__DTYPE_UNSPECIFIED &&
        q->output_dtype != MOE__V1__DTYPE__DTYPE_F32 &&
        (q->output_dtype != MOE__V1__DTYPE__DTYPE_BF16 || nccl)) {
        snprintf(msg, len, "output_dtype %d: expected F32%s", (int)q->output_dtype,
                 nccl ? " over NCCL" : " or BF16");
        return -EINVAL;
    }
    T = (int)t->shape[0];
    n = (size_t)T * (size_t)f->hidden;
    tk = (size_t)T * (size_t)f->top_k;
    if (q->top_k != (uint32_t)f->top_k || q->n_expert_ids != tk || q->n_weights != tk) {
        snprintf(msg, len,
                 "routing: top_k %u with %zu ids and %zu weights: expected top_k %d "
                 "and %zu of each",
                 q->top_k, q->n_expert_ids, q->n_weights, f->top_k, tk);
        return -EINVAL;
    }
    f->n_tokens = T;
    f->outs_ = malloc(n * sizeof(float));
    if (!f->outs_) {
        snprintf(msg, len, "out of memory for %d rows", T);
        return -ENOMEM;
    }
    f->out = f->outs_;
    if (nccl) {
        /* The rows come later, over NCCL, into x; checked then. */
        f->x_own_ = malloc(n * sizeof(float));
        if (!f->x_own_) {
            snprintf(msg, len, "out of memory for %d rows", T);
            return -ENOMEM;
        }
        f->x = f->x_own_;
        f->dtype = MOE__V1__DTYPE__DTYPE_F32;
    } else {
        /* Copied: the request outlives the decoded message. */
        r = moed_fwd_set_hidden(f, T, t->dtype, t->data.data, false, "hidden", msg, len);
        if (r < 0)
            return r;
    }
    /* Copied for the same reason; a partial routing, checked here, not
     * only by the engine: a bad request would fail every request batched
     * with it. */
    f->ids_own_ = malloc(tk * sizeof(int32_t));
    f->weights_own_ = malloc(tk * sizeof(float));
    if (!f->ids_own_ || !f->weights_own_) {
        snprintf(msg, len, "out of memory for %d rows", T);
        return -ENOMEM;
    }
    memcpy(f->ids_own_, q->expert_ids, tk * sizeof(int32_t));
    memcpy(f->weights_own_, q->weights, tk * sizeof(float));
    f->ids = f->ids_own_;
    f->weights = f->weights_own_;
    r = moed_fwd_check_partial_routing(m, q->model ? q->model : "", T, f->ids, f->weights, msg,
                                       len);
    if (r < 0)
        return r;
    /* The answer's dtype from here on. */
    f->dtype = q->output_dtype == MOE__V1__DTYPE__DTYPE_BF16 ? MOE__V1__DTYPE__DTYPE_BF16
                                                             : MOE__V1__DTYPE__DTYPE_F32;
    return 0;
}

/* n floats at src as dtype into dst, which may be src itself: element i is
 * read before bytes [2i, 2i + 2) are written, and those bytes hold no
 * element after i, so converting in place is safe. */
static void encode(const float *src, size_t n, Moe__V1__DType dtype, void *dst)
{
    uint8_t *o = dst;

    if (dtype == MOE__V1__DTYPE__DTYPE_F32) {
        if (dst != (const void *)src)
            memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float v;
        uint16_t h;

        memcpy(&v, (const uint8_t *)src + 4 * i, 4);
        h = dtype == MOE__V1__DTYPE__DTYPE_BF16 ? moe_f32_to_bf16(v) : moe_f32_to_f16(v);
        memcpy(o + 2 * i, &h, 2);
    }
}

size_t moed_fwd_encode_in_place(struct moed_fwd *f)
{
    size_t n = (size_t)f->n_tokens * (size_t)f->hidden;

    encode(f->out, n, f->dtype, f->out);
    return n * dtype_size(f->dtype);
}

void moed_fwd_encode_into(const struct moed_fwd *f, void *dst)
{
    encode(f->out, (size_t)f->n_tokens * (size_t)f->hidden, f->dtype, dst);
}

void moed_fwd_clear(struct moed_fwd *f)
{
    free(f->x_own_);
    free(f->ids_own_);
    free(f->weights_own_);
    free(f->outs_);
    f->x_own_ = NULL;
    f->ids_own_ = NULL;
    f->weights_own_ = NULL;
    f->outs_ = NULL;
    f->x = f->out = f->ret_weights = NULL;
    f->weights = NULL;
    f->ids = f->ret_ids = NULL;
}
