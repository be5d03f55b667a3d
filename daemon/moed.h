/*
 * The daemon's state, shared by its files: main.c (lifecycle), models.c (the
 * model table), reply.c (gRPC answers and status codes), service.c (the
 * gRPC handlers of moe.v1.Experts, moe.v1.Control and
 * grpc.health.v1.Health), and the rest of daemon/README.md.
 */
#ifndef MOED_DAEMON_MOED_H
#define MOED_DAEMON_MOED_H

#include "backend.h"
#include "cache.h"
#include "cluster.h"
#include "config.h"
#include "layer.h"
#include "metrics.h"
#include "model.h"
#include "rpc.h"
#include "scheduler.h"

#include <pthread.h>
#include <stdatomic.h>

/* MOED_FAILED: the backend's device is lost (moed_fatal); sticky, moed
 * exits with MOED_EXIT_FATAL to be restarted. */
enum moed_state { MOED_SERVING = 0, MOED_DRAINING, MOED_STOPPING, MOED_FAILED };

/* moed's exit status after a device error it cannot recover from (systemd
 * restarts it: Restart=on-failure in moed.service). */
#define MOED_EXIT_FATAL 3

struct moed_model {
    char *name;
    struct moe_model *m;
    struct moe_engine *e;
    int cache_id;
    uint32_t id; /* for shared-memory clients: unique for the daemon's life */
    int refs;    /* requests using it; guarded by moed.lock */
    /* Token rows of the forwards submitted for it (every transport), summed
     * over its layers: Stats' ModelStats.token_rows.  Relaxed: a counter read
     * on its own, ordering nothing. */
    _Atomic uint64_t token_rows;
    struct moed_recording *rec; /* a live routing recording (state.c), or NULL */
};

struct moe_shm_server;
struct moed_loader;
struct moed_recording;

#define MOED_MAX_MODEL_DIRS 16
#define MOED_MAX_PENDING_LOADS 16

struct moed {
    struct moed_config cfg;
    struct moe_backend *backend;
    int gpu; /* the CUDA device computing, or -1 (the CPU) */
    struct moe_cache *cache;
    struct moe_sched *sched;
    struct moe_rpc_server *rpc;
    struct moed_metrics *metrics;  /* request series and the /metrics endpoint */
    struct moe_shm_server *shm;    /* local clients (shm_service.c); NULL: none */
    struct moed_cluster *cluster;  /* peers, placement (cluster.c) */
    uint32_t *shm_uids, *shm_gids; /* the allow-lists, resolved */
    int n_shm_uids, n_shm_gids;
    uint64_t t_start;
    _Atomic int state;
    pthread_t main_thread; /* woken by moed_fatal (SIGUSR1) */
    /* The reason moed failed: written once by the first moed_fatal, before
     * it sets state to MOED_FAILED (release); read after loading state
     * (acquire) as MOED_FAILED (moed_fatal_reason). */
    char fatal_msg[512];
    _Atomic bool fatal;   /* a moed_fatal has begun (the first writes fatal_msg) */
    pthread_mutex_t lock; /* the model table; cfg.policy and cfg.prefetch after start */
    int n_models;
    uint32_t next_model_id;
    struct moed_model *models[MOED_MAX_MODELS];
    _Atomic uint64_t requests, tokens, failed;
    _Atomic uint64_t parts_served; /* peers' shares (moed_fwd_submit_part) */
    _Atomic int in_flight;
    /* LoadModel (loader.c): the thread loads run on (created at the first;
     * under lock), model_dirs resolved and the configured models'
     * directories resolved, both set at start and read-only after. */
    struct moed_loader *loader;
    char *model_roots[MOED_MAX_MODEL_DIRS];
    int n_model_roots;
    char *model_trusted[MOED_MAX_MODELS];
    char *state_dir;          /* resolved [server] state_dir, or NULL: none (state.c) */
    pthread_mutex_t rec_lock; /* every model's recording (moed_model.rec; state.c) */
    /* Called by models.c when a model comes (registered) and goes (lock not
     * held, no request in flight); NULL: nothing.  moed_state_init sets
     * them to moed_state_warm and moed_state_model_gone, so that the model
     * table does not depend on the state directory's code. */
    void (*model_came)(struct moed *d, struct moed_model *mm);
    void (*model_gone)(struct moed *d, struct moed_model *mm);
};

/* state.c.  Resolves and makes state_dir (its heat/ and traces/), from the
 * configuration or $STATE_DIRECTORY; none is fine; sets d's model_came and
 * model_gone, before any model is added.  0 or -errno with err. */
