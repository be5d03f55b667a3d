/*
 * The daemon's state, shared by main.c (lifecycle) and service.c (the gRPC
 * handlers of moe.v1.Experts, moe.v1.Control and grpc.health.v1.Health).
 */
#ifndef MOED_DAEMON_MOED_H
#define MOED_DAEMON_MOED_H

#include "backend.h"
#include "cache.h"
#include "config.h"
#include "layer.h"
#include "metrics.h"
#include "model.h"
#include "rpc.h"
#include "scheduler.h"

#include <pthread.h>
#include <stdatomic.h>

enum moed_state { MOED_SERVING = 0, MOED_DRAINING, MOED_STOPPING };

struct moed_model {
    char *name;
    struct moe_model *m;
    struct moe_engine *e;
    int cache_id;
    int refs; /* requests using it; guarded by moed.lock */
};

struct moed {
    struct moed_config cfg;
    struct moe_backend *backend;
    struct moe_cache *cache;
    struct moe_sched *sched;
    struct moe_rpc_server *rpc;
    struct moed_metrics *metrics; /* request series and the /metrics endpoint */
    uint64_t t_start;
    _Atomic int state;
    pthread_mutex_t lock; /* the model table */
    int n_models;
    struct moed_model *models[MOED_MAX_MODELS];
    _Atomic uint64_t requests, tokens, failed;
    _Atomic int in_flight;
};

/* Opens dir as model name and registers it (lock not held).  0 or -errno. */
int moed_load_model(struct moed *d, const char *name, const char *dir, struct moe_error *err);
/* Registers a model already open; takes m (freed on failure too). */
int moed_add_model(struct moed *d, const char *name, struct moe_model *m, struct moe_error *err);
/* Unregisters and frees; -EBUSY while in use.  0 or -errno. */
int moed_unload_model(struct moed *d, const char *name, struct moe_error *err);
void moed_free_models(struct moed *d);

/* The methods served, for moe_rpc_server_start (their arg is d). */
int moed_methods(struct moed *d, const struct moe_rpc_method **ret);

/* gRPC status for an engine -errno. */
int moed_grpc_status(int err);

#endif
