/*
 * libmoe-client (moe_client.h): a session with moed over its shared-memory
 * protocol (ipc/shm.h), on the SPSC rings of ipc/ring.c.
 *
 * A session owns: the socket (open for the session's life: moed reclaims
 * everything when it closes), the mapping of moed's memfd (header, rings,
 * arena), a private first-fit allocator over the arena, a table of the
 * requests in flight and a small queue of completions that moe_forward
 * popped for other requests.  No locks: a session is used by one thread at
 * a time (the header says so); this file keeps no global state except the
 * thread-local text of the last moe_connect failure.
 *
 * Requests in flight: each takes a slot of a table of cq_entries slots; the
 * tag moed sees is (sequence << 32 | slot), mapped back to the caller's tag
 * when the completion is popped, so that moe_forward finds its own
 * completion whatever tags the caller uses and a completion moed makes up
 * cannot free another request's slot.  Slots in use plus completions queued
 * by moe_forward never exceed cq_entries, the most moed keeps outstanding
 * for a session (shm.h), so moed never has to wait to post a completion and
 * the private queue never overflows.
 *
 * Completions: each is peeked out of the completion ring, its message (if
 * any) copied out of the message table slot of the same index, and only
 * then is the slot released (shm.h), so moed cannot overwrite a message
 * before it is read.
 *
 * Trust: the client relies on moed for its results, but not for memory
 * safety: the header is checked by moe_shm_attach, the rings' counters and
 * sequence words by ring.c, every string from moed is bounded (a message by
 * MOE_SHM_MSG whatever its length claims), the memfd must be sealed
 * against shrinking (so that the mapping can never SIGBUS), counts are
 * checked against the bytes received.
 *
 * Liveness: moed may stop, crash or drop the session while the client
 * sleeps on the completion ring's futex; the futex would never be woken, so
 * waits sleep in slices of WAIT_SLICE_MS and, between slices, look at the
 * header's state word and at the socket (EOF or hang-up: moed is gone).
 * After that every call returns -ECONNRESET.
 *
 * Functions return 0 (or a count) or -errno, with s->err saying why.
 */
#include "moe_client.h"

#include "ring.h"
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

_Static_assert((int)MOE_F32 == (int)MOE_SHM_DTYPE_F32 && (int)MOE_F16 == (int)MOE_SHM_DTYPE_F16 &&
                   (int)MOE_BF16 == (int)MOE_SHM_DTYPE_BF16,
               "public dtypes are the protocol's");
_Static_assert((int)MOE_OP_NOP == (int)MOE_SHM_NOP && (int)MOE_OP_FORWARD == (int)MOE_SHM_FORWARD,
               "public opcodes are the protocol's");
_Static_assert(MOE_CLIENT_VERSION == MOE_SHM_VERSION, "the header names the protocol version");
_Static_assert(sizeof(((struct moe_completion *)0)->msg) == MOE_SHM_MSG, "completion message");
_Static_assert(sizeof(((struct moe_model_info *)0)->moe_layer) == MOE_SHM_MAX_LAYERS / 8,
               "MoE layer bitmap");
_Static_assert(sizeof(((struct moe_model_info *)0)->name) == MOE_SHM_NAME, "model name");
_Static_assert(MOE_MAX_MODELS == MOE_SHM_MAX_MODELS, "model count");

#define WAIT_SLICE_MS 50         /* longest sleep between liveness checks */
#define POLL_CHECK_NS 1000000ull /* spinning: liveness checked every 1 ms */
#define HANDSHAKE_MS 10000       /* answer to the hello */
#define QUERY_MS 5000            /* answer to a MODELS query */
#define ARENA_GRAIN 64u

/* A range of the arena, in bytes from its start. */
struct extent {
    uint64_t off, len;
};

/* A request in flight. */
struct slot {
    uint64_t tag; /* the caller's */
    uint32_t seq; /* upper half of the tag moed sees */
    bool used;
};

struct moe_session {
    int fd;         /* the SOCK_SEQPACKET connection to moed */
    unsigned flags; /* MOE_SESSION_* */
    int dead;       /* 0, or the -errno every call returns once the session is over */

    void *map; /* moed's memfd, mapped shared */
    uint64_t map_bytes;
    struct moe_shm_header *hdr; /* in the mapping: only state and reason are read after attach */
    struct moe_shm_header h;    /* the copy moe_shm_attach checked: sizes come from here */
    struct moe_ring sq, cq;     /* submissions (we produce), completions (we consume) */
    const uint8_t *msgs;        /* the message table: cq_entries * MOE_SHM_MSG bytes */
    uint8_t *arena;
    uint64_t arena_bytes; /* a multiple of ARENA_GRAIN */

    /* Allocator: free and allocated ranges, each sorted by offset, free ones
     * coalesced. */
    struct extent *free_ext, *used_ext;
    size_t n_free, cap_free, n_used, cap_used;

    /* Requests in flight: slots[n_slots], free slot indices in free_slots. */
    struct slot *slots;
    uint32_t *free_slots;
    uint32_t n_slots, n_free_slots, seq;

    /* Completions popped by moe_forward for other requests, oldest first
     * (a ring of n_slots). */
    struct moe_completion *stash;
    uint32_t stash_head, stash_n;

    /* The models of the last MODELS answer, to check buffer sizes at submit. */
    struct moe_shm_model_info models[MOE_SHM_MAX_MODELS];
    int n_models;

