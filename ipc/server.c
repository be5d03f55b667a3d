/*
 * The daemon's side of the shared-memory protocol (server.h).
 *
 * One poll thread owns the listening socket and every client socket: it
 * answers hellos (credentials, version, a new sealed memfd) and MODELS
 * queries, and notices hang-ups.  Each admitted session has a thread that
 * pops its submission ring, checks each descriptor and hands good ones to
 * the owner's forward callback; completions are pushed from whichever
 * thread finishes a request, under the session's lock (the lock makes the
 * daemon a single producer of the completion ring).  An error message goes
 * into the message table slot of its completion, written after the slot is
 * reserved and before the completion is published (shm.h).  A NOP costs the
 * session thread one uncontended lock and no clock read.
 *
 * A session is referenced by the poll thread (until it drops the socket),
 * by its own thread (until it has drained), and by each request in flight;
 * the last reference unmaps and frees it, so that a request finishing after
 * its client died still writes into memory the daemon holds.
 *
 * Back-pressure: a session thread pops a submission only while requests it
 * has taken and the client has not yet released from the completion ring
 * (requests in flight plus completions not yet read: every request taken
 * gets exactly one completion) are fewer than the completion ring holds, so
 * a completion never waits for the client.  The thread counts what it took
 * and re-reads the client's completion head only when that count says the
 * ring may be full, so that it does not pull the client's line every
 * request.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define POP_TIMEOUT_MS 250 /* an idle session thread re-checks for closing this often */
#define MAX_PENDING 64     /* connections that have not said hello yet */
#define MAX_PENDING_PER_UID 16 /* ... of them from one uid */
#define HELLO_NS (5ull * 1000000000ull) /* ... and how long they may take to */
#define MAX_REFUSED 16 /* strangers told why, waiting to read it */
#define REFUSED_NS (1000000000ull) /* ... for this long at most */
#define ACCEPT_PAUSE_MS 100             /* out of descriptors: stop accepting this long */

struct moe_shm_session {
    struct moe_shm_server *srv;
    int sock; /* owned by the poll thread */
    int memfd;
    uint8_t *map;
    uint64_t map_bytes;
    struct moe_shm_header *hdr;
    struct moe_ring sq, cq; /* sq: session thread only; cq: under lock */
    uint8_t *msgs;          /* the message table: cq.capacity * MOE_SHM_MSG bytes */
    uint8_t *arena;
    uint64_t arena_bytes;
    uint32_t id;
    uid_t uid;
    pid_t pid;
    char name[33];
    pthread_mutex_t lock; /* cq pushes (and the message table), refs */
    int refs;
    uint32_t taken;          /* session thread: submissions taken (mod 2^32) */
    uint32_t cq_head_seen;   /* session thread: the client's cq head as last read */
    _Atomic uint32_t posted; /* completions committed (mod 2^32); written under lock */
    /* Memory the daemon spends on the requests in flight (their fp32 input
     * and output), at most `budget`, so that a client cannot make moed
     * allocate without bound by naming the same arena bytes again and
     * again (lock; cond signalled as requests complete). */
    uint64_t in_flight_bytes, budget;
    pthread_cond_t cond;
    _Atomic int closing;
    struct moe_shm_model_info models[MOE_SHM_MAX_MODELS]; /* session thread only */
};

/* A client socket as the poll thread sees it: before its hello (session
 * NULL) or with its session; or a stranger (refused), already sent its
 * refusal, kept open a moment so that it can read it after its hello. */
struct conn {
    int fd;
    struct moe_shm_session *session;
    uint64_t t_accept; /* before the hello: it must come within HELLO_NS */
    uid_t uid;         /* SO_PEERCRED at accept */
    bool refused;      /* a stranger: closed at its first message or after REFUSED_NS */
};

struct moe_shm_server {
    struct moe_shm_server_config cfg;
    char *path; /* unlinked at stop when we bound it */
    int listen_fd;
    int wake_fd; /* eventfd: stop */
    int kick_fd; /* eventfd: a session closed itself; drop its socket */
    pthread_t poll_thread;
    _Atomic int stopping;
    char stop_reason[124];
    pthread_mutex_t lock; /* n_sessions */
    pthread_cond_t cond;
    int n_sessions; /* sessions not yet freed */
    uint32_t next_id;
    struct conn *conns;
    int n_conns, cap_conns;
    uint64_t accept_paused_until; /* out of descriptors: poll thread only */
    _Atomic uint64_t opened, closed, refused, requests, nops, bad, failed;
    _Atomic int open_now, in_flight;
};

