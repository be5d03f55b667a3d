/*
 * The daemon's intake of forward requests (forward.h): every transport's
 * request is looked up, counted, submitted and completed here.
 *
 * Counters: d->requests, d->tokens, d->in_flight and the model's token_rows
 * at submission; d->failed and the metrics series at completion (or, for a
 * request refused before submission, by the transport via moed_fwd_count).
 * A peer's share (moed_fwd_submit_part) counts in d->in_flight and
 * d->parts_served (the cluster's peer_calls_served), not among the
 * clients' requests.  A request holds a reference on its model from the
 * lookup until its completion has counted it.
 *
 * A lost device: a completion with -ENOTRECOVERABLE, or any failure while
 * the backend says its device is lost, puts the daemon in its failed state
 * (moed_fatal, here: every request completes here) and is answered with
 * the backend's reason (INTERNAL).
 */
#include "forward.h"

#include "moed.h"

#include "log.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "a, b, c" of the loaded models' names. */
static void model_names(struct moed *d, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = 0;
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%s", i ? ", " : "", d->models[i]->name);
    pthread_mutex_unlock(&d->lock);
    if (!buf[0])
        snprintf(buf, len, "none");
}

int moed_fwd_model_by_name(struct moed_fwd *f, const char *name, char *msg, size_t len)
{
    char names[512];

    if (!name || !*name) {
        snprintf(msg, len, "ForwardRequest.model is empty: name a loaded model");
        return -EINVAL;
    }
    f->mm = moed_model_get(f->d, name);
    if (!f->mm) {
        model_names(f->d, names, sizeof(names));
        snprintf(msg, len, "no model called '%s' (loaded: %s)", name, names);
        return -ENOENT;
    }
    return 0;
}

int moed_fwd_model_by_id(struct moed_fwd *f, uint32_t id, const char *name, char *msg, size_t len)
{
    f->mm = moed_model_get_id(f->d, id);
    if (!f->mm) {
        snprintf(msg, len, "model '%s' (id %u) was unloaded", name, id);
        return -ENOENT;
    }
    f->hidden = f->mm->m->cfg.hidden;
    f->top_k = f->mm->m->cfg.top_k;
    return 0;
}

void moed_fwd_release(struct moed_fwd *f)
{
    if (f->mm) {
        moed_model_put(f->d, f->mm);
        f->mm = NULL;
    }
    moed_fwd_clear(f);
}

void moed_fwd_count(const struct moed_fwd *f, int grpc_code)
{
    moed_metrics_request(f->d->metrics, f->mm ? f->mm->name : NULL, f->layer, f->transport,
                         grpc_code, grpc_code == 0 ? f->n_tokens : 0, moe_now_ns() - f->t_recv);
}

/* f's scheduler request: its rows, out and routing buffers, flags; sched_done
 * completes it and then calls done(f, ..., arg). */
static void sched_req(struct moed_fwd *f, unsigned flags,
                      void (*sched_done)(struct moe_sched_req *, int, const char *),
                      moed_fwd_done_fn done, void *arg)
{
    f->done = done;
    f->arg = arg;
    f->sr = (struct moe_sched_req){
        .engine = f->mm->e,
        .a.layer = f->layer,
        .a.x = f->x,
        .a.n_tokens = f->n_tokens,
        .a.ids = f->ids,
        .a.weights = f->weights,
        .a.flags = flags,
        .a.out = f->out,
        .a.ret_ids = f->ret_ids,
        .a.ret_weights = f->ret_weights,
        .done = sched_done,
        .arg = f,
    };
}

/* A failed request's answer when the device is lost: its message and the
 * backend's reason, in buf; status becomes -ENOTRECOVERABLE.  Otherwise
 * msg as it was. */
static const char *fatal_answer(struct moed *d, int *status, const char *msg, char *buf, size_t len)
{
    const char *lost;

    if (!moed_check_fatal(d, *status, msg))
        return msg;
    /* The reason first: shared-memory clients get the first 103 bytes. */
    lost = moe_backend_lost(d->backend);
    snprintf(buf, len, "%s; %s; moed stops serving and exits to be restarted",
             lost ? lost : "the device cannot compute any more", msg ? msg : strerror(-*status));
    *status = -ENOTRECOVERABLE;
    return buf;
}

void moed_fatal(struct moed *d, const char *what)
{
    const char *lost;

    /* The first caller writes the reason; the others see fatal and go. */
    if (atomic_exchange(&d->fatal, true))
        return;
    lost = moe_backend_lost(d->backend);
    /* The reason first: shared-memory clients get the first 103 bytes. */
    snprintf(d->fatal_msg, sizeof(d->fatal_msg), "%s (first met by: %s)",
             lost ? lost : "the device failed", what);
    moe_log(MOE_LOG_ERROR,
            "the %s backend cannot compute any more: %s; not serving, exiting with status %d to "
            "be restarted",
            d->backend ? d->backend->ops->name : "", d->fatal_msg, MOED_EXIT_FATAL);
    /* Release: publishes fatal_msg; pairs with the acquire loads of state
     * in moed_fatal_reason() and the transports' refusals. */
    atomic_store_explicit(&d->state, MOED_FAILED, memory_order_release);
    /* Wakes the main thread's sigtimedwait (SIGUSR1 is blocked in every
     * thread and taken there). */
    pthread_kill(d->main_thread, SIGUSR1);
}