    uint64_t next_check_ns; /* moe_poll: next socket check */
    char err[320];
};

static _Thread_local char connect_err[320];

static int vset(char *buf, size_t len, int rc, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));
static int vset(char *buf, size_t len, int rc, const char *fmt, va_list ap)
{
    vsnprintf(buf, len, fmt, ap);
    return rc;
}

static int cfail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int cfail(int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset(connect_err, sizeof(connect_err), rc, fmt, ap);
    va_end(ap);
    return rc;
}

static int fail(struct moe_session *s, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct moe_session *s, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset(s->err, sizeof(s->err), rc, fmt, ap);
    va_end(ap);
    return rc;
}

/* Ends the session: every later call returns rc. */
static int die(struct moe_session *s, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int die(struct moe_session *s, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset(s->err, sizeof(s->err), rc, fmt, ap);
    va_end(ap);
    s->dead = rc;
    return rc;
}

/* Copies a string of at most len bytes that another process wrote (maybe
 * without a NUL) into dst of dst_len. */
static void copy_str(char *dst, size_t dst_len, const char *src, size_t len)
{
    size_t n = 0;

    while (n < len && n + 1 < dst_len && src[n])
        n++;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* Waits up to ms for fd to be readable: 1, 0 on timeout, -errno. */
static int wait_readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    uint64_t end = moe_ring_now_ns() + (uint64_t)ms * 1000000ull;
    int r;

    for (;;) {
        r = poll(&p, 1, ms);
        if (r >= 0)
            return r > 0;
        if (errno != EINTR)
            return -errno;
        uint64_t now = moe_ring_now_ns();
        ms = now >= end ? 0 : (int)((end - now) / 1000000ull);
    }
}

const char *moe_strerror(int code)
{
    static _Thread_local char buf[96];

    switch (code < 0 ? -code : code) {
    case 0:
        return "success";
    case ECONNRESET:
        return "moed ended the session (stopped, restarted or dropped it); reconnect";
    case EPROTONOSUPPORT:
        return "moed speaks another version of the shared-memory protocol";
    case EACCES:
        return "moed refused this client (uid/gid not allowed, or socket permissions)";
    case EPROTO:
        return "moed sent something that breaks the shared-memory protocol";
    case EAGAIN:
        return "not ready (nothing completed, or too many requests in flight)";
    case ETIMEDOUT:
        return "timed out";
    case ENOENT:
        return "no such model, MoE layer or socket";
    case ERANGE:
        return "a buffer lies outside the shared arena";
    case EINVAL:
        return "invalid request or argument";
    case ENOMEM:
        return "out of memory";
    default:
        return strerror_r(code < 0 ? -code : code, buf, sizeof(buf));
    }
}

const char *moe_connect_error(void)
{
    return connect_err;
}

const char *moe_last_error(const struct moe_session *s)
{
    return s ? s->err : connect_err;
}

int moe_session_fd(const struct moe_session *s)
{
    return s ? s->fd : -1;
}

size_t moe_arena_size(const struct moe_session *s)
{
    return s ? (size_t)s->arena_bytes : 0;
}

/* ---- connecting --------------------------------------------------------------------- */

/* Sends the hello and receives the welcome with its fd; *fd_ret is the
 * memfd.  0 or -errno with connect_err. */
static int handshake(int fd, const char *path, const struct moe_session_opts *o,
                     struct moe_shm_welcome *w, int *fd_ret)
{
    struct moe_shm_hello hello = {
        .magic = MOE_SHM_MAGIC,
        .version = MOE_SHM_VERSION,
        .op = MOE_SHM_OP_HELLO,
        .sq_entries = o->sq_entries ? o->sq_entries : MOE_SHM_DEFAULT_ENTRIES,
        .arena_bytes = o->arena_bytes ? o->arena_bytes : MOE_SHM_DEFAULT_ARENA,
    };
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } cm;
    char wbuf[sizeof(*w) + 64]; /* a later version's longer welcome still fits */
    struct iovec iov = {.iov_base = wbuf, .iov_len = sizeof(wbuf)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    struct cmsghdr *c;
    int fds[8], n_fds = 0, rc, i;
    ssize_t n;

    copy_str(hello.name, sizeof(hello.name), o->name ? o->name : program_invocation_short_name,
             SIZE_MAX);
    do
        n = send(fd, &hello, sizeof(hello), MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(hello))
        return cfail(n < 0 ? -errno : -EPROTO, "could not send the hello to moed at %s: %s", path,
                     n < 0 ? strerror(errno) : "short send");
    rc = wait_readable(fd, HANDSHAKE_MS);
    if (rc <= 0)
        return cfail(rc < 0 ? rc : -ETIMEDOUT, "moed at %s did not answer the hello within %d s",
                     path, HANDSHAKE_MS / 1000);
    memset(wbuf, 0, sizeof(wbuf));
    do
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return cfail(-errno, "could not receive moed's welcome from %s: %s", path, strerror(errno));
    for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t j = 0; j < k; j++) {
            int f;
            memcpy(&f, CMSG_DATA(c) + j * sizeof(int), sizeof(int));
            if (n_fds < (int)(sizeof(fds) / sizeof(fds[0])))
                fds[n_fds++] = f;
            else
                close(f);
        }
    }
    memcpy(w, wbuf, sizeof(*w));
    w->msg[sizeof(w->msg) - 1] = 0;
    if (n == 0) {
        rc = cfail(-ECONNRESET, "moed at %s closed the connection without a welcome", path);
    } else if ((size_t)n < offsetof(struct moe_shm_welcome, status) + sizeof(w->status)) {
        rc = cfail(-EPROTO, "moed at %s sent a welcome of %zd bytes", path, n);
    } else if (w->magic != MOE_SHM_MAGIC) {
        rc = cfail(-EPROTO, "%s is not moed's shared-memory socket (welcome magic %#llx)", path,
                   (unsigned long long)w->magic);
    } else if (w->status < 0) {
        const char *why = (size_t)n >= sizeof(*w) && w->msg[0] ? w->msg : "no reason given";
        rc = w->status >= -4095 ? w->status : -EPROTO;
        if (rc == -EPROTONOSUPPORT || w->version != MOE_SHM_VERSION)
            rc = cfail(-EPROTONOSUPPORT,
                       "protocol version mismatch: moed speaks %u, this library %u (%s)",
                       w->version, MOE_SHM_VERSION, why);
        else if (rc == -EACCES || rc == -EPERM)
            cfail(rc, "moed at %s refused this client: %s", path, why);
        else
            cfail(rc, "moed at %s refused the session: %s", path, why);
    } else if (w->version != MOE_SHM_VERSION) {
        rc = cfail(-EPROTONOSUPPORT, "protocol version mismatch: moed speaks %u, this library %u",
                   w->version, MOE_SHM_VERSION);
    } else if ((size_t)n < sizeof(*w) || (mh.msg_flags & MSG_TRUNC) || w->status > 0) {
        rc = cfail(-EPROTO, "moed at %s sent a malformed welcome (%zd bytes, status %d)", path, n,
                   w->status);
    } else if (mh.msg_flags & MSG_CTRUNC) {
        rc = cfail(-EPROTO, "moed at %s passed more file descriptors than the session's memory",
                   path);
    } else if (n_fds != 1) {
        rc = cfail(-EPROTO, "moed at %s welcomed the session with %d file descriptors, not 1", path,
                   n_fds);
    } else {
        *fd_ret = fds[0];
        return 0;
    }
    for (i = 0; i < n_fds; i++)
        close(fds[i]);
    return rc;
}

