/*
 * What the cluster's files (cluster.c, cluster_peers.c, cluster_health.c,
 * cluster_forward.c, cluster_serve.c, cluster_pool.c, cluster_nccl.c)
 * share: its state and the functions one
 * of them gives the others (moed_cl_*).  Internal to them: nothing else
 * includes it.
 */
#ifndef MOED_DAEMON_CLUSTER_INT_H
#define MOED_DAEMON_CLUSTER_INT_H

#include "cluster.h"
#include "moed.h"
#include "rpc_client.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define MAX_MEMBERS (MOED_MAX_PEERS + 1)
#define IDLE_CLIENTS 16

enum peer_state { PEER_DOWN = 0, PEER_UP, PEER_REFUSED };

struct moe_nccl;

/*
 * The NCCL transport with one peer: two communicators of two ranks, one
 * per direction of forwards.  `out` carries the forwards this node sends
 * (it made it: rank 0, the peer rank 1), `in` those the peer sends.  On
 * each, one forward at a time, in the sender's order: the sender posts the
 * token rows, then calls ForwardExperts with (generation, seq) and no data;
 * the receiver takes the rows in seq order, computes, posts the output and
 * answers; the sender then takes the output.  Each direction has its own
 * communicator and stream, so that two nodes sending to each other never
 * wait on each other.  Any failure aborts the communicator (a dead peer
 * never hangs a stream) and the forward goes over gRPC; the sender makes a
 * new communicator (a new generation) after a pause.
 */
struct nccl_link {
    pthread_mutex_t out_lock; /* held across one outgoing forward */
    struct moe_nccl *out;
    /* Generations start at the clock in ns, so that a restarted sender's
     * are newer than those the peer saw before (unless the clock stepped
     * back: then its joins are dropped as stale until it catches up, or a
     * peer remove/add on the other node). */
    uint64_t out_gen, out_seq, retry_ns;
    int fails;               /* tries failed in a row: the pause doubles */
    _Atomic bool out_ready;  /* out is there (read without out_lock) */
    pthread_mutex_t in_lock; /* in, in_gen, in_seq, joining */
    pthread_cond_t in_cond;
    struct moe_nccl *in;
    uint64_t in_gen, in_seq; /* the last transfer taken */
    uint64_t in_post_ns;     /* when the last output was posted on in */
    bool joining;
    char remote[96];  /* the peer's NCCL, from its pings (peer lock) */
    char failed[200]; /* why the last try failed, "" once it works (peer lock) */
    _Atomic uint64_t calls, served, bytes;
};

#ifdef MOED_HAVE_NCCL
#endif

struct peer {
    char *name, *address;
    int refs;     /* views and calls using it; guarded by the cluster's lock */
    bool removed; /* no longer a member; freed when refs drops to 0 */
    _Atomic int state;
    struct moe_rpc_client_config cfg;
    pthread_mutex_t lock; /* idle, last_error */
    struct moe_rpc_client *idle[IDLE_CLIENTS];
    int n_idle;
    char last_error[200];
    /* Its hot experts, from its last answer to a ping (lock). */
    int n_hot;
    struct peer_hot {
        char model[128];
        uint32_t *experts;
        size_t n;
    } * hot;
    /* Relaxed counters: statistics read on their own. */
    _Atomic uint64_t rtt_ns, pings_failed, calls, calls_failed, tokens_sent, bytes_sent,
        bytes_received;
    struct nccl_link nl;
    /* Closes nl when the peer is freed: cluster_nccl.c's, set by the
     * membership once the peer is made (the peers know no NCCL). */
    void (*link_close)(struct nccl_link *l);
};

/* What this node measures and holds of one model. */
struct mstate {
    char name[128];
    int n_layers, n_experts;
    _Atomic uint32_t *load; /* [layer * E + expert]: token rows routed through here */
    uint8_t *hot;           /* measured hot here (guarded by the cluster's lock) */
    /* Hot here or at any peer that is up: replicated.  Written by the health
     * thread under the lock, read by requests without it: relaxed atomics
     * (a request may see the old or the new value of a byte, both valid). */
    _Atomic uint8_t *hot_all;
    uint8_t *held; /* this node held it under the last map it applied */
    uint8_t *drop; /* to evict at the next rebalance */
    struct mstate *next;
};

/* One item of a cluster work queue: run once, on one of its threads. */
struct cl_work {
    void (*run)(struct cl_work *w);
    struct cl_work *next; /* in the queue */
};

/*
 * A work queue with threads of its own (cluster_pool.c), started as needed
 * up to max_threads and kept until moed_cl_pool_free.  An item is queued
 * when a thread is idle for it or can be started, or else when fewer than
 * max_waiting wait beyond the idle threads; otherwise moed_cl_pool_post
 * refuses it (the caller keeps it).
 *
 * Three of them, each with threads of its own (sharing them could deadlock
 * nodes: parts here waiting for a peer whose rows over NCCL wait for a
 * thread busy with its own parts; split forwards waiting for their parts):
 * - the split forwards (struct split_pool), at most one thread per job;
 * - parts: the parts of split forwards (calls to peers), up to
 *   PART_THREADS, none waiting: a part that finds no thread free runs on
 *   its split forward's own thread, so a split forward never waits for
 *   another's parts;
 * - takes: the rows of Peer/ForwardExperts calls over NCCL, up to
 *   TAKE_THREADS, one per possible sender (a link's transfers go one at a
 *   time, in order, so more would only wait), TAKE_QUEUED waiting; beyond
 *   that a call is refused.
 */
