/*
 * moed's configuration: an INI file (--config) and command-line flags, one
 * table of keys for both.  Every key of the file can be given as a flag
 * named like the key with '-' for '_' (--host-cache-bytes 8G), and the flag
 * wins.  Unknown keys, bad values and missing files are refused with the
 * key, the value, where it came from and what is expected.
 *
 *   [server]    listen, socket, token, tls_cert, tls_key, tls_client_ca,
 *               tls_require_client_cert, max_message_bytes, log_level,
 *               rpc_threads, drain_timeout_ms, metrics, shm_socket,
 *               shm_allow_users, shm_allow_groups, shm_max_arena_bytes,
 *               shm_max_sessions, model_dirs, log_format
 *   [cache]     host_cache_bytes, policy, prefetch, half_life,
 *               register_buffers, buffered
 *   [scheduler] batch_window_us, max_batch_tokens, workers, request_memory_bytes
 *   [compute]   threads, kernel, int8_activations, gpus, gpu_cache_bytes,
 *               compute_precision
 *   [cluster]   node_name, replicas, hot_fraction, peer_timeout_ms,
 *               ping_interval_ms, rebalance_interval_ms, peer_max_rows,
 *               nccl, nccl_device, peer_bf16, max_split_forwards,
 *               peer = NAME HOST:PORT   (repeatable; flag: --peer "NAME HOST:PORT")
 *   [models]    NAME = DIR   (repeatable; flag: --model [NAME=]DIR)
 *               NAME.compute_precision = exact|bf16   (after NAME = DIR; overrides
 *               [compute] compute_precision for that model)
 *
 * systemd/moed.conf.example documents every key.
 */
#ifndef MOED_DAEMON_CONFIG_H
#define MOED_DAEMON_CONFIG_H

#include "cache.h"
#include "common.h"
#include "log.h"
#include "logging.h"

#include <stdio.h>

#define MOED_MAX_MODELS 64
#define MOED_VERSION "0.1.0"

struct moed_model_cfg {
    char *name;
    char *dir;
    int precision; /* enum moe_compute_precision; -1: [compute] compute_precision */
};

#define MOED_MAX_PEERS 63
#define MOED_SPLIT_FORWARDS_DEFAULT 64

struct moed_peer_cfg {
    char *name;
    char *address; /* HOST:PORT */
};

struct moed_config {
    char *config_path; /* NULL: none */
    /* [server] */
    char *listen;
    char *socket;
    char *token;
    char *tls_cert, *tls_key, *tls_client_ca;
    bool tls_require_client_cert;
    uint64_t max_message_bytes;
    enum moe_log_level log_level;
    enum moed_log_format log_format; /* text (default) or json */
    int rpc_threads;
    uint64_t drain_timeout_ms;
    char *metrics;          /* Prometheus endpoint HOST:PORT, NULL: off */
    char *shm_socket;       /* shared-memory clients' socket; NULL/"none": off */
    char *shm_allow_users;  /* user names or uids, comma-separated */
    char *shm_allow_groups; /* group names or gids */
    uint64_t shm_max_arena_bytes;
    int shm_max_sessions;
    char *model_dirs; /* where LoadModel may load from, comma-separated; NULL: none */
    char *state_dir;  /* heat files, recordings; NULL: $STATE_DIRECTORY or none */
    /* [cache] */
    uint64_t host_cache_bytes; /* 0: every expert of the models at start */
    enum moe_cache_policy policy;
    bool prefetch;
    bool warm_start; /* heat saved at stop, hottest paged in at start (needs state_dir) */
    double half_life;
    bool register_buffers;
    bool buffered;
    /* [scheduler] */
    uint64_t batch_window_us;
    int max_batch_tokens;
    int workers;
    uint64_t request_memory_bytes; /* requests in flight; 0: a quarter of the host's memory */
    /* [compute] */
    int threads;
    char *kernel;
    bool int8_activations; /* moe_cpu_config.act_int8 */
    char *gpus;               /* CUDA devices, "0" or "0,1"; NULL/"none": CPU only */
    uint64_t gpu_cache_bytes; /* per GPU tier; 0: half the device's free memory */
    int compute_precision;    /* enum moe_compute_precision of models that name none */
    /* [cluster] */
    char *node_name;           /* this node's name (default: the host name) */
    int replicas;              /* extra copies of each hot expert (default 1) */
    double hot_fraction;       /* of the experts, the hottest that get replicas */
    uint64_t peer_timeout_ms;  /* a ForwardExperts slower than this fails over */
    uint64_t ping_interval_ms; /* peer health checks */
    uint64_t rebalance_interval_ms;
    int peer_max_rows; /* token rows per ForwardExperts; 0: what max_message_bytes allows */
    bool nccl;         /* token rows to peers over NCCL where both have it (default on) */
    bool peer_bf16;    /* token rows and outputs to peers over gRPC in bf16 (default f32) */
    int max_split_forwards; /* split forwards in flight at most; 0: MOED_SPLIT_FORWARDS_DEFAULT */
    int nccl_device;   /* CUDA device for NCCL; -1: the first of gpus, else 0 */
    int n_peers;
    struct moed_peer_cfg peers[MOED_MAX_PEERS];
    /* [models] */
    int n_models;
    struct moed_model_cfg models[MOED_MAX_MODELS];
};