/* Maps the memfd and attaches the rings.  0 or -errno with connect_err. */
static int map_session(struct moe_session *s, int mfd, const struct moe_shm_welcome *w)
{
    char msg[200];
    struct stat st;
    int seals, rc;

    if (fstat(mfd, &st) < 0)
        return cfail(-errno, "fstat of the session memory: %s", strerror(errno));
    if (!S_ISREG(st.st_mode) || w->mapping_bytes == 0 || (uint64_t)st.st_size != w->mapping_bytes ||
        w->mapping_bytes > SIZE_MAX / 2)
        return cfail(-EPROTO, "the session memory from moed is %lld bytes, the welcome says %llu",
                     (long long)st.st_size, (unsigned long long)w->mapping_bytes);
    /* Without this seal moed could shrink the file and our loads would SIGBUS. */
    seals = fcntl(mfd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        return cfail(-EPROTO, "the session memory from moed is not sealed against shrinking");
    s->map = mmap(NULL, (size_t)w->mapping_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (s->map == MAP_FAILED) {
        s->map = NULL;
        return cfail(-errno, "could not map %llu bytes of session memory: %s",
                     (unsigned long long)w->mapping_bytes, strerror(errno));
    }
    s->map_bytes = w->mapping_bytes;
    rc = moe_shm_attach(s->map, s->map_bytes, &s->sq, &s->cq, &s->h, msg, sizeof(msg));
    if (rc < 0)
        return cfail(rc, "%s%s", rc == -EPROTONOSUPPORT ? "protocol version mismatch: " : "", msg);
    s->hdr = s->map;
    s->msgs = (const uint8_t *)s->map + s->h.msg_offset;
    s->arena = (uint8_t *)s->map + s->h.arena_offset;
    s->arena_bytes = s->h.arena_bytes / ARENA_GRAIN * ARENA_GRAIN;
    if (s->arena_bytes == 0 || s->h.cq_entries < 1)
        return cfail(-EPROTO, "moed gave the session an arena of %llu bytes",
                     (unsigned long long)s->h.arena_bytes);
    return 0;
}

static int setup_tables(struct moe_session *s)
{
    uint32_t i;

    s->n_slots = s->h.cq_entries;
    s->slots = calloc(s->n_slots, sizeof(*s->slots));
    s->free_slots = calloc(s->n_slots, sizeof(*s->free_slots));
    s->stash = calloc(s->n_slots, sizeof(*s->stash));
    s->cap_free = s->cap_used = 16;
    s->free_ext = calloc(s->cap_free, sizeof(*s->free_ext));
    s->used_ext = calloc(s->cap_used, sizeof(*s->used_ext));
    if (!s->slots || !s->free_slots || !s->stash || !s->free_ext || !s->used_ext)
        return cfail(-ENOMEM, "out of memory for a session of %u entries", s->n_slots);
    for (i = 0; i < s->n_slots; i++)
        s->free_slots[i] = s->n_slots - 1 - i;
    s->n_free_slots = s->n_slots;
    s->free_ext[0] = (struct extent){0, s->arena_bytes};
    s->n_free = 1;
    return 0;
}

int moe_connect(const char *socket_path, const struct moe_session_opts *opts,
                struct moe_session **ret)
{
    static const struct moe_session_opts defaults;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct moe_shm_welcome w;
    struct moe_session *s;
    int mfd = -1, rc;

    connect_err[0] = 0;
    if (!ret)
        return cfail(-EINVAL, "moe_connect: ret is NULL");
    *ret = NULL;
    if (!opts)
        opts = &defaults;
    if (!socket_path || !*socket_path)
        return cfail(-EINVAL, "moe_connect: no socket path given");
    if (strlen(socket_path) >= sizeof(addr.sun_path))
        return cfail(-ENAMETOOLONG, "socket path '%s' is longer than %zu bytes", socket_path,
                     sizeof(addr.sun_path) - 1);
    if (opts->flags & ~MOE_SESSION_POLL)
        return cfail(-EINVAL, "unknown session flags %#x", opts->flags & ~MOE_SESSION_POLL);
    s = calloc(1, sizeof(*s));
    if (!s)
        return cfail(-ENOMEM, "out of memory");
    s->fd = -1;
    s->flags = opts->flags;
    strcpy(addr.sun_path, socket_path);
    s->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        rc = cfail(-errno, "socket: %s", strerror(errno));
        goto out;
    }
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        rc = -errno;
        if (rc == -ENOENT || rc == -ECONNREFUSED)
            cfail(rc, "no moed listening at %s (%s); is moed running with shared memory enabled?",
                  socket_path, strerror(-rc));
        else if (rc == -EPROTOTYPE)
            /* A stream socket: moed's gRPC socket (moed.sock), or another
             * program's.  Shared memory is the SOCK_SEQPACKET shm_socket. */
            cfail(rc,
                  "%s is not moed's shared-memory socket: it is a stream socket, such as moed's "
                  "gRPC socket (moed.sock); give moed's shm_socket (e.g. /run/moed/shm.sock)",
                  socket_path);
        else if (rc == -EACCES || rc == -EPERM)
            cfail(rc, "no permission to connect to %s (%s); ask for moed's client group",
                  socket_path, strerror(-rc));
        else
            cfail(rc, "could not connect to moed at %s: %s", socket_path, strerror(-rc));
        goto out;
    }
    rc = handshake(s->fd, socket_path, opts, &w, &mfd);
    if (rc < 0)
        goto out;
    rc = map_session(s, mfd, &w);
    if (rc < 0)
        goto out;
    rc = setup_tables(s);
    if (rc < 0)
        goto out;
    close(mfd);
    *ret = s;
    return 0;
out:
    if (mfd >= 0)
        close(mfd);
    moe_close(s);
    return rc;
}

