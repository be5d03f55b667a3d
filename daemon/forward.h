/*
 * One forward request, whatever transport brought it (gRPC Forward and
 * ForwardStream, shared memory, a peer's Peer/ForwardExperts): struct
 * moed_fwd.  Each transport decodes its envelope into one, hands it to
 * moed_fwd_submit (a peer's share of a split forward: moed_fwd_submit_part),
 * and encodes the answer from it in its done callback; everything in
 * between happens here once.  (cluster_serve.c keeps of a peer's share
 * only its envelope: the rows over NCCL when they come that way.)
 *
 * request.c (no daemon state, so that the fuzz target
 * tests/fuzz/fuzz-forward-request.c runs it on decoded requests): the check
 * of a moe.v1.ForwardRequest against the model it names (layer, shape,
 * dtype, data length), the caller's routing, the hidden states converted to
 * f32 and checked finite, and the answer converted back to the request's
 * dtype.
 * forward.c (the daemon's intake): model lookup, the daemon's counters and
 * metrics, the outputs, submission (moed_submit: the scheduler, or a split
 * forward in a cluster) and completion.  A memory budget for requests in
 * flight hooks in at moed_fwd_submit (taken) and its completion (given
 * back), the two places every request passes.
 *
 * Lifetime: the transport owns the memory of the struct (it usually embeds
 * it); moed_fwd_init before anything else, moed_fwd_clear to release what
 * it holds.  After a successful moed_fwd_submit the struct belongs to the
 * request until done is called (on a scheduler or cluster thread), once.
 * Thread safety: a struct moed_fwd is used by one thread at a time.
 */
#ifndef MOED_DAEMON_FORWARD_H
#define MOED_DAEMON_FORWARD_H

#include "metrics.h"
#include "moe.pb-c.h"
#include "scheduler.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct moe_model;
struct moed;
struct moed_model;
struct moed_fwd;

/* The transport's answer: status 0 with f's outputs filled, or -errno with
 * msg (never NULL).  Already counted in the metrics, and the model
 * reference already given back (f->mm is NULL), so that a client that has
 * its answer can unload the model at once.  The callee answers and then
 * releases f (moed_fwd_clear, and frees its memory). */
typedef void (*moed_fwd_done_fn)(struct moed_fwd *f, int status, const char *msg);

struct moed_fwd {
    struct moed *d;                /* NULL for a check without a daemon */
    enum moed_transport transport; /* for the metrics */
    uint64_t t_recv;               /* moe_now_ns() when the transport had it */
    struct moed_model *mm;         /* a reference (moed_fwd_model_*), or NULL */
    int layer;                     /* -1 until known */
    int n_tokens, hidden, top_k;
    Moe__V1__DType dtype; /* of the request's hidden states (the answer's too) */
    const float *x;       /* [n_tokens, hidden] f32, all finite: x_own or borrowed */
    const int32_t *ids;   /* caller's routing [n_tokens, top_k], validated, or NULL */
    const float *weights; /* its weights, or NULL */
    float *out;           /* [n_tokens, hidden], after submit */
    int32_t *ret_ids;     /* the routing used, when asked for */
    float *ret_weights;
    struct moe_sched_req sr; /* the scheduler's request; its results after done */
    moed_fwd_done_fn done;
    void *arg; /* the transport's */

    /* private */
    float *x_own_;
    int32_t *ids_own_;
    float *weights_own_;
    void *outs_; /* out, ret_ids and ret_weights in one block */
};

/* ---- request.c: decoding and checks (no daemon state) ---- */

/* Zeroes f for transport t of daemon d (NULL: checks only). */
void moed_fwd_init(struct moed_fwd *f, struct moed *d, enum moed_transport t);
/* Frees the buffers f owns (not the model reference: moed_fwd_release);
 * an initialised f is fine.  Not while the request is submitted. */
void moed_fwd_clear(struct moed_fwd *f);

/*
 * Checks q against m (whose name q->model already matched) and fills f's
 * layer, shape, dtype, x and routing.  x and the routing may point into q
 * (f32 data is used where it lies): q must outlive f.  0, or -EINVAL with
 * msg saying what is wrong and what was expected, or -ENOMEM.
 */
int moed_fwd_decode_grpc(struct moed_fwd *f, const Moe__V1__ForwardRequest *q,
                         const struct moe_model *m, char *msg, size_t len);

