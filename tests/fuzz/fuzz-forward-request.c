/*
 * Fuzz target of a remote Forward, both kinds: every input is decoded as a
 * client's moe.v1.ForwardRequest, as moed's gRPC handler does it, and
 * checked by the daemon's own code (daemon/request.c moed_fwd_decode_grpc);
 * and the same bytes are decoded as a peer's moe.v1.ForwardExpertsRequest
 * (a cluster member's share of a split forward) and checked by
 * moed_fwd_decode_peer.  (Protobuf is read by field number, so one input
 * is a message of both kinds; the seeds named peer-* are peers' requests.)
 * The model: 4 layers (layer 0 dense), hidden 16, 8 experts, top-2.  A
 * refusal must say why, and moed_fwd_clear must leave nothing allocated
 * (LeakSanitizer); anything accepted must be safe to hand to the engine: a
 * MoE layer, 1 to MOE_MAX_TOKENS rows of the model's width, every hidden
 * state finite (a peer's over NCCL: a buffer for the rows to come), an
 * output buffer for a peer's, and the routing (a client's when given, a
 * peer's always) of top-2 ids in range (a peer's may be -1, a slot left
 * to another node), no expert twice in a row, finite weights.
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

/* A peer's request that moed_fwd_decode_peer accepted. */
static void check_accepted_peer(const Moe__V1__ForwardExpertsRequest *q, const struct moed_fwd *in)
{
    const bool nccl = q->nccl_seq || q->nccl_generation;

    if (q->layer < 1 || q->layer >= N_LAYERS || in->layer != (int)q->layer)
        abort();
    if (in->n_tokens < 1 || in->n_tokens > MOE_MAX_TOKENS || in->hidden != HIDDEN ||
        in->top_k != TOP_K || !in->x || !in->out || !in->ids || !in->weights)
        abort();
    if (nccl && (!q->nccl_seq || !q->nccl_generation))
        abort(); /* both or neither */
    if (in->dtype != MOE__V1__DTYPE__DTYPE_F32 && (in->dtype != MOE__V1__DTYPE__DTYPE_BF16 || nccl))
        abort();
    /* The rows themselves: here now, or over NCCL later (checked then). */
    for (size_t i = 0; !nccl && i < (size_t)in->n_tokens * HIDDEN; i++)
        if (!isfinite(in->x[i]))
            abort();
    for (int t = 0; t < in->n_tokens; t++) {
        for (int j = 0; j < TOP_K; j++) {
            int32_t id = in->ids[t * TOP_K + j];

            if (id == -1)
                continue;
            if (id < 0 || id >= EXPERTS || !isfinite(in->weights[t * TOP_K + j]))
                abort();
            for (int k = 0; k < j; k++)
                if (in->ids[t * TOP_K + k] == id)
                    abort();
        }
    }
    /* What it is written into is as large as the rows. */
    memset(in->out, 0, (size_t)in->n_tokens * HIDDEN * sizeof(float));
}

/* Reads every input of an accepted request (the rows only when here:
 * over NCCL they are still to come). */
static void sum_request(const struct moed_fwd *in, bool nccl)
{
    volatile float sum = 0;
    const size_t n = (size_t)in->n_tokens * HIDDEN, tk = (size_t)in->n_tokens * TOP_K;

    for (size_t i = 0; !nccl && i < n; i++)
        sum += in->x[i];
    for (size_t i = 0; i < tk; i++)
        sum += (float)in->ids[i] + in->weights[i];
    (void)sum;
}

/* r and msg of a decode: a refusal is -EINVAL or -ENOMEM and says why. */
static void check_refusal(int r, const char *msg, size_t len)
{
    if (r == 0)
        return;
    if (r != -EINVAL && r != -ENOMEM)
        abort();
    if (!msg[0] || !memchr(msg, 0, len))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Moe__V1__ForwardExpertsRequest *pq;
    bool nccl;
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
    if (q) { /* else answered "the request is not a moe.v1.ForwardRequest" */
        msg[0] = 0;
        moed_fwd_init(&in, NULL, MOED_TRANSPORT_GRPC);
        r = moed_fwd_decode_grpc(&in, q, &m, msg, sizeof(msg));
        check_refusal(r, msg, sizeof(msg));
        if (r == 0)
            check_accepted(q, &in);
        moed_fwd_clear(&in);
        if (in.x || in.ids || in.weights)
            abort(); /* nothing kept */
        moe__v1__forward_request__free_unpacked(q, NULL);
    }

    /* The same bytes as a peer's ForwardExperts (cluster_forward.c's
     * handler unpacks it and looks the model up by name first). */
    pq = moe__v1__forward_experts_request__unpack(NULL, size, data);
    if (pq) {
        msg[0] = 0;
        moed_fwd_init(&in, NULL, MOED_TRANSPORT_GRPC); /* as cluster_forward.c does */
        nccl = pq->nccl_seq || pq->nccl_generation;
        r = moed_fwd_decode_peer(&in, pq, &m, msg, sizeof(msg));
        check_refusal(r, msg, sizeof(msg));
        if (r == 0)
            check_accepted_peer(pq, &in);
        moe__v1__forward_experts_request__free_unpacked(pq, NULL);
        /* The request outlives its message: nothing of it points into the
         * message (AddressSanitizer reports a read of freed memory). */
        if (r == 0)
            sum_request(&in, nccl);
        moed_fwd_clear(&in);
        if (in.x || in.ids || in.weights || in.out)
            abort(); /* nothing kept */
    }
    return 0;
}