void moe_close(struct moe_session *s)
{
    if (!s)
        return;
    if (s->fd >= 0)
        close(s->fd);
    if (s->map)
        munmap(s->map, (size_t)s->map_bytes);
    free(s->slots);
    free(s->free_slots);
    free(s->stash);
    free(s->free_ext);
    free(s->used_ext);
    free(s);
}

/* ---- liveness ----------------------------------------------------------------------- */

/* 0 while moed keeps the session, else the session dies with -ECONNRESET. */
static int check_alive(struct moe_session *s)
{
    struct pollfd p = {.fd = s->fd, .events = POLLIN};
    char reason[sizeof(s->hdr->reason)];
    char b;
    ssize_t n;

    if (s->dead)
        return s->dead;
    /* Acquire: pairs with moed's store of CLOSED, made after it wrote reason. */
    if (atomic_load_explicit(&s->hdr->state, memory_order_acquire) != MOE_SHM_RUNNING) {
        copy_str(reason, sizeof(reason), s->hdr->reason, sizeof(s->hdr->reason));
        return die(s, -ECONNRESET, "moed closed the session: %s; reconnect with moe_connect",
                   reason[0] ? reason : "no reason given");
    }
    if (poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
        goto gone;
    n = recv(s->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR)))
        return 0; /* a message for a later query */
gone:
    return die(s, -ECONNRESET,
               "moed closed the session (stopped or restarted); reconnect with moe_connect");
}

/* ---- models ------------------------------------------------------------------------- */

static void to_public(const struct moe_shm_model_info *q, struct moe_model_info *m)
{
    memset(m, 0, sizeof(*m));
    m->id = q->id;
    copy_str(m->name, sizeof(m->name), q->name, sizeof(q->name));
    copy_str(m->arch, sizeof(m->arch), q->arch, sizeof(q->arch));
    m->weight_dtype =
        q->dtype <= MOE_SHM_DTYPE_BF16 ? (enum moe_act_dtype)q->dtype : MOE_DTYPE_OTHER;
#define CLAMP(v) ((v) > INT32_MAX ? INT32_MAX : (int)(v))
    m->n_layers = CLAMP(q->n_layers);
    m->hidden = CLAMP(q->hidden);
    m->n_experts = CLAMP(q->n_experts);
    m->top_k = CLAMP(q->top_k);
    m->ffn = CLAMP(q->ffn);
    m->n_shared = CLAMP(q->n_shared);
#undef CLAMP
    memcpy(m->moe_layer, q->moe_layer, sizeof(m->moe_layer));
}