static void msgf(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void msgf(char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (!msg || !len)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
}

/* ---- sessions -------------------------------------------------------------------------- */

static void session_put(struct moe_shm_session *ss)
{
    struct moe_shm_server *s = ss->srv;
    int refs;

    pthread_mutex_lock(&ss->lock);
    refs = --ss->refs;
    pthread_mutex_unlock(&ss->lock);
    if (refs)
        return;
    munmap(ss->map, ss->map_bytes);
    close(ss->memfd);
    pthread_cond_destroy(&ss->cond);
    pthread_mutex_destroy(&ss->lock);
    free(ss);
    atomic_fetch_add_explicit(&s->closed, 1, memory_order_relaxed);
    pthread_mutex_lock(&s->lock);
    s->n_sessions--;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* Ends the session (idempotent): no more submissions are taken, the client
 * sees CLOSED with reason and is woken. */
static void session_close(struct moe_shm_session *ss, const char *reason)
{
    int was = atomic_exchange(&ss->closing, 1);

    if (was)
        return;
    if (reason) {
        /* The reason is written before the state: the client reads state
         * with acquire, then the reason. */
        snprintf(ss->hdr->reason, sizeof(ss->hdr->reason), "%s", reason);
        atomic_store_explicit(&ss->hdr->state, MOE_SHM_CLOSED, memory_order_release);
    }
    moe_ring_wake_all(&ss->sq);
    moe_ring_wake_all(&ss->cq);
    /* The poll thread drops the socket, so that the client sees it close. */
    uint64_t one = 1;

    if (write(ss->srv->kick_fd, &one, sizeof(one)) < 0) {
        /* fails only when the counter would overflow: a kick is pending */
    }
}

/* Pushes a completion, with msg (may be NULL) in the message table; the
 * caller holds ss->lock.  A ring with no room (we keep room for every
 * request we took) means the client broke the ring. */
static void push_cqe(struct moe_shm_session *ss, struct moe_shm_cqe *c, const char *msg)
{
    int slot;

    if (atomic_load(&ss->closing) && atomic_load(&ss->hdr->state) == MOE_SHM_CLOSED)
        return; /* nobody reads it; the ring may be garbage */
    slot = moe_ring_reserve(&ss->cq, 0);
    if (slot < 0) {
        session_close(ss, "the client corrupted its completion ring");
        return;
    }
    c->msg_len = 0;
    if (msg && *msg) {
        char *dst = (char *)ss->msgs + (size_t)slot * MOE_SHM_MSG;
        size_t n = strnlen(msg, MOE_SHM_MSG - 1);

        /* Before the commit: its release store publishes these bytes too. */
        memcpy(dst, msg, n);
        dst[n] = 0;
        c->msg_len = (uint32_t)n;
    }
    /* Counted before the commit, so that a client that takes the
     * completion at once is never seen ahead of it.  Release: pairs with
     * the session thread's acquire in has_room. */
    atomic_store_explicit(&ss->posted, atomic_load_explicit(&ss->posted, memory_order_relaxed) + 1,
                          memory_order_release);
    moe_ring_commit(&ss->cq, c);
}

/* Completes a request the session thread answers itself; t_seen 0: a NOP,
 * answered at once (total_ns 0, no clock read). */
static void complete_now(struct moe_shm_session *ss, uint64_t tag, int status, const char *msg,
                         uint64_t t_seen)
{
    struct moe_shm_cqe c = {.tag = tag, .status = status};

    if (t_seen)
        c.total_ns = moe_ring_now_ns() - t_seen;
    pthread_mutex_lock(&ss->lock);
    push_cqe(ss, &c, msg);
    pthread_mutex_unlock(&ss->lock);
}

void moe_shm_complete(struct moe_shm_req *req, int status, const struct moe_shm_cqe *counters,
                      const char *msg)
{
    struct moe_shm_session *ss = req->session;
    struct moe_shm_server *s = ss->srv;
    struct moe_shm_cqe c = {0};

    if (counters)
        c = *counters;
    c.tag = req->sqe.tag;
    c.status = status;
    c.total_ns = moe_ring_now_ns() - req->t_seen;
    if (status < 0)
        atomic_fetch_add_explicit(&s->failed, 1, memory_order_relaxed);
    pthread_mutex_lock(&ss->lock);
    push_cqe(ss, &c, msg);
    ss->in_flight_bytes -= req->cost_;
    /* Under the lock, with the bytes: the count never shows a request
     * admitted in this one's room before this one has left. */
    atomic_fetch_sub_explicit(&s->in_flight, 1, memory_order_relaxed);
    pthread_cond_signal(&ss->cond);
    pthread_mutex_unlock(&ss->lock);
    free(req);
    session_put(ss);
}

/* Room for one more request (session thread): requests taken and not yet
 * released by the client from the completion ring fewer than it holds.
 * 1, 0, or -EPROTO when the client's head is out of range. */
static int has_room(struct moe_shm_session *ss)
{
    uint32_t head;

    if (ss->taken - ss->cq_head_seen < ss->cq.capacity)
        return 1;
    /* Acquire: pairs with the client's release of the slots it took, which
     * follows its acquire of their commits, which follow posted's store:
     * so the posted read below is at least what the client has seen. */
    head = atomic_load_explicit(&ss->cq.ctl->head, memory_order_acquire);
    /* The client cannot have taken more completions than were posted (a
     * head ahead of them would open room that is not there), nor fall more
     * than the ring behind the requests taken. */
    if ((int32_t)(head - atomic_load_explicit(&ss->posted, memory_order_acquire)) > 0 ||
        ss->taken - head > ss->cq.capacity)
        return -EPROTO;
    ss->cq_head_seen = head;
    return ss->taken - head < ss->cq.capacity;
}

static void serve_one(struct moe_shm_session *ss, const struct moe_shm_sqe *q)
{
    struct moe_shm_server *s = ss->srv;
    struct moe_shm_req *req;
    char msg[MOE_SHM_MSG];
    uint64_t t_seen;
    int n, idx, rc;

    if (q->opcode == MOE_SHM_NOP) {
        atomic_fetch_add_explicit(&s->nops, 1, memory_order_relaxed);
        complete_now(ss, q->tag, 0, NULL, 0);
        return;
    }
    t_seen = moe_ring_now_ns();
    atomic_fetch_add_explicit(&s->requests, 1, memory_order_relaxed);
    n = s->cfg.models(s->cfg.arg, ss->models, MOE_SHM_MAX_MODELS);
    if (n < 0)
        n = 0;
    rc = moe_shm_check_sqe(q, ss->arena_bytes, ss->models, n, &idx, msg, sizeof(msg));
    if (rc < 0) {
        atomic_fetch_add_explicit(&s->bad, 1, memory_order_relaxed);
        complete_now(ss, q->tag, rc, msg, t_seen);
        return;
    }
    req = calloc(1, sizeof(*req));
    if (!req) {
        complete_now(ss, q->tag, -ENOMEM, "moed is out of memory", t_seen);
        return;
    }
    req->session = ss;
    req->sqe = *q;
    req->model = ss->models[idx];
    req->in = ss->arena + q->in_off;
    req->out = ss->arena + q->out_off;
    if (q->flags & MOE_SHM_F_ROUTING) {
        req->ids = (const int32_t *)(ss->arena + q->ids_off);
        req->weights = (const float *)(ss->arena + q->weights_off);
    }
    req->t_seen = t_seen;
    /* fp32 copies of the input and the output, whatever the wire dtype. */
    req->cost_ = 8ull * q->n_tokens * ss->models[idx].hidden;
    pthread_mutex_lock(&ss->lock);
    /* Over budget: wait for requests of this session to finish (alone, a
     * request always fits: the arena bounds it). */
    while (ss->in_flight_bytes && ss->in_flight_bytes + req->cost_ > ss->budget &&
           !atomic_load(&ss->closing)) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&ss->cond, &ss->lock, &ts);
    }
    ss->in_flight_bytes += req->cost_;
    ss->refs++;
    atomic_fetch_add_explicit(&s->in_flight, 1, memory_order_relaxed);
    pthread_mutex_unlock(&ss->lock);
    msg[0] = 0;
    rc = s->cfg.forward(s->cfg.arg, req, msg, sizeof(msg));
    if (rc < 0)
        moe_shm_complete(req, rc, NULL, msg[0] ? msg : strerror(-rc));
}

