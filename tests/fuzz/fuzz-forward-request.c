/*
 * Fuzz target of a remote Forward: the protobuf-c decode of a
 * moe.v1.ForwardRequest, as moed's gRPC handler does it, then the daemon's
 * own check of it (daemon/request.c moed_fwd_decode_grpc) against a
 * model of 4 layers (layer 0 dense), hidden 16, 8 experts, top-2.  A
 * refusal must say why, and moed_fwd_clear must leave nothing allocated
 * (LeakSanitizer); anything accepted must
 * be safe to hand to the engine: a MoE layer, 1 to MOE_MAX_TOKENS rows of
 * the model's width, every hidden state finite, and the caller's routing
 * (when given) of top-2 ids in range, no expert twice in a row, finite
 * weights.
 */
#include "forward.h"
#include "layer.h"
#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_LAYERS 4
#define HIDDEN 16
#define EXPERTS 8
#define TOP_K 2

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_accepted(const Moe__V1__ForwardRequest *q, const struct moed_fwd *in)
{
    if (q->layer < 1 || q->layer >= N_LAYERS)
        abort();
    if (in->n_tokens < 1 || in->n_tokens > MOE_MAX_TOKENS || in->hidden != HIDDEN ||
        in->top_k != TOP_K || !in->x)
        abort();
    if (in->dtype != MOE__V1__DTYPE__DTYPE_F32 && in->dtype != MOE__V1__DTYPE__DTYPE_BF16 &&
        in->dtype != MOE__V1__DTYPE__DTYPE_F16)
        abort();
    for (size_t i = 0; i < (size_t)in->n_tokens * HIDDEN; i++)
        if (!isfinite(in->x[i]))
            abort();
    if (!in->ids != !in->weights || !q->routing != !in->ids)
        abort();
    for (int t = 0; in->ids && t < in->n_tokens; t++) {
        for (int j = 0; j < TOP_K; j++) {
            int32_t id = in->ids[t * TOP_K + j];

            if (id < 0 || id >= EXPERTS || !isfinite(in->weights[t * TOP_K + j]))
                abort();
            for (int k = 0; k < j; k++)
                if (in->ids[t * TOP_K + k] == id)
                    abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct moe_layer layers[N_LAYERS];
    static struct moe_model m;
    Moe__V1__ForwardRequest *q;
    struct moed_fwd in;
    char msg[1024];
    int r;

    if (!m.layers) {
        for (int l = 1; l < N_LAYERS; l++)
            layers[l].is_moe = true;
        m.cfg.n_layers = N_LAYERS;
        m.cfg.hidden = HIDDEN;
        m.cfg.n_experts = EXPERTS;
        m.cfg.top_k = TOP_K;
        m.n_moe_layers = N_LAYERS - 1;
        m.layers = layers;
    }
    q = moe__v1__forward_request__unpack(NULL, size, data);
    if (!q)
        return 0; /* answered "the request is not a moe.v1.ForwardRequest" */
    msg[0] = 0;
    moed_fwd_init(&in, NULL, MOED_TRANSPORT_GRPC);
    r = moed_fwd_decode_grpc(&in, q, &m, msg, sizeof(msg));
    if (r < 0) {
        if (r != -EINVAL && r != -ENOMEM)
            abort();
        if (!msg[0] || !memchr(msg, 0, sizeof(msg)))
            abort(); /* a refusal says why */
    } else {
        if (r != 0)
            abort();
        check_accepted(q, &in);
    }
    moed_fwd_clear(&in);
    if (in.x || in.ids || in.weights)
        abort(); /* nothing kept */
    moe__v1__forward_request__free_unpacked(q, NULL);
    return 0;
}