/* Asks moed for its models into s->models.  0 or -errno. */
static int query_models(struct moe_session *s)
{
    struct moe_shm_msg m = {.op = MOE_SHM_OP_MODELS};
    union {
        struct moe_shm_models h;
        char buf[sizeof(struct moe_shm_models) +
                 MOE_SHM_MAX_MODELS * sizeof(struct moe_shm_model_info) + 1];
    } u;
    struct iovec iov = {.iov_base = u.buf, .iov_len = sizeof(u.buf)};
    ssize_t n;
    int rc;

    if (s->dead)
        return s->dead;
    do
        n = send(s->fd, &m, sizeof(m), MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN))
        return die(s, -ECONNRESET,
                   "moed closed the session (stopped or restarted); reconnect with moe_connect");
    if (n != (ssize_t)sizeof(m))
        return fail(s, n < 0 ? -errno : -EPROTO, "could not ask moed for its models: %s",
                    n < 0 ? strerror(errno) : "short send");
    /* Skip messages of other kinds (none in version 1, but harmless). */
    for (int tries = 0; tries < 16; tries++) {
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

        rc = wait_readable(s->fd, QUERY_MS);
        if (rc < 0)
            return fail(s, rc, "waiting for moed's models: %s", strerror(-rc));
        if (rc == 0)
            return fail(s, -ETIMEDOUT, "moed did not answer the models query within %d s",
                        QUERY_MS / 1000);
        do
            n = recvmsg(s->fd, &mh, MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            return die(s, -ECONNRESET,
                       "moed closed the session (stopped or restarted); "
                       "reconnect with moe_connect");
        if (n < 0)
            return fail(s, -errno, "receiving moed's models: %s", strerror(errno));
        if ((size_t)n < sizeof(u.h))
            return fail(s, -EPROTO, "moed answered the models query with %zd bytes", n);
        if (u.h.op != MOE_SHM_OP_MODELS)
            continue;
        if (u.h.n > MOE_SHM_MAX_MODELS || (mh.msg_flags & MSG_TRUNC) ||
            (size_t)n != sizeof(u.h) + u.h.n * sizeof(struct moe_shm_model_info))
            return fail(s, -EPROTO, "moed's models answer (%u models in %zd bytes) is malformed",
                        u.h.n, n);
        memcpy(s->models, u.buf + sizeof(u.h), u.h.n * sizeof(struct moe_shm_model_info));
        s->n_models = (int)u.h.n;
        return 0;
    }
    return fail(s, -EPROTO, "moed did not answer the models query");
}

int moe_models(struct moe_session *s, struct moe_model_info *out, int max)
{
    int rc, i;

    if (!s || max < 0 || (!out && max))
        return -EINVAL;
    rc = query_models(s);
    if (rc < 0)
        return rc;
    if (!out)
        return s->n_models;
    for (i = 0; i < s->n_models && i < max; i++)
        to_public(&s->models[i], &out[i]);
    return i;
}

int moe_model_find(struct moe_session *s, const char *name, struct moe_model_info *ret)
{
    char names[200] = "";
    size_t len = 0;
    int rc, i;

    if (!s || !ret)
        return -EINVAL;
    rc = query_models(s);
    if (rc < 0)
        return rc;
    if (s->n_models == 0)
        return fail(s, -ENOENT, "moed has no model loaded");
    for (i = 0; i < s->n_models; i++) {
        char n[MOE_SHM_NAME];

        copy_str(n, sizeof(n), s->models[i].name, sizeof(s->models[i].name));
        if (!name || strcmp(n, name) == 0) {
            to_public(&s->models[i], ret);
            return 0;
        }
        if (len < sizeof(names))
            len += (size_t)snprintf(names + len, sizeof(names) - len, "%s'%s'", i ? ", " : "", n);
    }
    return fail(s, -ENOENT, "moed has no model '%s' loaded (loaded: %s)", name, names);
}

/* ---- the arena ---------------------------------------------------------------------- */

static int grow(struct extent **a, size_t *cap, size_t n)
{
    struct extent *p;

    if (n < *cap)
        return 0;
    p = realloc(*a, *cap * 2 * sizeof(**a));
    if (!p)
        return -ENOMEM;
    *a = p;
    *cap *= 2;
    return 0;
}

/* First index i of a[0..n) with a[i].off >= off. */
static size_t lower_bound(const struct extent *a, size_t n, uint64_t off)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid].off < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

void *moe_alloc(struct moe_session *s, size_t bytes)
{
    uint64_t len, off;
    size_t i, j;

    if (!s)
        return NULL;
    if (s->dead) {
        fail(s, s->dead, "moe_alloc on a session that has ended");
        return NULL;
    }
    if (bytes > s->arena_bytes) {
        fail(s, -ENOMEM, "%zu bytes do not fit in the arena of %llu bytes", bytes,
             (unsigned long long)s->arena_bytes);
        return NULL;
    }
    len = bytes ? (bytes + ARENA_GRAIN - 1) / ARENA_GRAIN * ARENA_GRAIN : ARENA_GRAIN;
    for (i = 0; i < s->n_free && s->free_ext[i].len < len; i++)
        ;
    if (i == s->n_free) {
        fail(s, -ENOMEM,
             "no free range of %llu bytes in the arena of %llu bytes; free buffers or connect "
             "with a larger arena_bytes",
             (unsigned long long)len, (unsigned long long)s->arena_bytes);
        return NULL;
    }
    if (grow(&s->used_ext, &s->cap_used, s->n_used) < 0) {
        fail(s, -ENOMEM, "out of memory");
        return NULL;
    }
    off = s->free_ext[i].off;
    s->free_ext[i].off += len;
    s->free_ext[i].len -= len;
    if (s->free_ext[i].len == 0) {
        memmove(&s->free_ext[i], &s->free_ext[i + 1], (s->n_free - i - 1) * sizeof(struct extent));
        s->n_free--;
    }
    j = lower_bound(s->used_ext, s->n_used, off);
    memmove(&s->used_ext[j + 1], &s->used_ext[j], (s->n_used - j) * sizeof(struct extent));
    s->used_ext[j] = (struct extent){off, len};
    s->n_used++;
    return s->arena + off;
}