#define PART_THREADS 64
#define TAKE_THREADS MOED_MAX_PEERS
#define TAKE_QUEUED (4 * MOED_MAX_PEERS)
struct cl_pool {
    pthread_mutex_t lock;         /* everything below */
    pthread_cond_t cond;          /* an item queued, or stopping */
    struct cl_work *head, *tail;  /* queued, oldest first */
    pthread_t *threads;           /* [max_threads], n_threads started */
    int max_threads, max_waiting; /* set by moed_cl_pool_init */
    int n_threads, idle, queued;
    bool stopping, inited;
};

/* A split forward waiting for, or running on, a thread of the pool. */
struct job {
    struct moed *d;
    struct moed_model *mm;
    struct moe_sched_req *r; /* the caller's */
    uint64_t t_queued;
    struct job *next; /* in the free list */
    struct cl_work work;
};

/* The split forwards in flight (queued or running): jobs[cap] bounds them,
 * beyond it moed_submit refuses; they run on q, a work queue (struct
 * cl_pool, above) of at most one thread per job. */
struct split_pool {
    pthread_mutex_t lock; /* free and in_flight */
    struct job *jobs;     /* [cap] */
    struct job *free;     /* jobs not in flight */
    int cap, in_flight;
    bool inited;
    struct cl_pool q;
};

/* A split forward's wait for its parts on the part pool. */
struct split_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int pending; /* parts handed over, not finished */
};

struct moed_cluster {
    struct moed *d;
    char node[128];
    pthread_mutex_t lock; /* peers, models' hot sets, version */
    pthread_cond_t cond;  /* wakes the health thread */
    struct peer *peers[MOED_MAX_PEERS];
    int n_peers;
    struct mstate *models;
    uint64_t version;
    bool stopping, kick;
    pthread_t thread;
    bool started;
    _Atomic int in_flight; /* split forwards and NCCL transfers served, running */
    struct split_pool split;
    struct cl_pool parts, takes; /* the work queues (struct cl_pool) */
    _Atomic uint64_t forwards, remote_calls, failovers, failover_local, tokens_remote, tokens_total,
        bytes_sent, bytes_received, nccl_fallbacks, strays_evicted;
    /* NCCL here: usable (built, on, a device), on which device, and what
     * this node tells its peers, or why not. */
    bool nccl_ok;
    int nccl_dev;
    char nccl_desc[96], nccl_why[200];
    _Atomic int nccl_joins; /* join threads running */
};

/* A consistent picture of the members for one request: sorted names,
 * peers referenced (NULL for this node). */
struct view {
    int n;
    int self;
    struct peer *peer[MAX_MEMBERS];
    const char *name[MAX_MEMBERS];
    uint64_t version;
};

static inline struct moed_cluster *cl_of(struct moed *d)
{
    return d->cluster;
}

/* cluster_peers.c */
extern const char *const moed_cl_peer_state_names[]; /* by enum peer_state */
void moed_cl_peer_hot_clear(struct peer *p);
void moed_cl_peer_free(struct peer *p);
struct peer *moed_cl_peer_new(struct moed *d, const char *name, const char *address);
void moed_cl_peer_put(struct moed_cluster *c, struct peer *p);
struct moe_rpc_client *moed_cl_client_get(struct peer *p, int timeout_ms, char *msg, size_t len);
void moed_cl_client_put(struct peer *p, struct moe_rpc_client *cl, bool keep);
void moed_cl_set_error(struct peer *p, const char *msg);
void moed_cl_view_get(struct moed_cluster *c, struct view *v);
void moed_cl_view_put(struct moed_cluster *c, struct view *v);
bool moed_cl_member_up(const struct view *v, int i);
struct mstate *moed_cl_mstate_get(struct moed_cluster *c, const struct moed_model *mm);
int moed_cl_holders(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                    int layer, int expert, int *ret);
int moed_cl_pick(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                 int layer, int expert, uint32_t salt, int not );
struct peer *moed_cl_peer_find(struct moed_cluster *c, const char *name);

/* cluster_pool.c */
/* 0, or -ENOMEM. */
int moed_cl_pool_init(struct cl_pool *p, int max_threads, int max_waiting);
/* 0: w runs on a thread of p; -EAGAIN: no thread will (w is the caller's). */
int moed_cl_pool_post(struct cl_pool *p, struct cl_work *w);
/* Runs what is queued, ends the threads.  An uninitialised p is fine. */
void moed_cl_pool_free(struct cl_pool *p);

/* cluster_forward.c */
int moed_cl_split_pool_init(struct moed_cluster *c, int cap, struct moe_error *err);
void moed_cl_split_pool_free(struct moed_cluster *c);

/* cluster_health.c */
void moed_cl_rebalance(struct moed_cluster *c);
void *moed_cl_health_main(void *arg);

/* cluster_nccl.c */
/* NCCL joins wait at most this long for the other rank. */
#define NCCL_JOIN_MS 20000
/* moed_cluster_stop waits at most this long for joins, then as long again
 * for communicators closing. */
#define MOED_NCCL_STOP_WAIT_MS (NCCL_JOIN_MS + 5000)
#ifdef MOED_HAVE_NCCL
extern _Atomic int moed_cl_nccl_closing; /* communicators being closed on threads of their own */
void moed_cl_nccl_close_async(struct moe_nccl *comm);
#endif
void moed_cl_nccl_link_close(struct nccl_link *l);
void moed_cl_nccl_state(const struct moed_cluster *c, struct peer *p, char *buf, size_t len);
#ifdef MOED_HAVE_NCCL
void moed_cl_nccl_maybe_connect(struct moed_cluster *c, struct peer *p);
#endif
void moed_cl_nccl_init(struct moed_cluster *c);

#endif