/*
 * The hidden states: n_tokens x f->hidden values of dtype at data,
 * converted to f32 (copied unless borrow and dtype is f32 and data is
 * aligned: then used where they lie, and must outlive f) and checked
 * finite; what names the field in the message ("hidden: token 3, element 2
 * is not finite").  0, -EINVAL or -ENOMEM with msg.
 */
int moed_fwd_set_hidden(struct moed_fwd *f, int n_tokens, Moe__V1__DType dtype, const void *data,
                        bool borrow, const char *what, char *msg, size_t len);
/* The caller's routing ([n_tokens, top_k] ids and weights, copied unless
 * borrow), validated against m (moe_routing_validate).  0, -EINVAL or
 * -ENOMEM with msg. */
int moed_fwd_set_routing(struct moed_fwd *f, const struct moe_model *m, const int32_t *ids,
                         const float *weights, bool borrow, char *msg, size_t len);

/* A peer's share of a split forward (moe.v1.Peer/ForwardExperts): its
 * routing [n_tokens, top_k] may leave slots out (-1), other ids are m's
 * experts, none twice in a row, with finite weights.  0, or -EINVAL with
 * msg naming the row and slot (model names m in it).  The one check of a
 * partial routing, next to moed_fwd_set_routing's of a whole one. */
int moed_fwd_check_partial_routing(const struct moe_model *m, const char *model, int n_tokens,
                                   const int32_t *ids, const float *weights, char *msg, size_t len);

/*
 * A peer's share of a split forward (moe.v1.Peer/ForwardExperts) against m
 * (whose name q->model already matched): layer, shape, the NCCL fields,
 * output_dtype and the partial routing checked; hidden (f32 or bf16) and
 * routing copied (q may go before f), hidden checked finite, f->out
 * allocated.  Over NCCL (nccl_seq and nccl_generation set) f->x is left
 * for the transfer to fill; the caller checks it with moed_fwd_set_hidden
 * (borrow) once there.  Afterwards f->dtype is the answer's (F32 or BF16).
 * 0, or -EINVAL or -ENOMEM with msg.
 */
int moed_fwd_decode_peer(struct moed_fwd *f, const Moe__V1__ForwardExpertsRequest *q,
                         const struct moe_model *m, char *msg, size_t len);

/* The answer f->out in f->dtype: converted in place, returning its bytes
 * (f->out holds them), or into dst (n_tokens x hidden elements of f->dtype;
 * f->out is left as it was). */
size_t moed_fwd_encode_in_place(struct moed_fwd *f);
void moed_fwd_encode_into(const struct moed_fwd *f, void *dst);

/* ---- forward.c: the intake ---- */

/* Gives back the model reference, if any, and moed_fwd_clear. */
void moed_fwd_release(struct moed_fwd *f);

/* The model called name (a reference in f->mm): 0, or -ENOENT (and
 * -EINVAL for no name) with a message naming the models loaded. */
int moed_fwd_model_by_name(struct moed_fwd *f, const char *name, char *msg, size_t len);
/* The model with that shared-memory id: 0 or -ENOENT with msg. */
int moed_fwd_model_by_id(struct moed_fwd *f, uint32_t id, const char *name, char *msg, size_t len);

/*
 * Counts the request (the daemon's requests, tokens and in flight, the
 * model's token rows), makes its outputs (ret_ids and ret_weights when
 * want_routing) and submits it with the engine flags (MOE_FWD_*).  0: done
 * will be called once, on another thread, and f belongs to the request
 * until then.  -errno with msg: nothing was submitted (the failure is not
 * counted yet: the transport answers it and calls moed_fwd_count).
 */
int moed_fwd_submit(struct moed_fwd *f, unsigned flags, bool want_routing, moed_fwd_done_fn done,
                    void *arg, char *msg, size_t len);

/*
 * A peer's share of a split forward (decoded by moed_fwd_decode_peer, its
 * rows in f->x, the model's reference in f->mm): counted as a part served
 * (d->parts_served; not among the clients' requests, nor in their metrics)
 * and in flight, and submitted to this node's scheduler with the engine
 * flags plus MOE_FWD_PARTIAL (it is never split again).  0: done will be
 * called once, on another thread, with the model reference given back;
 * -errno with msg: nothing was submitted (the transport answers).
 */
int moed_fwd_submit_part(struct moed_fwd *f, unsigned flags, moed_fwd_done_fn done, void *arg,
                         char *msg, size_t len);

/* Counts f's answer in the metrics, with a gRPC status code: before the
 * answer goes out, so that a client that scrapes once answered sees it.
 * moed_fwd_submit's completion counts its own. */
void moed_fwd_count(const struct moed_fwd *f, int grpc_code);

#endif