void moe_free(struct moe_session *s, void *p)
{
    struct extent e;
    size_t i;
    uint64_t off;

    if (!s || !p)
        return;
    if ((uint8_t *)p < s->arena || (uint8_t *)p >= s->arena + s->arena_bytes) {
        fail(s, -EINVAL, "moe_free(%p): not in this session's arena; ignored", p);
        return;
    }
    off = (uint64_t)((uint8_t *)p - s->arena);
    i = lower_bound(s->used_ext, s->n_used, off);
    if (i == s->n_used || s->used_ext[i].off != off) {
        fail(s, -EINVAL, "moe_free(%p): not a buffer moe_alloc returned (or freed twice); ignored",
             p);
        return;
    }
    e = s->used_ext[i];
    memmove(&s->used_ext[i], &s->used_ext[i + 1], (s->n_used - i - 1) * sizeof(struct extent));
    s->n_used--;
    /* Insert into the free list, merging with the neighbours. */
    i = lower_bound(s->free_ext, s->n_free, e.off);
    bool left = i > 0 && s->free_ext[i - 1].off + s->free_ext[i - 1].len == e.off;
    bool right = i < s->n_free && e.off + e.len == s->free_ext[i].off;
    if (left && right) {
        s->free_ext[i - 1].len += e.len + s->free_ext[i].len;
        memmove(&s->free_ext[i], &s->free_ext[i + 1], (s->n_free - i - 1) * sizeof(struct extent));
        s->n_free--;
    } else if (left) {
        s->free_ext[i - 1].len += e.len;
    } else if (right) {
        s->free_ext[i].off = e.off;
        s->free_ext[i].len += e.len;
    } else {
        /* Cannot fail: free ranges never outnumber used ones + 1, and
         * used_ext already had room for this one. */
        if (grow(&s->free_ext, &s->cap_free, s->n_free) < 0) {
            fail(s, -ENOMEM, "out of memory freeing a buffer: %llu bytes leaked",
                 (unsigned long long)e.len);
            return;
        }
        memmove(&s->free_ext[i + 1], &s->free_ext[i], (s->n_free - i) * sizeof(struct extent));
        s->free_ext[i] = e;
        s->n_free++;
    }
}

/* ---- requests ----------------------------------------------------------------------- */

/* The arena offset of [p, p + bytes), aligned to align.  0 or -EINVAL. */
static int arena_off(struct moe_session *s, const char *what, const void *p, uint64_t bytes,
                     unsigned align, uint64_t *ret)
{
    uintptr_t a = (uintptr_t)s->arena, x = (uintptr_t)p;
    uint64_t off;

    if (!p)
        return fail(s, -EINVAL, "the request's %s is NULL", what);
    if (x < a || x - a >= s->arena_bytes)
        return fail(s, -EINVAL,
                    "the request's %s %p is not in this session's arena [%p, +%llu bytes); "
                    "allocate it with moe_alloc",
                    what, p, (void *)s->arena, (unsigned long long)s->arena_bytes);
    off = x - a;
    if (bytes > s->arena_bytes - off)
        return fail(s, -EINVAL,
                    "the request's %s (%llu bytes at arena offset %llu) runs past "
                    "the end of the arena of %llu bytes",
                    what, (unsigned long long)bytes, (unsigned long long)off,
                    (unsigned long long)s->arena_bytes);
    if (off % align)
        return fail(s, -EINVAL, "the request's %s at arena offset %llu is not %u-byte aligned",
                    what, (unsigned long long)off, align);
    *ret = off;
    return 0;
}

static const struct moe_shm_model_info *known_model(const struct moe_session *s, uint32_t id)
{
    for (int i = 0; i < s->n_models; i++)
        if (s->models[i].id == id)
            return &s->models[i];
    return NULL;
}

/* Checks r and fills q; sizes are checked in full when the model is known
 * from a models query (moed checks everything again anyway). */
