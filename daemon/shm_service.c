/*
 * The shared-memory transport in moed: the callbacks of the ipc/ server
 * (its model table and its forward), so that requests from local clients
 * (libmoe-client) join the scheduler's batches with gRPC's.
 *
 * The input is converted to fp32 into memory of our own before anything
 * reads it (the client may change its arena at any time; a value checked
 * and then changed would reach the engine unchecked), the output is
 * computed into our memory and converted into the arena at the end.
 */
#include "moed.h"

#include "dtype.h"
#include "log.h"
#include "router.h"
#include "server.h"

#include <errno.h>
#include <grp.h>
#include <math.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct shm_fwd {
    struct moed *d;
    struct moe_shm_req *req;
    struct moed_model *mm;
    struct moe_sched_req sr;
    int T, H, K;
    float *x, *out, *w;
    int32_t *ids;
};

static uint32_t shm_dtype(enum moe_dtype t)
{
    switch (t) {
    case MOE_DTYPE_F32:
        return MOE_SHM_DTYPE_F32;
    case MOE_DTYPE_F16:
        return MOE_SHM_DTYPE_F16;
    case MOE_DTYPE_BF16:
        return MOE_SHM_DTYPE_BF16;
    default:
        return MOE_SHM_DTYPE_OTHER;
    }
}

static int shm_models(void *arg, struct moe_shm_model_info *out, int max)
{
    struct moed *d = arg;
    int n = 0;

    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models && n < max; i++) {
        const struct moed_model *mm = d->models[i];
        const struct moe_model_config *c = &mm->m->cfg;
        struct moe_shm_model_info *mi = &out[n++];

        memset(mi, 0, sizeof(*mi));
        mi->id = mm->id;
        mi->dtype = shm_dtype(c->dtype);
        mi->n_layers = (uint32_t)c->n_layers;
        mi->hidden = (uint32_t)c->hidden;
        mi->n_experts = (uint32_t)c->n_experts;
        mi->top_k = (uint32_t)c->top_k;
        mi->ffn = (uint32_t)c->expert_ffn;
        mi->n_shared = (uint32_t)c->n_shared_experts;
        snprintf(mi->name, sizeof(mi->name), "%s", mm->name);
        snprintf(mi->arch, sizeof(mi->arch), "%s", moe_arch_name(c->arch));
        for (int l = 0; l < c->n_layers && l < MOE_SHM_MAX_LAYERS; l++)
            if (mm->m->layers[l].is_moe)
                mi->moe_layer[l / 8] |= (uint8_t)(1u << (l % 8));
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}

static void shm_fwd_free(struct shm_fwd *f)
{
    if (f->mm)
        moed_model_put(f->d, f->mm);
    free(f->x);
    free(f->out);
    free(f->w);
    free(f->ids);
    free(f);
}

static void shm_done(struct moe_sched_req *r, int status, const char *msg)
{
    struct shm_fwd *f = r->arg;
    struct moed *d = f->d;
    struct moe_shm_cqe c = {0};
    size_t n = (size_t)f->T * (size_t)f->H;
    uint8_t *o = f->req->out;

    if (status == 0) {
        /* The arena is the client's: written, never read back. */
        switch (f->req->sqe.dtype) {
        case MOE_SHM_DTYPE_F32:
            memcpy(o, f->out, n * sizeof(float));
            break;
        case MOE_SHM_DTYPE_BF16:
            for (size_t i = 0; i < n; i++) {
                uint16_t h = moe_f32_to_bf16(f->out[i]);

                memcpy(o + 2 * i, &h, 2);
            }
            break;
        default:
            for (size_t i = 0; i < n; i++) {
                uint16_t h = moe_f32_to_f16(f->out[i]);

                memcpy(o + 2 * i, &h, 2);
            }
            break;
        }
        c.hits = (uint32_t)r->st.hits;
        c.misses = (uint32_t)r->st.misses;
        c.batch_requests = (uint32_t)r->batch_requests;
        c.batch_tokens = (uint32_t)r->batch_tokens;
        c.queue_ns = r->queue_ns;
        c.compute_ns = r->st.route_ns + r->st.load_ns + r->st.compute_ns;
    } else {
        atomic_fetch_add(&d->failed, 1);
    }
    moed_metrics_request(d->metrics, f->mm->name, f->req->sqe.layer, MOED_TRANSPORT_SHM,
                         status == 0 ? 0 : moed_grpc_status(status), status == 0 ? f->T : 0,
                         moe_now_ns() - f->req->t_seen);
    moe_shm_complete(f->req, status, &c, status < 0 ? (msg ? msg : strerror(-status)) : NULL);
    atomic_fetch_sub(&d->in_flight, 1);
    shm_fwd_free(f);
}