static void *session_main(void *arg)
{
    struct moe_shm_session *ss = arg;
    struct moe_shm_sqe q;
    int rc, backoff_us = 50;

    while (!atomic_load(&ss->closing)) {
        rc = has_room(ss);
        if (rc < 0) {
            session_close(ss, "the client corrupted its completion ring");
            break;
        }
        if (rc == 0) {
            /* The client is not taking its completions: wait for it, more
             * patiently the longer it takes (a hung client costs little). */
            usleep((useconds_t)backoff_us);
            if (backoff_us < 20000)
                backoff_us *= 2;
            continue;
        }
        backoff_us = 50;
        rc = moe_ring_pop(&ss->sq, &q, POP_TIMEOUT_MS);
        if (rc == -ETIMEDOUT || rc == -EAGAIN)
            continue;
        if (rc < 0) {
            session_close(ss, "the client corrupted its submission ring");
            break;
        }
        ss->taken++;
        serve_one(ss, &q);
    }
    /* Requests in flight hold their own references. */
    session_put(ss);
    return NULL;
}

/* ---- handshake -------------------------------------------------------------------------- */

static bool allowed(const struct moe_shm_server *s, uid_t uid, gid_t gid)
{
    if (uid == 0 || uid == geteuid())
        return true;
    for (int i = 0; i < s->cfg.n_allow_uids; i++)
        if (s->cfg.allow_uids[i] == uid)
            return true;
    for (int i = 0; i < s->cfg.n_allow_gids; i++)
        if (s->cfg.allow_gids[i] == gid)
            return true;
    return false;
}