static int make_sqe(struct moe_session *s, const struct moe_request *r, struct moe_shm_sqe *q)
{
    const struct moe_shm_model_info *m;
    uint64_t row, io = 1, rb = 1;
    unsigned el;
    int rc;

    memset(q, 0, sizeof(*q));
    if (r->op == MOE_OP_NOP) {
        q->opcode = MOE_SHM_NOP;
        return 0;
    }
    if (r->op != MOE_OP_FORWARD)
        return fail(s, -EINVAL, "unknown request op %d (MOE_OP_NOP 0, MOE_OP_FORWARD 1)", r->op);
    if (r->dtype != MOE_F32 && r->dtype != MOE_F16 && r->dtype != MOE_BF16)
        return fail(s, -EINVAL, "unknown activation dtype %d (MOE_F32, MOE_F16, MOE_BF16)",
                    (int)r->dtype);
    if (r->n_tokens == 0 || r->n_tokens > MOE_SHM_MAX_TOKENS)
        return fail(s, -EINVAL, "%u tokens: expected 1 to %u", r->n_tokens, MOE_SHM_MAX_TOKENS);
    if (!r->ids != !r->weights)
        return fail(s, -EINVAL, "caller routing needs both ids and weights (or neither)");
    if (r->layer < 0)
        return fail(s, -EINVAL, "layer %d", r->layer);
    el = r->dtype == MOE_F32 ? 4 : 2;
    m = known_model(s, r->model);
    if (m) {
        row = moe_shm_row_bytes((uint32_t)r->dtype, m->hidden);
        io = row * r->n_tokens;
        rb = 4ull * (m->top_k ? m->top_k : 1) * r->n_tokens;
    }
    rc = arena_off(s, "input", r->input, io, el, &q->in_off);
    if (rc == 0)
        rc = arena_off(s, "output", r->output, io, el, &q->out_off);
    if (rc == 0 && r->ids)
        rc = arena_off(s, "routing ids", r->ids, rb, 4, &q->ids_off);
    if (rc == 0 && r->weights)
        rc = arena_off(s, "routing weights", r->weights, rb, 4, &q->weights_off);
    if (rc < 0)
        return rc;
    if (q->in_off < q->out_off + io && q->out_off < q->in_off + io)
        return fail(s, -EINVAL, "the request's input and output overlap");
    q->opcode = MOE_SHM_FORWARD;
    q->flags = r->ids ? MOE_SHM_F_ROUTING : 0;
    q->model = r->model;
    q->layer = r->layer;
    q->dtype = (uint32_t)r->dtype;
    q->n_tokens = r->n_tokens;
    return 0;
}

static uint32_t in_flight(const struct moe_session *s)
{
    return s->n_slots - s->n_free_slots + s->stash_n;
}

/* Submits r; *slot_ret: its slot.  0 or -errno. */
static int submit(struct moe_session *s, const struct moe_request *r, uint32_t *slot_ret)
{
    struct moe_shm_sqe q;
    uint32_t slot;
    int rc;

    if (!r)
        return fail(s, -EINVAL, "no request");
    if (s->dead)
        return s->dead;
    /* A cheap look at the state word: no point queueing for a closed session. */
    if (atomic_load_explicit(&s->hdr->state, memory_order_acquire) != MOE_SHM_RUNNING)
        return check_alive(s);
    rc = make_sqe(s, r, &q);
    if (rc < 0)
        return rc;
    if (in_flight(s) >= s->n_slots)
        return fail(s, -EAGAIN,
                    "%u requests in flight (the completion ring's capacity); reap completions "
                    "with moe_wait or moe_poll first",
                    in_flight(s));
    slot = s->free_slots[s->n_free_slots - 1];
    q.tag = (uint64_t)s->seq << 32 | slot;
    rc = moe_ring_push(&s->sq, &q, 0);
    if (rc == -EAGAIN)
        return fail(s, -EAGAIN,
                    "the submission ring is full (%u entries); reap completions and retry",
                    s->h.sq_entries);
    if (rc < 0)
        return die(s, -EPROTO, "moed corrupted the submission ring (head out of range)");
    s->n_free_slots--;
    s->slots[slot] = (struct slot){.tag = r->tag, .seq = s->seq, .used = true};
    s->seq++;
    *slot_ret = slot;
    return 0;
}

int moe_submit(struct moe_session *s, const struct moe_request *r)
{
    uint32_t slot;

    if (!s)
        return -EINVAL;
    return submit(s, r, &slot);
}

/* Turns a completion moed posted into the caller's; returns the request's
 * slot, or -1 for a completion of no request in flight. */
static int64_t to_completion(struct moe_session *s, const struct moe_shm_cqe *q, const char *msg,
                             struct moe_completion *c)
{
    uint32_t slot = (uint32_t)q->tag, seq = (uint32_t)(q->tag >> 32);

    memset(c, 0, sizeof(*c));
    if (slot >= s->n_slots || !s->slots[slot].used || s->slots[slot].seq != seq) {
        c->tag = q->tag;
        c->status = -EPROTO;
        snprintf(c->msg, sizeof(c->msg), "moed completed no request in flight (tag %#llx)",
                 (unsigned long long)q->tag);
        return -1;
    }
    c->tag = s->slots[slot].tag;
    s->slots[slot].used = false;
    s->free_slots[s->n_free_slots++] = slot;
    c->status = q->status <= 0 && q->status >= -4095 ? q->status : -EPROTO;
    c->hits = q->hits;
    c->misses = q->misses;
    c->batch_requests = q->batch_requests;
    c->batch_tokens = q->batch_tokens;
    c->queue_ns = q->queue_ns;
    c->compute_ns = q->compute_ns;
    c->total_ns = q->total_ns;
    copy_str(c->msg, sizeof(c->msg), msg, MOE_SHM_MSG);
    if (c->status < 0 && !c->msg[0])
        snprintf(c->msg, sizeof(c->msg), "%s", moe_strerror(c->status));
    return slot;
}

/* Takes the next completion: copies it and its message (into msg of
 * MOE_SHM_MSG bytes; "" when it has none) out, then releases its slot.
 * 0 or moe_ring_peek's errors. */
