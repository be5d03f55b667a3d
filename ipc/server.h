/*
 * The daemon's side of the shared-memory protocol (shm.h): listens on a Unix
 * socket, admits clients by their credentials, gives each a sealed memfd
 * session, and serves its submission ring.  It knows nothing of the engine:
 * a request that passes moe_shm_check_sqe is handed to the owner's forward
 * callback, which computes it (moed joins it to the scheduler's batches) and
 * later calls moe_shm_complete.
 *
 * Threads: one thread polls the listening socket and every session's socket
 * (handshakes, MODELS queries, hang-ups); each session has a thread that
 * pops its submission ring (spinning briefly, then sleeping on the ring's
 * futex).  forward is called on a session's thread; moe_shm_complete may
 * be called from any thread.
 *
 * A session ends when its socket closes (the client exited or died), when
 * it breaks the protocol (corrupt ring counters), or when the server stops.
 * Its requests still being computed finish first (their output is written
 * to a mapping the server still holds), then the memfd is unmapped and
 * closed.  Nothing a client writes in shared memory is trusted.
 */
#ifndef MOED_IPC_SERVER_H
#define MOED_IPC_SERVER_H

#include "shm.h"

#include <stdbool.h>
#include <sys/types.h>

struct moe_shm_server;
struct moe_shm_session;

/* A checked forward request.  Buffers point into the session's mapping and
 * may change under the reader (the client owns them): copy the input before
 * use.  Valid until moe_shm_complete(req). */
struct moe_shm_req {
    struct moe_shm_session *session;
    struct moe_shm_sqe sqe;          /* the copy that was checked */
    struct moe_shm_model_info model; /* the model as checked */
    const void *in;                  /* [n_tokens, hidden] of sqe.dtype */
    void *out;
    const int32_t *ids; /* F_ROUTING, else NULL */
    const float *weights;
    uint64_t t_seen; /* CLOCK_MONOTONIC ns when popped */
    void *owner;     /* free for the forward callback */
    uint64_t cost_;  /* private: memory it counts against its session's budget */
};

struct moe_shm_server_config {
    const char *path; /* socket path; an existing socket file there is replaced */
    mode_t mode;      /* of the socket file (0: 0660) */
    /* Admitted peers: uid in allow_uids or gid (primary) in allow_gids.
     * Root and the daemon's own uid are always admitted. */
    const uid_t *allow_uids;
    int n_allow_uids;
    const gid_t *allow_gids;
    int n_allow_gids;
    uint64_t max_arena_bytes; /* per session (0: 1 GiB) */
    /* fp32 memory a session's requests in flight may take in the daemon
     * (0: 4 x its arena, at least 64 MiB); beyond it, the session waits. */
    uint64_t session_budget_bytes;
    int max_sessions;         /* 0: 256 */
    int listen_fd;            /* >= 0: an already bound, listening SOCK_SEQPACKET socket;
                               * the server owns it from then on (closes it at stop) */

    /* Fills models (at most max) with what is loaded; returns how many.
     * Called for each MODELS query and before each submission is checked
     * (so keep it cheap: moed copies from a table it keeps current). */
    int (*models)(void *arg, struct moe_shm_model_info *models, int max);
    /* Starts computing req; returns 0 (moe_shm_complete comes later, from
     * any thread) or -errno with msg (the server completes it with that). */
    int (*forward)(void *arg, struct moe_shm_req *req, char *msg, size_t len);
    void *arg;
};

struct moe_shm_server_stats {
    uint64_t sessions_opened, sessions_closed, refused; /* refused: credentials or version */
    uint64_t requests, nops, bad_requests, failed;
    int sessions; /* open now */
    int in_flight;
};

/* Binds (unless listen_fd is given) and starts the threads.  0 or -errno
 * with err. */
int moe_shm_server_start(const struct moe_shm_server_config *cfg, struct moe_shm_server **ret,
                         char *err, size_t len);

/* Stops admitting, marks every session CLOSED with reason, wakes its client,
 * waits for requests in flight (forward callbacks already made complete
 * normally), frees everything, unlinks the socket it bound. */
void moe_shm_server_stop(struct moe_shm_server *s, const char *reason);

/* Completes req with status (0 or -errno) and msg (may be NULL); fills
 * counters from cqe (tag and status are set here).  Frees req. */
void moe_shm_complete(struct moe_shm_req *req, int status, const struct moe_shm_cqe *counters,
                      const char *msg);

void moe_shm_server_get_stats(struct moe_shm_server *s, struct moe_shm_server_stats *ret);

#endif