static int send_welcome(int fd, int status, const struct moe_shm_session *ss, int memfd,
                        const char *msg)
{
    struct moe_shm_welcome w = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION};
    struct iovec iov = {&w, sizeof(w)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    struct cmsghdr *cm;

    w.status = status;
    if (ss) {
        w.mapping_bytes = ss->map_bytes;
        w.session = ss->id;
    }
    snprintf(w.msg, sizeof(w.msg), "%s", msg ? msg : "");
    if (memfd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &memfd, sizeof(int));
    }
    return sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t)sizeof(w) ? 0 : -errno;
}

/* Makes the session's memfd and mapping; 0 or -errno with msg. */
static int session_create(struct moe_shm_server *s, const struct moe_shm_hello *h,
                          const struct ucred *cr, struct moe_shm_session **ret, char *msg,
                          size_t len)
{
    struct moe_shm_layout l;
    struct moe_shm_session *ss;
    char name[64];
    int rc;

    rc = moe_shm_layout(h->sq_entries, h->cq_entries, h->arena_bytes, s->cfg.max_arena_bytes, &l,
                        msg, len);
    if (rc < 0)
        return rc;
    ss = calloc(1, sizeof(*ss));
    if (!ss)
        return msgf(msg, len, "moed is out of memory"), -ENOMEM;
    ss->srv = s;
    ss->memfd = -1;
    ss->sock = -1;
    ss->id = ++s->next_id;
    ss->uid = cr->uid;
    ss->pid = cr->pid;
    memcpy(ss->name, h->name, sizeof(h->name));
    ss->name[sizeof(h->name)] = 0;
    snprintf(name, sizeof(name), "moed-session-%u", ss->id);
    ss->memfd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (ss->memfd < 0 || ftruncate(ss->memfd, (off_t)l.mapping_bytes) < 0) {
        rc = -errno;
        msgf(msg, len, "moed cannot make a %llu-byte session: %s",
             (unsigned long long)l.mapping_bytes, strerror(-rc));
        goto fail;
    }
    ss->map = mmap(NULL, l.mapping_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ss->memfd, 0);
    if (ss->map == MAP_FAILED) {
        rc = -errno;
        ss->map = NULL;
        msgf(msg, len, "moed cannot map a %llu-byte session: %s",
             (unsigned long long)l.mapping_bytes, strerror(-rc));
        goto fail;
    }
    ss->map_bytes = l.mapping_bytes;
    rc = moe_shm_init(ss->map, &l, ss->id);
    if (rc == 0)
        rc = moe_shm_attach(ss->map, l.mapping_bytes, &ss->sq, &ss->cq, NULL, msg, len);
    if (rc < 0)
        goto fail;
    /* The size is fixed for good: a client cannot shrink it under us (a
     * SIGBUS in the daemon) or grow it. */
    if (fcntl(ss->memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        rc = -errno;
        msgf(msg, len, "moed cannot seal the session: %s", strerror(-rc));
        goto fail;
    }
    ss->hdr = (struct moe_shm_header *)ss->map;
    ss->msgs = ss->map + l.msg_offset;
    ss->arena = ss->map + l.arena_offset;
    ss->arena_bytes = l.arena_bytes;
    ss->budget = s->cfg.session_budget_bytes;
    if (!ss->budget)
        ss->budget = 4 * l.arena_bytes > (64ull << 20) ? 4 * l.arena_bytes : 64ull << 20;
    pthread_mutex_init(&ss->lock, NULL);
    pthread_cond_init(&ss->cond, NULL);
    *ret = ss;
    return 0;
fail:
    if (ss->map)
        munmap(ss->map, l.mapping_bytes);
    if (ss->memfd >= 0)
        close(ss->memfd);
    free(ss);
    return rc;
}

/* Handles the first message of a connection.  Returns the session, or NULL
 * when the connection is to be closed. */
static struct moe_shm_session *handshake(struct moe_shm_server *s, int fd)
{
    uint8_t buf[sizeof(struct moe_shm_hello)];
    struct moe_shm_layout l;
    struct moe_shm_hello h;
    struct ucred cr;
    socklen_t crl = sizeof(cr);
    struct moe_shm_session *ss = NULL;
    char msg[200];
    ssize_t n;
    int rc, active;
    pthread_t t;

    /* MSG_TRUNC: n is the message's real length, so a longer one is seen. */
    n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT | MSG_TRUNC);
    if (n <= 0)
        return NULL;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &crl) < 0)
        return NULL;
    rc = moe_shm_hello_check(buf, (size_t)n, s->cfg.max_arena_bytes, &h, &l, msg, sizeof(msg));
    if (rc == -EPROTO || rc == -EPROTONOSUPPORT) {
        atomic_fetch_add(&s->refused, 1);
        send_welcome(fd, rc, NULL, -1, msg);
        return NULL;
    }
    if (!allowed(s, cr.uid, cr.gid)) {
        atomic_fetch_add(&s->refused, 1);
        snprintf(msg, sizeof(msg),
                 "uid %u (gid %u) is not allowed to use moed's shared-memory socket: add it "
                 "to shm_allow_users or shm_allow_groups",
                 (unsigned)cr.uid, (unsigned)cr.gid);
        send_welcome(fd, -EACCES, NULL, -1, msg);
        return NULL;
    }
    pthread_mutex_lock(&s->lock);
    active = s->n_sessions;
    pthread_mutex_unlock(&s->lock);
    if (active >= s->cfg.max_sessions) {
        atomic_fetch_add(&s->refused, 1);
        snprintf(msg, sizeof(msg), "moed has %d sessions, its limit: try again later", active);
        send_welcome(fd, -EUSERS, NULL, -1, msg);
        return NULL;
    }
    rc = session_create(s, &h, &cr, &ss, msg, sizeof(msg));
    if (rc < 0) {
        send_welcome(fd, rc, NULL, -1, msg);
        return NULL;
    }
    ss->sock = fd;
    ss->refs = 2; /* the poll thread's and the session thread's */
    pthread_mutex_lock(&s->lock);
    s->n_sessions++;
    pthread_mutex_unlock(&s->lock);
    if (send_welcome(fd, 0, ss, ss->memfd, NULL) < 0 ||
        pthread_create(&t, NULL, session_main, ss) != 0) {
        atomic_store(&ss->closing, 1);
        ss->refs = 1;
        session_put(ss);
        return NULL;
    }
    pthread_detach(t);
    atomic_fetch_add(&s->opened, 1);
    atomic_fetch_add(&s->open_now, 1);
    return ss;
}