/* Copies and converts the request out of the arena; 0 or -errno with msg. */
static int shm_prepare(struct shm_fwd *f, char *msg, size_t len)
{
    const struct moe_shm_req *q = f->req;
    const uint8_t *in = q->in;
    size_t n = (size_t)f->T * (size_t)f->H, tk = (size_t)f->T * (size_t)f->K;
    struct moe_error e;

    f->x = malloc(n * sizeof(float));
    f->out = malloc(n * sizeof(float));
    if (!f->x || !f->out) {
        snprintf(msg, len, "moed is out of memory for %d tokens", f->T);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;

        if (q->sqe.dtype == MOE_SHM_DTYPE_F32) {
            memcpy(&f->x[i], in + 4 * i, 4);
        } else {
            memcpy(&h, in + 2 * i, 2);
            f->x[i] = q->sqe.dtype == MOE_SHM_DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
        }
    }
    /* As for gRPC: one request's NaN would fail every request batched with it. */
    for (size_t i = 0; i < n; i++)
        if (!isfinite(f->x[i])) {
            snprintf(msg, len, "input: token %zu, element %zu is not finite", i / (size_t)f->H,
                     i % (size_t)f->H);
            return -EINVAL;
        }
    if (q->ids) {
        f->ids = malloc(tk * sizeof(int32_t));
        f->w = malloc(tk * sizeof(float));
        if (!f->ids || !f->w) {
            snprintf(msg, len, "moed is out of memory for the routing");
            return -ENOMEM;
        }
        memcpy(f->ids, q->ids, tk * sizeof(int32_t));
        memcpy(f->w, q->weights, tk * sizeof(float));
        if (moe_routing_validate(f->mm->m->cfg.n_experts, f->K, f->T, f->ids, f->w, &e) < 0) {
            snprintf(msg, len, "routing: %s", e.msg);
            return -EINVAL;
        }
    }
    return 0;
}

static int shm_forward(void *arg, struct moe_shm_req *req, char *msg, size_t len)
{
    struct moed *d = arg;
    struct shm_fwd *f;
    struct moe_error err;
    int rc;

    if (atomic_load(&d->state) != MOED_SERVING) {
        snprintf(msg, len, "moed is %s: no new requests",
                 atomic_load(&d->state) == MOED_DRAINING ? "draining" : "stopping");
        moed_metrics_request(d->metrics, req->model.name, req->sqe.layer, MOED_TRANSPORT_SHM,
                             moed_grpc_status(-ESHUTDOWN), 0, 0);
        return -ESHUTDOWN;
    }
    f = calloc(1, sizeof(*f));
    if (!f) {
        snprintf(msg, len, "moed is out of memory");
        return -ENOMEM;
    }
    f->d = d;
    f->req = req;
    f->mm = moed_model_get_id(d, req->model.id);
    if (!f->mm) {
        snprintf(msg, len, "model '%s' (id %u) was unloaded", req->model.name, req->model.id);
        free(f);
        return -ENOENT;
    }
    f->T = (int)req->sqe.n_tokens;
    f->H = f->mm->m->cfg.hidden;
    f->K = f->mm->m->cfg.top_k;
    rc = shm_prepare(f, msg, len);
    if (rc < 0) {
        moed_metrics_request(d->metrics, f->mm->name, req->sqe.layer, MOED_TRANSPORT_SHM,
                             moed_grpc_status(rc), 0, moe_now_ns() - req->t_seen);
        shm_fwd_free(f);
        return rc;
    }
    f->sr = (struct moe_sched_req){
        .engine = f->mm->e,
        .layer = req->sqe.layer,
        .x = f->x,
        .n_tokens = f->T,
        .ids = f->ids,
        .weights = f->w,
        .out = f->out,
        .done = shm_done,
        .arg = f,
    };
    atomic_fetch_add(&d->in_flight, 1);
    atomic_fetch_add(&d->requests, 1);
    atomic_fetch_add(&d->tokens, (uint64_t)f->T);
    atomic_fetch_add_explicit(&f->mm->token_rows, (uint64_t)f->T, memory_order_relaxed);
    if (moed_submit(d, f->mm, &f->sr, &err) < 0) {
        atomic_fetch_sub(&d->in_flight, 1);
        snprintf(msg, len, "%s", err.msg);
        moed_metrics_request(d->metrics, f->mm->name, req->sqe.layer, MOED_TRANSPORT_SHM,
                             moed_grpc_status(err.code), 0, moe_now_ns() - req->t_seen);
        shm_fwd_free(f);
        return err.code;
    }
    return 0;
}