/* Adds a peer from "NAME HOST:PORT"; where names it in messages.  0 or
 * -EINVAL with err. */
int moed_config_add_peer(struct moed_config *c, const char *spec, const char *where,
                         struct moe_error *err);

/* The compute precision (enum moe_compute_precision, backend.h) of model
 * i: its own NAME.compute_precision, else [compute] compute_precision. */
int moed_config_model_precision(const struct moed_config *c, int i);

/* Defaults. */
void moed_config_init(struct moed_config *c);
void moed_config_clear(struct moed_config *c);

/*
 * Parses argv (after the program name): --config FILE first (read before
 * the flags, so that flags win), then every flag.  Returns 0, 1 when --help
 * or --version was printed (exit 0), or -EINVAL with err for bad usage.
 */
int moed_config_load(struct moed_config *c, int argc, char **argv, struct moe_error *err);

/* Re-reads the file for what can change live (SIGHUP): log level and
 * format, cache capacity, policy, prefetch.  Flags given at start still
 * win.  0 or -errno with err. */
int moed_config_reload(const struct moed_config *start, int argc, char **argv,
                       struct moed_config *ret, struct moe_error *err);

/* Applies INI text (NUL-terminated) to c; fname names it in messages.  The
 * file parser behind --config, exposed for its fuzz target.  0 or -errno. */
int moed_config_parse(struct moed_config *c, const char *text, const char *fname,
                      struct moe_error *err);

void moed_usage(FILE *f);

#define MOED_CHECK_MAX_ERRORS 64
#define MOED_CONFIG_KEYS 64 /* at least the keys of config.c's table */

/* What moed --check-config found: every error, in the order found. */
struct moed_config_check {
    int n;                                   /* errors kept */
    int dropped;                             /* errors beyond MOED_CHECK_MAX_ERRORS */
    char *errors[MOED_CHECK_MAX_ERRORS];     /* "FILE:LINE: what, what is expected" */
    int key_line[MOED_CONFIG_KEYS];          /* the file's line of each key set, 0: not */
    int model_line[MOED_MAX_MODELS];         /* the file's line of each model, 0: a flag */
};

/* Keeps one error (printf-style); beyond the cap only counts it. */
void moed_config_check_add(struct moed_config_check *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void moed_config_check_clear(struct moed_config_check *k);

/*
 * moed --check-config FILE [FLAGS]: parses FILE and the flags as moed would,
 * collecting every error rather than stopping at the first, then checks what
 * it can without starting anything: the settings that go together, each
 * model directory opens as a checkpoint or packed store (config.json, the
 * index and the shard headers, or moe-pack.json), the TLS files are
 * readable.  Fills k (cleared first; free with moed_config_check_clear).
 * Returns the number of errors.
 */
int moed_config_check(const char *path, int argc, char **argv, struct moed_config_check *k);

#endif