/* Answers a MODELS query.  false: close the connection. */
/* Answers a MODELS query.  NULL, or why the connection is to be closed. */
static const char *on_message(struct moe_shm_server *s, int fd)
{
    struct moe_shm_msg m;
    struct {
        struct moe_shm_models h;
        struct moe_shm_model_info info[MOE_SHM_MAX_MODELS];
    } * ans;
    ssize_t n = recv(fd, &m, sizeof(m), MSG_DONTWAIT | MSG_TRUNC);
    int k;
    bool ok;

    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return NULL;
    if (n <= 0)
        return "the client hung up";
    if (n != (ssize_t)sizeof(m) || m.op != MOE_SHM_OP_MODELS)
        return "the client sent a message moed does not know";
    ans = calloc(1, sizeof(*ans));
    if (!ans)
        return "moed is out of memory";
    k = s->cfg.models(s->cfg.arg, ans->info, MOE_SHM_MAX_MODELS);
    if (k < 0)
        k = 0;
    ans->h.op = MOE_SHM_OP_MODELS;
    ans->h.n = (uint32_t)k;
    n = (ssize_t)(sizeof(ans->h) + (size_t)k * sizeof(ans->info[0]));
    ok = send(fd, ans, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT) == n;
    free(ans);
    return ok ? NULL : "the client does not read moed's answers";
}

