/*
 * The shared-memory transport in moed: the callbacks of the ipc/ server
 * (its model table and its forward), so that requests from local clients
 * (libmoe-client) join the scheduler's batches with gRPC's.
 *
 * The input is converted to fp32 into memory of our own before anything
 * reads it (the client may change its arena at any time; a value checked
 * and then changed would reach the engine unchecked), the output is
 * computed into our memory and converted into the arena at the end; the
 * rest of a request's way is forward.c's, as for gRPC.
 */
#include "moed.h"

#include "forward.h"
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

/* A shared-memory forward: the request (forward.h) and its envelope. */
struct shm_fwd {
    struct moed_fwd f;
    struct moe_shm_req *req;
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

static Moe__V1__DType wire_dtype(uint32_t t)
{
    return t == MOE_SHM_DTYPE_F32    ? MOE__V1__DTYPE__DTYPE_F32
           : t == MOE_SHM_DTYPE_BF16 ? MOE__V1__DTYPE__DTYPE_BF16
                                     : MOE__V1__DTYPE__DTYPE_F16;
}

static void shm_fwd_free(struct shm_fwd *g)
{
    moed_fwd_release(&g->f);
    free(g);
}

static void shm_done(struct moed_fwd *f, int status, const char *msg)
{
    struct shm_fwd *g = (struct shm_fwd *)f; /* f is its first member */
    const struct moe_sched_req *r = &f->sr;
    struct moe_shm_cqe c = {0};

    if (status == 0) {
        /* The arena is the client's: written, never read back. */
        moed_fwd_encode_into(f, g->req->out);
        c.hits = (uint32_t)r->st.hits;
        c.misses = (uint32_t)r->st.misses;
        c.batch_requests = (uint32_t)r->batch_requests;
        c.batch_tokens = (uint32_t)r->batch_tokens;
        c.queue_ns = r->queue_ns;
        c.compute_ns = r->st.route_ns + r->st.load_ns + r->st.compute_ns;
    }
    moe_shm_complete(g->req, status, &c, status < 0 ? msg : NULL);
    shm_fwd_free(g);
}

static int shm_forward(void *arg, struct moe_shm_req *req, char *msg, size_t len)
{
    struct moed *d = arg;
    struct shm_fwd *g;
    int rc;

    if (atomic_load(&d->state) != MOED_SERVING) {
        int st = atomic_load(&d->state);

        if (st == MOED_FAILED)
            snprintf(msg, len, "moed failed: %s; it takes no requests and exits to be restarted",
                     moed_fatal_reason(d));
        else
            snprintf(msg, len, "moed is %s: no new requests", moed_state_name(st));
        moed_metrics_request(d->metrics, req->model.name, req->sqe.layer, MOED_TRANSPORT_SHM,
                             moed_grpc_status(-ESHUTDOWN), 0, 0);
        return -ESHUTDOWN;
    }
    g = calloc(1, sizeof(*g));
    if (!g) {
        snprintf(msg, len, "moed is out of memory");
        return -ENOMEM;
    }
    moed_fwd_init(&g->f, d, MOED_TRANSPORT_SHM);
    g->f.t_recv = req->t_seen;
    g->f.layer = req->sqe.layer;
    g->req = req;
    rc = moed_fwd_model_by_id(&g->f, req->model.id, req->model.name, msg, len);
    if (rc < 0) {
        free(g);
        return rc;
    }
    /* Copied (and converted) into our memory before anything reads it: the
     * client may change its arena at any time, and a value checked and then
     * changed would reach the engine unchecked. */
    rc = moed_fwd_set_hidden(&g->f, (int)req->sqe.n_tokens, wire_dtype(req->sqe.dtype), req->in,
                             false, "input", msg, len);
    if (rc == 0 && req->ids)
        rc = moed_fwd_set_routing(&g->f, g->f.mm->m, req->ids, req->weights, false, msg, len);
    if (rc == 0)
        rc = moed_fwd_submit(&g->f, 0, false, shm_done, NULL, msg, len);
    if (rc < 0) {
        moed_fwd_count(&g->f, moed_grpc_status(rc));
        shm_fwd_free(g);
        return rc;
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