int moed_state_init(struct moed *d, struct moe_error *err);
void moed_state_clear(struct moed *d);
/* A model came: pages its hottest experts of the last run in (warm start). */
void moed_state_warm(struct moed *d, struct moed_model *mm);
/* A model goes (lock not held, no request in flight): saves its heat and
 * stops its recording. */
void moed_state_model_gone(struct moed *d, struct moed_model *mm);
/* Control RecordRouting. */
void moed_on_record_routing(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);

/* Opens dir as model name and registers it (lock not held), for LoadModel:
 * dir must pass moed_model_dir_check.  0 or -errno. */
int moed_load_model(struct moed *d, const char *name, const char *dir, struct moe_error *err);

/* loader.c.  Resolves [server] model_dirs and the configured models'
 * directories; at start, before any LoadModel.  0 or -errno with err. */
int moed_model_dirs_init(struct moed *d, struct moe_error *err);
void moed_model_dirs_clear(struct moed *d);
/* Whether LoadModel may open dir: absolute, and once resolved a configured
 * model's directory (*ret_trusted) or inside model_dirs with no symlink in
 * it leading out.  0 and *ret_real (resolved; the caller frees it), or
 * -EINVAL (relative), -ENOENT, -EPERM with err saying why. */
int moed_model_dir_check(struct moed *d, const char *dir, char **ret_real, bool *ret_trusted,
                         struct moe_error *err);
/* After moe_model_open of a directory inside model_dirs: every file m holds
 * open is inside model_dirs (by its descriptor).  0 or -EPERM with err. */
int moed_model_files_check(struct moed *d, const struct moe_model *m, struct moe_error *err);
/* Runs run(d, arg) on the loader thread, after the loads queued before it;
 * when moed stops first, cancel(d, arg) instead (on the stopping thread).
 * -EAGAIN when MOED_MAX_PENDING_LOADS wait already, -ESHUTDOWN when
 * stopping, -ENOMEM; then neither is called. */
int moed_loader_submit(struct moed *d, void (*run)(struct moed *, void *),
                       void (*cancel)(struct moed *, void *), void *arg, struct moe_error *err);
/* Cancels the loads queued, waits for the one running, ends the thread. */
void moed_loader_stop(struct moed *d);
/* Registers a model already open; takes m (freed on failure too). */
int moed_add_model(struct moed *d, const char *name, struct moe_model *m, struct moe_error *err);
/* Unregisters and frees; -EBUSY while in use.  0 or -errno. */
int moed_unload_model(struct moed *d, const char *name, struct moe_error *err);
void moed_free_models(struct moed *d);

/* The model called name, with a reference taken, or NULL. */
struct moed_model *moed_model_get(struct moed *d, const char *name);
/* Packs m and answers call with it. */
struct ProtobufCMessage;
void moed_reply_msg(struct moe_rpc_call *call, const struct ProtobufCMessage *m);

/* The model with that id, with a reference taken, or NULL; moed_model_put
 * gives the reference back. */
struct moed_model *moed_model_get_id(struct moed *d, uint32_t id);
void moed_model_put(struct moed *d, struct moed_model *mm);

/* The shared-memory transport (shm_service.c): starts serving local
 * clients on cfg.shm_socket (nothing when unset or "none").  0 or -errno. */
int moed_shm_start(struct moed *d, struct moe_error *err);
/* Ends every session (clients read reason), after their requests in
 * flight; NULL server: no-op. */
void moed_shm_stop(struct moed *d, const char *reason);

/* The methods served, for moe_rpc_server_start (their arg is d). */
int moed_methods(struct moed *d, const struct moe_rpc_method **ret);

/* gRPC status for an engine -errno. */
int moed_grpc_status(int err);

/* "serving", "draining", "stopping" or "failed" (Status, Ping). */
const char *moed_state_name(int state);

/*
 * forward.c.  The daemon-wide failed state: the backend's device is lost
 * (a request failed with -ENOTRECOVERABLE, or the backend's lost slot
 * says so).  The first call logs why (what, and the backend's reason),
 * sets state to MOED_FAILED, so that health says NOT_SERVING and every
 * transport refuses new requests with the reason, and wakes the main
 * thread, which shuts down and exits with MOED_EXIT_FATAL.  Later calls
 * do nothing.  Any thread.
 */
void moed_fatal(struct moed *d, const char *what);
/* The reason moed failed ("" while it has not). */
const char *moed_fatal_reason(struct moed *d);
/* Whether a request's failure (status, the backend's state) means the
 * device is lost: then moed_fatal(d, msg) is called and the request's
 * answer should say so (moed_fatal_reason). */
bool moed_check_fatal(struct moed *d, int status, const char *msg);

#endif