/* ---- the poll thread ------------------------------------------------------------------- */

static void drop_conn(struct moe_shm_server *s, int i, const char *reason)
{
    struct conn c = s->conns[i];

    s->conns[i] = s->conns[--s->n_conns];
    if (c.session) {
        session_close(c.session, reason);
        atomic_fetch_sub(&s->open_now, 1);
        session_put(c.session);
    }
    close(c.fd);
}

/* Closes the oldest connection for which pick(c) holds; false if none. */
static bool drop_oldest(struct moe_shm_server *s, bool (*pick)(const struct conn *, uid_t), uid_t uid)
{
    int old = -1;

    for (int i = 0; i < s->n_conns; i++)
        if (pick(&s->conns[i], uid) && (old < 0 || s->conns[i].t_accept < s->conns[old].t_accept))
            old = i;
    if (old < 0)
        return false;
    drop_conn(s, old, NULL);
    return true;
}

static bool is_refused(const struct conn *c, uid_t uid)
{
    (void)uid;
    return c->refused;
}

static bool is_pending_of(const struct conn *c, uid_t uid)
{
    return !c->session && !c->refused && c->uid == uid;
}

/*
 * Admission at accept, before any byte is read: the peer's credentials
 * decide.  A stranger (not on the allow-list) is sent its refusal at once
 * and never counts against anyone: at most MAX_REFUSED of them wait (the
 * oldest is closed for a new one) for their hello, to be closed then, so
 * that the client library reads why.  An admitted peer always gets in: at
 * MAX_PENDING_PER_UID silent connections of its uid the oldest of them is
 * closed, and at MAX_PENDING in all the oldest of the uid with the most;
 * so silent connections cost their own uid's, never another's, and a
 * client that says hello at once (as libmoe-client does) is never turned
 * away by them.
 */
static void accept_one(struct moe_shm_server *s)
{
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK), pending = 0,
        mine = 0, refused = 0;
    struct ucred cr;
    socklen_t crl = sizeof(cr);
    struct conn *nc;
    bool stranger;

    if (fd < 0) {
        /* Out of descriptors: the listening socket stays readable; polling
         * it again at once would spin.  Pause accepting a little. */
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
            s->accept_paused_until = moe_ring_now_ns() + ACCEPT_PAUSE_MS * 1000000ull;
        return;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &crl) < 0) {
        close(fd);
        return;
    }
    stranger = !allowed(s, cr.uid, cr.gid);
    if (stranger) {
        char msg[200];

        atomic_fetch_add(&s->refused, 1);
        snprintf(msg, sizeof(msg),
                 "uid %u (gid %u) is not allowed to use moed's shared-memory socket: add it "
                 "to shm_allow_users or shm_allow_groups",
                 (unsigned)cr.uid, (unsigned)cr.gid);
        if (send_welcome(fd, -EACCES, NULL, -1, msg) < 0) {
            close(fd);
            return;
        }
    }
    for (int i = 0; i < s->n_conns; i++) {
        const struct conn *c = &s->conns[i];

        refused += c->refused;
        pending += !c->session && !c->refused;
        mine += is_pending_of(c, cr.uid);
    }
    if (stranger && refused >= MAX_REFUSED)
        drop_oldest(s, is_refused, 0);
    if (!stranger && mine >= MAX_PENDING_PER_UID) {
        drop_oldest(s, is_pending_of, cr.uid);
    } else if (!stranger && pending >= MAX_PENDING) {
        /* The uid with the most silent connections gives one up. */
        uid_t most = cr.uid;
        int n_most = 0;

        for (int i = 0; i < s->n_conns; i++) {
            int n = 0;

            if (s->conns[i].session || s->conns[i].refused)
                continue;
            for (int k = 0; k < s->n_conns; k++)
                n += is_pending_of(&s->conns[k], s->conns[i].uid);
            if (n > n_most) {
                n_most = n;
                most = s->conns[i].uid;
            }
        }
        drop_oldest(s, is_pending_of, most);
    }
    if (s->n_conns == s->cap_conns) {
        nc = realloc(s->conns, sizeof(*nc) * (size_t)(s->cap_conns ? 2 * s->cap_conns : 16));
        if (!nc) {
            close(fd);
            return;
        }
        s->conns = nc;
        s->cap_conns = s->cap_conns ? 2 * s->cap_conns : 16;
    }
    s->conns[s->n_conns++] = (struct conn){fd, NULL, moe_ring_now_ns(), cr.uid, stranger};
}