/* "alice, 1001" -> uids; "moed, 27" -> gids.  0 or -EINVAL with err. */
static int parse_ids(const char *list, bool groups, uint32_t **ret, int *n_ret,
                     struct moe_error *err)
{
    char *s, *tok, *save = NULL;
    uint32_t *ids = NULL;
    int n = 0, rc = 0;

    *ret = NULL;
    *n_ret = 0;
    if (!list || !*list)
        return 0;
    s = strdup(list);
    ids = calloc(strlen(list) + 1, sizeof(*ids));
    if (!s || !ids) {
        free(s);
        free(ids);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (tok = strtok_r(s, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        char *end;
        unsigned long v = strtoul(tok, &end, 10);

        if (*end || end == tok) {
            struct passwd *pw = groups ? NULL : getpwnam(tok);
            struct group *gr = groups ? getgrnam(tok) : NULL;

            if (!pw && !gr) {
                rc = moe_error_set(err, -EINVAL, "%s: no %s called '%s' on this system",
                                   groups ? "shm_allow_groups" : "shm_allow_users",
                                   groups ? "group" : "user", tok);
                break;
            }
            v = groups ? gr->gr_gid : pw->pw_uid;
        }
        ids[n++] = (uint32_t)v;
    }
    free(s);
    if (rc < 0) {
        free(ids);
        return rc;
    }
    *ret = ids;
    *n_ret = n;
    return 0;
}

int moed_shm_start(struct moed *d, struct moe_error *err)
{
    struct moe_shm_server_config sc = {0};
    char msg[256];
    int rc;

    if (!d->cfg.shm_socket || strcmp(d->cfg.shm_socket, "none") == 0)
        return 0;
    rc = parse_ids(d->cfg.shm_allow_users, false, &d->shm_uids, &d->n_shm_uids, err);
    if (rc == 0)
        rc = parse_ids(d->cfg.shm_allow_groups, true, &d->shm_gids, &d->n_shm_gids, err);
    if (rc < 0)
        return rc;
    sc.path = d->cfg.shm_socket;
    sc.listen_fd = -1;
    sc.allow_uids = (const uid_t *)d->shm_uids;
    sc.n_allow_uids = d->n_shm_uids;
    sc.allow_gids = (const gid_t *)d->shm_gids;
    sc.n_allow_gids = d->n_shm_gids;
    sc.max_arena_bytes = d->cfg.shm_max_arena_bytes;
    sc.max_sessions = d->cfg.shm_max_sessions;
    sc.models = shm_models;
    sc.forward = shm_forward;
    sc.arg = d;
    rc = moe_shm_server_start(&sc, &d->shm, msg, sizeof(msg));
    if (rc < 0)
        return moe_error_set(err, rc, "%s", msg);
    moe_log(MOE_LOG_INFO, "shared-memory clients on %s", d->cfg.shm_socket);
    return 0;
}

void moed_shm_stop(struct moed *d, const char *reason)
{
    moe_shm_server_stop(d->shm, reason);
    d->shm = NULL;
    free(d->shm_uids);
    free(d->shm_gids);
    d->shm_uids = d->shm_gids = NULL;
}