static int take_cqe(struct moe_session *s, struct moe_shm_cqe *q, char *msg, int timeout_ms)
{
    int slot = moe_ring_peek(&s->cq, q, timeout_ms);

    if (slot < 0)
        return slot;
    msg[0] = 0;
    if (q->msg_len) /* slot < cq_entries: the table has a message for it */
        copy_str(msg, MOE_SHM_MSG, (const char *)s->msgs + (size_t)slot * MOE_SHM_MSG,
                 q->msg_len < MOE_SHM_MSG ? q->msg_len : MOE_SHM_MSG);
    moe_ring_release(&s->cq);
    return 0;
}

/* Takes the next completion moed posted (take_cqe), waiting up to
 * timeout_ms (< 0: forever) in slices, checking that moed is still there
 * between them. */
static int pop_cqe(struct moe_session *s, struct moe_shm_cqe *q, char *msg, int timeout_ms)
{
    uint64_t start = moe_ring_now_ns(), end = UINT64_MAX, next_check = start + POLL_CHECK_NS;
    bool spin = s->flags & MOE_SESSION_POLL;
    int rc, slice;

    if (timeout_ms >= 0)
        end = start + (uint64_t)timeout_ms * 1000000ull;
    for (unsigned i = 0;; i++) {
        uint64_t now;

        slice = 0;
        if (!spin) {
            now = moe_ring_now_ns();
            slice = now >= end ? 0
                    : end - now > WAIT_SLICE_MS * 1000000ull
                        ? WAIT_SLICE_MS
                        : (int)((end - now + 999999) / 1000000);
        }
        rc = take_cqe(s, q, msg, slice);
        if (rc == 0)
            return 0;
        if (rc == -EPROTO)
            return die(s, -EPROTO,
                       "moed corrupted the completion ring (a sequence word or tail out of "
                       "range); the session is unusable, reconnect");
        if (spin) {
            moe_ring_relax();
            if (i % 64)
                continue;
            now = moe_ring_now_ns();
            if (now < next_check && now < end)
                continue;
            next_check = now + POLL_CHECK_NS;
        }
        rc = check_alive(s);
        if (rc < 0)
            return rc;
        if (timeout_ms >= 0 && moe_ring_now_ns() >= end)
            return fail(s, -ETIMEDOUT, "no completion within %d ms", timeout_ms);
    }
}

static bool stash_pop(struct moe_session *s, struct moe_completion *c)
{
    if (!s->stash_n)
        return false;
    *c = s->stash[s->stash_head];
    s->stash_head = (s->stash_head + 1) % s->n_slots;
    s->stash_n--;
    return true;
}

int moe_wait(struct moe_session *s, struct moe_completion *c, int timeout_ms)
{
    struct moe_shm_cqe q;
    char msg[MOE_SHM_MSG];
    int rc;

    if (!s || !c)
        return -EINVAL;
    if (s->dead)
        return s->dead;
    if (stash_pop(s, c))
        return 0;
    if (s->n_free_slots == s->n_slots)
        return fail(s, -EAGAIN, "moe_wait: no request in flight");
    rc = pop_cqe(s, &q, msg, timeout_ms);
    if (rc < 0)
        return rc;
    to_completion(s, &q, msg, c);
    return 0;
}

int moe_poll(struct moe_session *s, struct moe_completion *c)
{
    struct moe_shm_cqe q;
    char msg[MOE_SHM_MSG];
    uint64_t now;
    int rc;

    if (!s || !c)
        return -EINVAL;
    if (s->dead)
        return s->dead;
    if (stash_pop(s, c))
        return 0;
    rc = take_cqe(s, &q, msg, 0);
    if (rc == 0) {
        to_completion(s, &q, msg, c);
        return 0;
    }
    if (rc == -EPROTO)
        return die(s, -EPROTO, "moed corrupted the completion ring (a sequence word out of range)");
    /* Nothing: look for a dead moed now and then (a syscall; keep polling cheap). */
    now = moe_ring_now_ns();
    if (now >= s->next_check_ns) {
        s->next_check_ns = now + 10 * POLL_CHECK_NS;
        rc = check_alive(s);
        if (rc < 0)
            return rc;
    }
    return -EAGAIN;
}

int moe_forward(struct moe_session *s, const struct moe_request *r, struct moe_completion *c)
{
    struct moe_completion got;
    struct moe_shm_cqe q;
    char msg[MOE_SHM_MSG];
    uint32_t slot;
    int rc;

    if (!s || !c)
        return -EINVAL;
    rc = submit(s, r, &slot);
    if (rc < 0)
        return rc;
    for (;;) {
        rc = pop_cqe(s, &q, msg, -1);
        if (rc < 0)
            return rc;
        if (to_completion(s, &q, msg, &got) == (int64_t)slot) {
            *c = got;
            if (got.status < 0)
                fail(s, got.status, "%s", got.msg);
            return got.status;
        }
        /* Another request's: keep it for moe_wait/moe_poll.  Room is
         * guaranteed: slots in use + stash never exceed n_slots, and this
         * completion's slot was just freed (or it was a stray one, which
         * the check below drops rather than overflow). */
        if (s->stash_n < s->n_slots) {
            s->stash[(s->stash_head + s->stash_n) % s->n_slots] = got;
            s->stash_n++;
        }
    }
}