static void *poll_main(void *arg)
{
    struct moe_shm_server *s = arg;
    struct pollfd *pf = NULL;
    int cap = 0;

    while (!atomic_load(&s->stopping)) {
        int n = s->n_conns + 3, i, timeout = -1;
        uint64_t v, now = moe_ring_now_ns();

        if (n > cap) {
            struct pollfd *np = realloc(pf, sizeof(*pf) * (size_t)n * 2);

            if (!np) {
                usleep(10000);
                continue;
            }
            pf = np;
            cap = n * 2;
        }
        pf[0] = (struct pollfd){s->wake_fd, POLLIN, 0};
        pf[1] = (struct pollfd){s->listen_fd, now < s->accept_paused_until ? 0 : POLLIN, 0};
        if (now < s->accept_paused_until)
            timeout = ACCEPT_PAUSE_MS;
        pf[2] = (struct pollfd){s->kick_fd, POLLIN, 0};
        for (i = 0; i < s->n_conns; i++) {
            pf[i + 3] = (struct pollfd){s->conns[i].fd, POLLIN, 0};
            if (!s->conns[i].session)
                timeout = 1000; /* to drop the ones that never say hello */
        }
        if (poll(pf, (nfds_t)n, timeout) < 0)
            continue;
        now = moe_ring_now_ns();
        if (pf[0].revents)
            break;
        if (pf[2].revents && read(s->kick_fd, &v, sizeof(v)) < 0) {
            /* EAGAIN: another read took it */
        }
        /* Backwards: drop_conn moves the last connection into slot i. */
        for (i = n - 4; i >= 0; i--) {
            struct conn *c = &s->conns[i];
            short ev = pf[i + 3].revents;

            if (c->session && atomic_load(&c->session->closing)) {
                drop_conn(s, i, NULL);
                continue;
            }
            if (c->refused && (ev || now - c->t_accept > REFUSED_NS)) {
                struct moe_shm_hello h;

                /* Read its hello first: closing a socket with unread data
                 * resets the peer, which would lose the refusal unread. */
                for (int k = 0; k < 4 && recv(c->fd, &h, sizeof(h), MSG_DONTWAIT) > 0; k++)
                    ;
                drop_conn(s, i, NULL); /* a stranger, told why at accept */
                continue;
            }
            if (!c->session && !ev && now - c->t_accept > HELLO_NS) {
                drop_conn(s, i, NULL); /* connected and said nothing */
                continue;
            }
            if (!ev)
                continue;
            if (ev & (POLLHUP | POLLERR | POLLNVAL)) {
                drop_conn(s, i, "the client hung up");
                continue;
            }
            if (!c->session) {
                c->session = handshake(s, c->fd);
                if (!c->session)
                    drop_conn(s, i, NULL);
            } else {
                const char *why = on_message(s, c->fd);

                if (why)
                    drop_conn(s, i, why);
            }
        }
        if (pf[1].revents & POLLIN)
            accept_one(s);
    }
    free(pf);
    /* Acquire: pairs with the store in moe_shm_server_stop, after which it
     * wrote stop_reason; the eventfd that woke us orders nothing for the
     * language. */
    while (!atomic_load_explicit(&s->stopping, memory_order_acquire))
        ;
    while (s->n_conns)
        drop_conn(s, s->n_conns - 1, s->stop_reason);
    return NULL;
}

/* ---- start and stop -------------------------------------------------------------------- */