const char *moed_fatal_reason(struct moed *d)
{
    return atomic_load_explicit(&d->state, memory_order_acquire) == MOED_FAILED ? d->fatal_msg : "";
}

bool moed_check_fatal(struct moed *d, int status, const char *msg)
{
    if (status >= 0 || (status != -ENOTRECOVERABLE && !moe_backend_lost(d->backend)))
        return false;
    moed_fatal(d, msg ? msg : strerror(-status));
    return true;
}

static void fwd_done(struct moe_sched_req *r, int status, const char *msg)
{
    struct moed_fwd *f = r->arg;
    struct moed *d = f->d;
    char buf[MOE_ERROR_MSG_MAX + 512];

    msg = fatal_answer(d, &status, msg, buf, sizeof(buf));
    if (status < 0) {
        atomic_fetch_add(&d->failed, 1);
        if (!msg)
            msg = strerror(-status);
    }
    moed_fwd_count(f, moed_grpc_status(status));
    /* Given back before the answer goes out, so that a client that has its
     * answer can unload the model at once (an UnloadModel right after the
     * reply found the request still counted, and refused with "in flight"). */
    moed_model_put(d, f->mm);
    f->mm = NULL;
    f->done(f, status, msg); /* f is the transport's again */
    atomic_fetch_sub(&d->in_flight, 1);
}

int moed_fwd_submit(struct moed_fwd *f, unsigned flags, bool want_routing, moed_fwd_done_fn done,
                    void *arg, char *msg, size_t len)
{
    struct moed *d = f->d;
    const size_t n = (size_t)f->n_tokens * (size_t)f->hidden;
    const size_t tk = want_routing ? (size_t)f->n_tokens * (size_t)f->top_k : 0;
    struct moe_error err;
    char *b;

    /* One block for the outputs: out, then the routing used. */
    b = malloc(n * sizeof(float) + tk * (sizeof(int32_t) + sizeof(float)));
    if (!b) {
        snprintf(msg, len, "out of memory for %d tokens", f->n_tokens);
        return -ENOMEM;
    }
    f->outs_ = b;
    f->out = (float *)b;
    f->ret_ids = tk ? (int32_t *)(b + n * sizeof(float)) : NULL;
    f->ret_weights = tk ? (float *)(b + n * sizeof(float) + tk * sizeof(int32_t)) : NULL;
    sched_req(f, flags, fwd_done, done, arg);
    atomic_fetch_add(&d->in_flight, 1);
    atomic_fetch_add(&d->requests, 1);
    atomic_fetch_add(&d->tokens, (uint64_t)f->n_tokens);
    atomic_fetch_add_explicit(&f->mm->token_rows, (uint64_t)f->n_tokens, memory_order_relaxed);
    if (moed_submit(d, f->mm, &f->sr, &err) < 0) {
        atomic_fetch_sub(&d->in_flight, 1);
        snprintf(msg, len, "%s", err.msg);
        return err.code;
    }
    return 0;
}

static void part_done(struct moe_sched_req *r, int status, const char *msg)
{
    struct moed_fwd *f = r->arg;
    struct moed *d = f->d;
    char buf[MOE_ERROR_MSG_MAX + 512];

    if (status < 0 && !msg)
        msg = strerror(-status);
    msg = fatal_answer(d, &status, msg, buf, sizeof(buf));
    /* As fwd_done: given back before the answer goes out. */
    moed_model_put(d, f->mm);
    f->mm = NULL;
    f->done(f, status, msg); /* f is the transport's again */
    atomic_fetch_sub(&d->in_flight, 1);
}

int moed_fwd_submit_part(struct moed_fwd *f, unsigned flags, moed_fwd_done_fn done, void *arg,
                         char *msg, size_t len)
{
    struct moed *d = f->d;
    struct moe_error err;

    sched_req(f, flags | MOE_FWD_PARTIAL, part_done, done, arg);
    atomic_fetch_add(&d->in_flight, 1);
    atomic_fetch_add_explicit(&d->parts_served, 1, memory_order_relaxed);
    /* This node's scheduler, never split again: batched with its other work. */
    if (moe_sched_submit(d->sched, &f->sr, &err) < 0) {
        atomic_fetch_sub(&d->in_flight, 1);
        snprintf(msg, len, "%s", err.msg);
        return err.code;
    }
    return 0;
}
