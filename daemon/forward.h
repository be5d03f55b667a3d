/*
 * The check of a moe.v1.ForwardRequest against the model it names: shape,
 * dtype, data length, the caller's routing and finite hidden states, with
 * the hidden states converted to f32.  Shared by the gRPC entries (Forward,
 * ForwardStream) and callable without a server, so that its fuzz target
 * (tests/fuzz/fuzz-forward-request.c) runs the daemon's own check on
 * decoded requests.  The model is looked up by the caller.
 * Thread safety: none needed; it touches only its arguments.
 */
#ifndef MOED_DAEMON_FORWARD_H
#define MOED_DAEMON_FORWARD_H

#include "moe.pb-c.h"

#include <stddef.h>
#include <stdint.h>

struct moe_model;

/* A request that passed the check; the buffers are owned by it. */
struct moed_fwd_input {
    int n_tokens;          /* rows of x, 1 to MOE_MAX_TOKENS */
    int hidden;            /* the model's hidden size */
    int top_k;             /* the model's top-k */
    Moe__V1__DType dtype;  /* of the request's hidden states (the answer's too) */
    float *x;              /* [n_tokens, hidden] f32, all finite */
    int32_t *ids;          /* caller's routing [n_tokens, top_k], validated, or NULL */
    float *weights;        /* its weights [n_tokens, top_k], or NULL */
};

/*
 * Checks q against m (whose name q->model already matched).  Returns 0 and
 * fills *in (release with moed_fwd_input_clear), or -EINVAL with msg saying
 * what is wrong and what was expected, or -ENOMEM; on failure *in holds
 * nothing to release.
 */
int moed_forward_request_check(const Moe__V1__ForwardRequest *q, const struct moe_model *m,
                               struct moed_fwd_input *in, char *msg, size_t len);

/* Frees what *in owns and zeroes it; a zeroed *in is fine. */
void moed_fwd_input_clear(struct moed_fwd_input *in);

#endif