static int bind_socket(struct moe_shm_server *s, char *err, size_t len)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, rc;

    if (strlen(s->cfg.path) >= sizeof(a.sun_path)) {
        msgf(err, len, "shared-memory socket path '%s' is longer than %zu bytes", s->cfg.path,
             sizeof(a.sun_path) - 1);
        return -ENAMETOOLONG;
    }
    memcpy(a.sun_path, s->cfg.path, strlen(s->cfg.path));
    /* A socket file left by a daemon that died is replaced; anything else
     * at that path is not ours to remove. */
    if (lstat(s->cfg.path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            msgf(err, len, "shared-memory socket path '%s' exists and is not a socket",
                 s->cfg.path);
            return -EEXIST;
        }
        unlink(s->cfg.path);
    }
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        chmod(s->cfg.path, s->cfg.mode ? s->cfg.mode : 0660) < 0 || listen(fd, 128) < 0) {
        rc = -errno;
        msgf(err, len, "shared-memory socket '%s': %s", s->cfg.path, strerror(-rc));
        if (fd >= 0)
            close(fd);
        return rc;
    }
    s->listen_fd = fd;
    s->path = strdup(s->cfg.path);
    return 0;
}

int moe_shm_server_start(const struct moe_shm_server_config *cfg, struct moe_shm_server **ret,
                         char *err, size_t len)
{
    struct moe_shm_server *s;
    int rc;

    if (!cfg || !cfg->models || !cfg->forward || (!cfg->path && cfg->listen_fd < 0)) {
        msgf(err, len, "shared-memory server: a socket path and both callbacks are needed");
        return -EINVAL;
    }
    s = calloc(1, sizeof(*s));
    if (!s)
        return msgf(err, len, "out of memory"), -ENOMEM;
    s->cfg = *cfg;
    if (!s->cfg.max_arena_bytes)
        s->cfg.max_arena_bytes = 1ull << 30;
    if (!s->cfg.max_sessions)
        s->cfg.max_sessions = 256;
    s->listen_fd = -1;
    s->wake_fd = s->kick_fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    snprintf(s->stop_reason, sizeof(s->stop_reason), "moed stopped");
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake_fd < 0 || s->kick_fd < 0) {
        rc = -errno;
        msgf(err, len, "eventfd: %s", strerror(-rc));
        goto fail;
    }
    if (cfg->listen_fd >= 0) {
        s->listen_fd = cfg->listen_fd;
        fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
    } else if ((rc = bind_socket(s, err, len)) < 0) {
        goto fail;
    }
    if (pthread_create(&s->poll_thread, NULL, poll_main, s) != 0) {
        rc = -EAGAIN;
        msgf(err, len, "cannot start the shared-memory server's thread");
        goto fail;
    }
    *ret = s;
    return 0;
fail:
    if (s->path) {
        unlink(s->path);
        free(s->path);
    }
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    if (s->kick_fd >= 0)
        close(s->kick_fd);
    free(s);
    return rc;
}

void moe_shm_server_stop(struct moe_shm_server *s, const char *reason)
{
    uint64_t one = 1;

    if (!s)
        return;
    if (reason)
        snprintf(s->stop_reason, sizeof(s->stop_reason), "%s", reason);
    atomic_store(&s->stopping, 1);
    if (write(s->wake_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write fails only on overflow: it is awake anyway */
    }
    pthread_join(s->poll_thread, NULL);
    /* Every session is closing; each frees itself once its thread and its
     * requests in flight are done. */
    pthread_mutex_lock(&s->lock);
    while (s->n_sessions)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
    close(s->listen_fd);
    if (s->path) {
        unlink(s->path);
        free(s->path);
    }
    close(s->wake_fd);
    close(s->kick_fd);
    free(s->conns);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

void moe_shm_server_get_stats(struct moe_shm_server *s, struct moe_shm_server_stats *ret)
{
    memset(ret, 0, sizeof(*ret));
    if (!s)
        return;
    ret->sessions_opened = atomic_load_explicit(&s->opened, memory_order_relaxed);
    ret->sessions_closed = atomic_load_explicit(&s->closed, memory_order_relaxed);
    ret->refused = atomic_load_explicit(&s->refused, memory_order_relaxed);
    ret->requests = atomic_load_explicit(&s->requests, memory_order_relaxed);
    ret->nops = atomic_load_explicit(&s->nops, memory_order_relaxed);
    ret->bad_requests = atomic_load_explicit(&s->bad, memory_order_relaxed);
    ret->failed = atomic_load_explicit(&s->failed, memory_order_relaxed);
    ret->sessions = atomic_load_explicit(&s->open_now, memory_order_relaxed);
    ret->in_flight = atomic_load_explicit(&s->in_flight, memory_order_relaxed);
}
